import subprocess
import sys


def run(*args):
    out = subprocess.run([sys.executable, "-m", "qlinear_pass", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_backends_table():
    text = run("backends", "--device", "cpu")
    assert "device: cpu" in text
    assert "emulation" in text and "fp8_rowwise" in text
    assert "no kernels registered" in text


def test_env():
    text = run("env")
    assert "torch 2." in text and "config in effect" in text


def test_explain_command():
    text = run("explain", "--scheme", "int8_rowwise", "--backend", "emulation", "--hidden", "128")
    assert "q_proj" in text and "int8_rowwise" in text and "emulation" in text
