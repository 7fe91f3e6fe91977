"""MLP block benchmark: the fused quantact block vs its peers, side by side in one process.

Block (PERFORMANCE.md): residual add + RMSNorm -> per-token fp8 -> gate/up fp8 GEMM [2I, H] ->
SiLU-and-mul -> per-token fp8 -> down fp8 GEMM [H, I], per-channel weight scales, bf16 activations.

- ``quantact_fused``: ``jax.jit(quantact_jax.mlp.mlp)``: the fused Pallas producers and the Pallas GEMM;
- ``xla_fp8_unfused``: the same block in plain jnp (rsqrt, ``x / s``), XLA's fp8 dot on ``[N, K]`` weights;
- ``xla_bf16``: the block in bf16 without quantization (weights dequantized to bf16);
- ``torch_compile_fp8`` / ``torch_eager_fp8``: the block in plain torch with ``torch._scaled_mm``
  (cuBLASLt, row-wise scales), compiled with ``torch.compile`` and eager.

Ceilings, measured in the same run: device-to-device copy bandwidth (bytes: weights + activations)
and the fp8 GEMM rate of ``torch._scaled_mm`` at 8192^3; the roofline time of a case is
``max(bytes / copy bandwidth, flops / fp8 rate)``, and each time is reported as a fraction of it.

``--interpret-small`` runs small shapes on a CPU (quantact in Pallas interpret mode, no ceilings,
no torch.compile): a smoke test of the benchmark itself, not a performance figure.
Usage: ``quantact bench --which block`` or ``python -m quantact_jax.bench.block --out block.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from interop.keys import kFp8DynamicTokenSym
from quantact_jax.bench.producers import (
    jnp_quant_token,
    kernel_times,
    time_jax,
    time_torch,
    torch_quant_token,
)
from quantact_jax.mlp import make_block, mlp

GPU_CASES = [(16, 4096, 14336), (4096, 4096, 14336)]  # (M, hidden, intermediate)
SMALL_CASES = [(16, 256, 384)]
PEERS = ("xla_fp8_unfused", "xla_bf16", "torch_compile_fp8", "torch_eager_fp8")


def progress(items: Iterable[Any], desc: str) -> Iterable[Any]:
    """tqdm's progress bar when tqdm is installed (``pip install quantact[bench]``), else a line per item."""
    items = list(items)
    try:
        from tqdm import tqdm
    except ImportError:
        def lines():
            for i, item in enumerate(items):
                print(f"[{desc} {i + 1}/{len(items)}] {item}", flush=True)
                yield item
        return lines()
    return tqdm(items, desc=desc)


# ---------------------------------------------------------------- peers (plain formulations)
def _xla_fp8_linear(q, sa, w, sw, dtype):
    acc = jax.lax.dot_general(q, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (acc * sa * sw.reshape(1, -1)).astype(dtype)


def xla_fp8_block(x, r, nw, w1, s1, w2, s2, eps=1e-6):
    z = x.astype(jnp.float32) + r.astype(jnp.float32)
    n = (z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)).astype(x.dtype) * nw
    h = _xla_fp8_linear(*jnp_quant_token(n), w1, s1, x.dtype)
    g, u = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return _xla_fp8_linear(*jnp_quant_token(jax.nn.silu(g) * u), w2, s2, x.dtype), z.astype(x.dtype)


def xla_bf16_block(x, r, nw, w1, w2, eps=1e-6):
    z = x.astype(jnp.float32) + r.astype(jnp.float32)
    n = (z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)).astype(x.dtype) * nw
    dot = lambda a, w: jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())))
    g, u = jnp.split(dot(n, w1).astype(jnp.float32), 2, axis=-1)
    return dot((jax.nn.silu(g) * u).astype(x.dtype), w2), z.astype(x.dtype)


