"""``python -m qlinear_pass``: run in-process through ``main(argv)`` (one subprocess checks the module entry)."""
import subprocess
import sys
import textwrap

import pytest

from qlinear_pass import __main__ as cli
from qlinear_pass.config import ENV_VAR


def run(capsys, *args, status=0):
    if status == 0:
        assert cli.main(list(args)) == 0
    else:
        with pytest.raises(SystemExit) as e:
            cli.main(list(args))
        assert e.value.code == status
    out = capsys.readouterr()
    return out.out, out.err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "qlinear_pass", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "backends" in out.stdout and "explain" in out.stdout


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    for cmd in ("backends", "env", "explain"):
        assert cmd in text


def test_backends_table_fits_one_screen(capsys):
    text, _ = run(capsys, "backends", "--device", "cpu")
    lines = text.splitlines()
    assert lines[0] == "device: cpu"
    assert len(lines) <= 30 and max(len(line) for line in lines) <= 130
    assert text.count("emulation") <= 2  # one row, not a line per scheme
    header = lines[1].split()
    assert header[0] == "backend" and "fp8_rowwise" in header and "w4a16" in header
    row = next(line.split() for line in lines if line.startswith("emulation "))
    assert row[1:] == ["yes"] * 7
    assert "no kernels in this installation: " in text and "conch" in text


def test_backends_verbose_gives_every_reason(capsys):
    text, _ = run(capsys, "backends", "--device", "cpu", "--verbose")
    assert "yes: emulation" in text and "no kernels registered" in text


def test_env_reports_the_config(capsys, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    text, _ = run(capsys, "env")
    assert "torch 2." in text and "config in effect: auto (from default" in text


def test_env_shows_a_bad_env_var_as_the_problem(capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "trition")
    assert cli.main(["env"]) == 1
    text = capsys.readouterr().out
    assert "torch 2." in text  # the rest of the report is still there
    assert f"config in effect: PROBLEM: environment variable {ENV_VAR}='trition'" in text
    assert "Did you mean 'triton'" in text


@pytest.mark.parametrize("args,expected", [
    (["explain", "--scheme", "int4"], "Did you mean 'w4a16'"),
    (["explain", "--backend", "trition"], "Did you mean 'triton'"),
    (["explain", "--group-size", "100"], "invalid choice: 100"),
    (["backends", "--nope"], "unrecognized arguments"),
])
def test_bad_arguments_are_one_line_errors(capsys, args, expected):
    _, err = run(capsys, *args, status=2)
    assert expected in err and "Traceback" not in err


def test_explain_help_describes_the_command_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = capsys.readouterr().out
    assert "module:function" in text and "Hugging Face" in text
    assert "(default: 256)" in text and "(default: bfloat16)" in text
    assert "from make" not in text


def test_explain_builtin_block(capsys):
    text, _ = run(capsys, "explain", "--scheme", "int8_rowwise", "--backend", "emulation", "--hidden", "128")
    assert text.startswith("linear backend: emulation (from --backend)")
    assert "q_proj" in text and "int8_rowwise" in text and "from make" not in text


def test_explain_takes_a_model_function(capsys, tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(textwrap.dedent("""
        import torch
        import qlinear_pass as qp

        def build():
            m = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
            return qp.quantize(m, "int8_weight_only"), (torch.randn(3, 64),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    text, _ = run(capsys, "explain", "usermodels:build", "--backend", "emulation")
    assert "int8_weight_only" in text and text.count("emulation") >= 3
    _, err = run(capsys, "explain", "usermodels:nope", status=2)
    assert "has no 'nope'" in err


def test_explain_reports_a_missing_kernel_without_a_traceback(capsys):
    _, err = run(capsys, "explain", "--scheme", "fp8_weight_only", "--backend", "torch", "--hidden", "128",
                 status=1)
    assert "linear backend 'torch' has no kernel" in err and "Traceback" not in err


def test_explain_a_directory_without_transformers(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    _, err = run(capsys, "explain", str(tmp_path), status=2)
    assert "needs the transformers package" in err


def test_explain_a_hugging_face_directory(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    text, _ = run(capsys, "explain", str(tmp_path), "--scheme", "w4a16", "--group-size", "32", "--backend",
                  "emulation", "--seq-len", "4")
    for name in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "lm_head"):
        assert name in text, text
    assert "w4a16 g32" in text
