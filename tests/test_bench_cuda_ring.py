"""benchmarks/bench_cuda_ring.py: building a set's variants (nvcc replaced by a recorder)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cuda_ring as B  # noqa: E402


def test_each_variant_is_built_from_its_tuning_defines_only(monkeypatch, tmp_path):
    seen = {}

    def build(name, defines, folder, source=None):
        seen[name] = (defines, folder, source)
        return f"lib_{name}"

    monkeypatch.setattr(B, "build", build)
    libs = B.build_all(B.SETS["trigger"], tmp_path, {"pdl_late": Path("other.cu")})
    # "pdl" is a call argument, not a define: it shares the build of "rule"
    assert libs == {"rule": "lib_rule", "pdl": "lib_rule", "pdl_late": "lib_pdl_late"}
    assert seen == {"rule": ({}, tmp_path, None), "pdl_late": ({"QLP_LATE_TRIGGER": 1}, tmp_path, Path("other.cu"))}
    seen.clear()  # the same defines from another source: a build of their own
    libs = B.build_all({"a": {"QLP_X": 1}, "b": {"QLP_X": 1, "warps": 4}, "c": {"QLP_X": 1}}, tmp_path, {"c": Path("o.cu")})
    assert libs == {"a": "lib_a", "b": "lib_a", "c": "lib_c"} and sorted(seen) == ["a", "c"]


def test_a_set_of_layer_configs_is_refused_here(capsys):
    import pytest

    with pytest.raises(SystemExit):
        B.main(["--set", "balance"])
    assert "time it with bench_decode_layer.py --set balance" in capsys.readouterr().err