def torch_fp8_block(x, r, nw, w1, s1, w2, s2, eps=1e-6):
    import torch

    z = x.float() + r.float()
    n = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * nw
    q, sa = torch_quant_token(n)
    h = torch._scaled_mm(q, w1.t(), scale_a=sa, scale_b=s1.t(), out_dtype=x.dtype)
    g, u = h.float().chunk(2, dim=-1)
    q, sa = torch_quant_token(torch.nn.functional.silu(g) * u)
    return torch._scaled_mm(q, w2.t(), scale_a=sa, scale_b=s2.t(), out_dtype=x.dtype), z.to(x.dtype)


# ---------------------------------------------------------------- measurement
def ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes/s, read + write) and the fp8 GEMM rate (flop/s) of
    ``torch._scaled_mm`` (tensor-wise scales) at 8192^3."""
    import torch

    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    copy = 2 * buf.numel() / time_torch(lambda b: b.clone(), (buf,), iters=20)
    del buf
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    t = time_torch(lambda: torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), (),
                   iters=20)
    return {"copy_bytes_per_s": copy, "fp8_flops_per_s": 2 * 8192**3 / t}


def run_case(m: int, hidden: int, inter: int, *, gpu: bool, ceil: dict[str, float] | None, seed: int = 0,
             silu_epilogue: bool = False) -> dict:
    """Time the fused block and every peer on one shape; returns a JSON-able row."""
    import torch

    from interop.bridge import to_torch

    block = make_block(hidden, inter, key=kFp8DynamicTokenSym, seed=seed)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32), jnp.bfloat16)
    gu, dn = block.gate_up, block.down
    w1b = (gu.weight.astype(jnp.float32) * gu.weight_scale).astype(jnp.bfloat16)
    w2b = (dn.weight.astype(jnp.float32) * dn.weight_scale).astype(jnp.bfloat16)
    fp8_args = (x, r, block.norm_weight, gu.weight, gu.weight_scale, dn.weight, dn.weight_scale)
    t_args = tuple(to_torch(a) for a in fp8_args)
    flops = 6 * m * hidden * inter
    nbytes = 3 * hidden * inter + 4 * (2 * inter + hidden) + 4 * m * hidden * 2  # fp8 weights + scales + x, r, out, res
    row: dict[str, Any] = {"m": m, "hidden": hidden, "intermediate": inter, "flops": flops, "bytes": nbytes,
                           "times_us": {}, "device_us": {}, "kernels_us": {}, "errors": {}}
    impls: dict[str, tuple[Callable, tuple, str]] = {
        "quantact_fused": (jax.jit(mlp), (block, x, r), "jax"),
        "xla_fp8_unfused": (jax.jit(xla_fp8_block), fp8_args, "jax"),
        "xla_bf16": (jax.jit(xla_bf16_block), (x, r, block.norm_weight, w1b, w2b), "jax"),
        "torch_eager_fp8": (torch_fp8_block, t_args, "torch"),
    }
    if gpu:
        impls["torch_compile_fp8"] = (torch.compile(torch_fp8_block), t_args, "torch")
    else:
        row["errors"]["torch_compile_fp8"] = "skipped on CPU"
    if gpu and silu_epilogue:  # experimental: SiLU-and-mul in the gate/up GEMM's epilogue (mosaic_gate_up)
        impls["quantact_silu_epilogue"] = (jax.jit(functools.partial(mlp, silu_epilogue=True)), (block, x, r), "jax")
    outs: dict[str, np.ndarray] = {}
    for name, (fn, args, kind) in impls.items():
        try:
            if gpu:
                t = (time_jax(fn, args, iters=20) if kind == "jax" else time_torch(fn, args, iters=20))
            else:  # torch on CPU is synchronous; block_until_ready passes its tensors through
                t = time_jax(fn, args, iters=3, reps=3)
            row["times_us"][name] = t * 1e6
            if gpu:  # the kernels alone: a JAX call's ~50 us host dispatch is paid once per model step
                kern = kernel_times(fn, args)  # per kernel: where the time goes
                row["kernels_us"][name] = {k: round(v, 2) for k, v in sorted(kern.items(), key=lambda kv: -kv[1])}
                row["device_us"][name] = sum(kern.values())
            out = np.asarray(jnp.asarray(fn(*args)[0], jnp.float32)) if kind == "jax" else \
                fn(*args)[0].float().cpu().numpy()
            outs[name] = out
        except Exception as e:  # noqa: BLE001  (a peer this torch/XLA cannot run, e.g. no CPU _scaled_mm)
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:160]}"
    # every implementation computes the same block (plain formulations round differently): a
    # relative L2 distance of a few % (fp8 quantization noise) is expected, anything larger is a bug
    if "quantact_fused" in outs:
        ref = outs["quantact_fused"]
        row["rel_l2_vs_quantact"] = {k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref)) for k, v in outs.items()}
    # speedups and the roofline fraction on device time where measured (GPU), else on wall time
    times = row["device_us"] or row["times_us"]
    ours = times.get("quantact_fused")
    row["speedup_vs"] = {p: times[p] / ours for p in PEERS if ours and p in times}
    ours_wall = row["times_us"].get("quantact_fused")
    row["wall_speedup_vs"] = {p: row["times_us"][p] / ours_wall for p in PEERS if ours_wall and p in row["times_us"]}
    if ceil:
        roof = max(nbytes / ceil["copy_bytes_per_s"], flops / ceil["fp8_flops_per_s"])
        row["roofline_us"] = roof * 1e6
        row["of_roofline"] = {k: roof * 1e6 / v for k, v in times.items()}
    return row


def run(*, interpret_small: bool = False, seed: int = 0, silu_epilogue: bool = False) -> dict:
    """The block benchmark: GPU shapes on a GPU, or the small interpret-mode smoke run on a CPU."""
    import torch

    gpu = jax.default_backend() == "gpu"
    if not gpu and not interpret_small:
        raise RuntimeError("the block benchmark needs a GPU (pass interpret_small=True for a CPU smoke run)")
    res = {"device": torch.cuda.get_device_name() if gpu else jax.devices()[0].device_kind,
           "date": datetime.date.today().isoformat(), "jax": jax.__version__, "torch": torch.__version__,
           "python": platform.python_version(), "interpret": not gpu, "ceilings": ceilings() if gpu else None,
           "cases": []}
    for m, h, i in progress(GPU_CASES if gpu else SMALL_CASES, "block"):
        res["cases"].append(run_case(m, h, i, gpu=gpu, ceil=res["ceilings"], seed=seed, silu_epilogue=silu_epilogue))
    return res


def table(res: dict) -> str:
    """The result as a text table: µs per implementation (device time on a GPU: the summed kernel
    durations), our speedup, fraction of the roofline."""
    names = ["quantact_fused", *PEERS]
    lines = [f"{'M x H x I':>18s} " + " ".join(f"{n:>18s}" for n in names) + "   (µs; ours vs peer; % roofline)"]
    for c in res["cases"]:
        cells = []
        for n in names:
            t = (c.get("device_us") or c["times_us"]).get(n)
            if t is None:
                cells.append(f"{'-':>18s}")
                continue
            extra = f" {c['speedup_vs'][n]:.2f}x" if n in c.get("speedup_vs", {}) else ""
            extra += f" {100 * c['of_roofline'][n]:.0f}%" if "of_roofline" in c else ""
            cells.append(f"{t:9.1f}{extra:>9s}")
        lines.append(f"{c['m']:>6d}x{c['hidden']}x{c['intermediate']:<6d} " + " ".join(cells))
    if res["interpret"]:
        lines.append("(CPU, Pallas interpret mode: quantact's times are not performance figures)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--interpret-small", action="store_true", help="CPU smoke run on small shapes")
    ap.add_argument("--silu-epilogue", action="store_true",
                    help="also time the experimental gate/up GEMM with SiLU-and-mul in its epilogue (GPU)")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.interpret_small:
        print("no GPU: the block benchmark needs one (--interpret-small runs a CPU smoke test in interpret mode)")
        return 0
    t0 = time.perf_counter()
    res = run(interpret_small=args.interpret_small, silu_epilogue=args.silu_epilogue)
    print(table(res))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
