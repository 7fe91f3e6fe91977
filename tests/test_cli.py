"""The ``quantact`` command runs in CI on small sizes."""

import subprocess
import sys

import pytest

from interop.cli import main


def test_keys_lists_every_constant(capsys):
    from interop.keys import ALL_KEYS

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for name in ALL_KEYS:
        assert name in out


def test_demo_small_agrees_with_references(capsys):
    assert main(["demo", "--m", "5", "--k", "256"]) == 0
    out = capsys.readouterr().out
    assert "all producers agree with the references" in out
    assert "DIFFERS" not in out


def test_bench_without_gpu_says_so(capsys):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("has a GPU")
    assert main(["bench", "--quick"]) == 0
    assert "needs one" in capsys.readouterr().out


def test_help_runs_without_importing_jax():
    code = "import sys; from interop import cli; assert 'jax' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
