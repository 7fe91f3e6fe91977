"""The ``quantact`` command runs in CI on small sizes."""

import json
import subprocess
import sys

import jax
import pytest

from interop.cli import main


def test_keys_lists_every_constant(capsys):
    from interop.keys import ALL_KEYS

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for name in ALL_KEYS:
        assert name in out
    assert "QuantLinear" in out and "NVFP4" in out


def test_demo_small_agrees_with_references(capsys):
    assert main(["demo", "--part", "producers", "--m", "5", "--k", "256"]) == 0
    out = capsys.readouterr().out
    assert "all producers agree with the references" in out
    assert "DIFFERS" not in out


def test_demo_block_small(capsys):
    """The block demo: fused JAX vs unfused JAX (own GEMM and XLA fp8 dot) vs the PyTorch block, with
    the static key bit-exact against the unfused block, and a timing table."""
    argv = ["demo", "--part", "block", "--hidden", "128", "--intermediate", "256", "--tokens", "3",
            "--keys", "kFp8StaticTensorSym,kFp8DynamicTokenSym"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "the block agrees with its unfused form and the PyTorch reference" in out and "FAIL" not in out
    static_unfused = next(line for line in out.splitlines()
                          if line.startswith("kFp8StaticTensorSym") and "unfused JAX " in line)
    # on a GPU the demo states the static key's bound (the fused SiLU's exp is libdevice's there)
    assert " yes " in static_unfused and ("bit-exact" in static_unfused or jax.default_backend() == "gpu")
    assert "timing (ms" in out and "PyTorch reference" in out
    assert main(["demo", "--part", "block", "--keys", "kMxfp8Dynamic"]) == 2


def test_bench_without_gpu_says_so(capsys):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("has a GPU")
    assert main(["bench", "--quick"]) == 0
    assert "needs one" in capsys.readouterr().out


def test_bench_interpret_small_writes_json(tmp_path, capsys):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("has a GPU: the real benchmark is run by bench/gpu_run.sh")
    out = tmp_path / "sub" / "bench.json"
    assert main(["bench", "--interpret-small", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (case,) = res["block"]["cases"]
    assert case["m"] == 16 and "quantact_fused" in case["times_us"] and "xla_fp8_unfused" in case["times_us"]
    # every peer computes the same block: fp8 rounding differences only
    assert all(v < 0.1 for v in case["rel_l2_vs_quantact"].values())
    assert "interpret mode" in capsys.readouterr().out


def test_bench_plot_or_clear_message(tmp_path):
    from quantact_jax.bench.plot import plot

    res = {"device": "test", "block": {"ceilings": {"copy_bytes_per_s": 3e12, "fp8_flops_per_s": 1e15}, "cases": [
        {"m": 16, "hidden": 4096, "intermediate": 14336, "of_roofline": {"quantact_fused": 0.5, "xla_bf16": 0.3}}]},
        "producers": {"copy_tb_s": 3.0, "cases": [{"name": "quant", "shape": [16, 64], "quantact_tb_s": 2.5}]},
        "consumers": {"cases": [{"shape": [16, 64, 64], "quantact_token_x_channel_tflops": 1.0}]}}
    png = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot(res, str(png)) is False  # the CLI then says how to install it
        return
    assert plot(res, str(png)) is True and png.read_bytes()[:4] == b"\x89PNG"


def test_help_runs_without_importing_jax():
    code = "import sys; from interop import cli; assert 'jax' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
