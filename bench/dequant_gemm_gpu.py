#!/usr/bin/env python
"""NVFP4 / MXFP8 dequantising GEMM (quantact_jax.dequant_gemm) on the GPU: TFLOP/s against the jnp
reference and XLA's dequantise-then-bf16-dot, with a config sweep.

Shapes (M x N x K): 4096 x 4096 x 4096 (prefill) and 16 x 8192 x 8192 (decode, split-K). For each
format: the kernel with the heuristic config and with every candidate of ``--sweep`` (default: a
few tiles), ``reference.scaled_mm`` under jit (dequantise in f32, f32 matmul at HIGHEST: the
specification, not a speed target), and ``xla-bf16`` (dequantise to bf16 in XLA, then a bf16 dot
with f32 accumulation: what ``jax.nn.scaled_matmul`` does on Hopper; the fair peer). Times are
device times from the CUPTI profiler (quantact_jax.bench.producers.device_us: the lent H100's ~50 us of host
dispatch per JAX call drops out) when torch sees CUDA, else the median wall time of jitted calls.
Each kernel output is checked against the reference (relative L2 < 1e-3 and the elementwise bound
of tests/test_dequant_gemm.py) before it is timed.

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/dequant_gemm_gpu.py --out $OUT/dequant_gemm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from interop.keys import ScaleLayout, kMxfp8Dynamic, kNvfp4Dynamic
from interop.weights import WEIGHT_MXFP8, WEIGHT_NVFP4
from quantact_jax import dequant_gemm as D
from quantact_jax import reference as R
from quantact_jax.bench.producers import latency_s

SHAPES = [(4096, 4096, 4096), (16, 8192, 8192)]
KEYS = {"nvfp4": (kNvfp4Dynamic, WEIGHT_NVFP4), "mxfp8": (kMxfp8Dynamic, WEIGHT_MXFP8)}
SWEEP_PREFILL = [D.DequantGemmConfig(128, 128, 128, 8, 3), D.DequantGemmConfig(128, 128, 64, 4, 4),
                 D.DequantGemmConfig(128, 256, 64, 8, 3), D.DequantGemmConfig(64, 128, 128, 4, 4),
                 D.DequantGemmConfig(128, 128, 128, 4, 3), D.DequantGemmConfig(256, 128, 64, 8, 3)]
SWEEP_DECODE = [D.DequantGemmConfig(16, 64, 256, 4, 4, split_k=4), D.DequantGemmConfig(16, 64, 256, 4, 4, split_k=8),
                D.DequantGemmConfig(16, 128, 256, 4, 4, split_k=4), D.DequantGemmConfig(16, 64, 512, 4, 3, split_k=8),
                D.DequantGemmConfig(16, 32, 256, 4, 4, split_k=8)]


def problem(fmt: str, m: int, n: int, k: int, seed: int = 0):
    """Random bf16 activation and f32 weight (never zeros), quantized by the jnp reference on the
    device; NVFP4 global scales from the tensors' amax."""
    key, _ = KEYS[fmt]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    wf = jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02)
    gs = {}
    if fmt == "nvfp4":
        gs = {"input_global_scale": jnp.float32(448 * 6) / jnp.max(jnp.abs(x.astype(jnp.float32))),
              "weight_global_scale": jnp.float32(448 * 6) / jnp.max(jnp.abs(wf))}
    wdyn = key.with_layout(ScaleLayout.ROW_MAJOR)
    quant = jax.jit(R.quantize, static_argnames=("key",))
    qa = quant(x, key=key, global_scale=gs.get("input_global_scale"))
    w = quant(wf, key=wdyn, global_scale=gs.get("weight_global_scale"))
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return qa, w.data, w.scale, bias, gs


def timer():
    """``time_us(fn, args)``: CUPTI device time when torch sees CUDA, else median wall time."""
    try:
        import torch

        if torch.cuda.is_available():
            from quantact_jax.bench.producers import device_us
            return device_us, "device (CUPTI)"
    except ImportError:
        pass

    return (lambda fn, args, iters=20: latency_s(fn, args, iters) * 1e6), "wall (median, includes host dispatch)"


def check(got, want, qa, wq, ws, wkey, gs) -> dict:
    """Relative L2 and the worst elementwise error in units of tests/test_dequant_gemm.py's bound
    (one bf16 ulp + 2 K 2**-23 sum |a w|; GPU accumulation may truncate)."""
    k = qa.orig_shape[-1]
    a = R.dequantize_codes(qa.data, qa.scale, qa.quant_key, qa.orig_shape, gs.get("input_global_scale"))
    w = R.dequantize_codes(wq, ws, wkey, (wq.shape[0], k), gs.get("weight_global_scale"))
    abs_prod = np.asarray(jnp.matmul(jnp.abs(a), jnp.abs(w).T, precision=jax.lax.Precision.HIGHEST), np.float64)
    g, r = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = np.maximum(np.abs(g), np.abs(r)) * 2.0 ** -7 + 2 * k * 2.0 ** -23 * abs_prod
    return {"rel_l2": float(np.linalg.norm(g - r) / np.linalg.norm(r)),
            "max_err_over_bound": float(np.max(np.abs(g - r) / np.maximum(bound, 1e-30))),
            "finite": bool(np.isfinite(g).all())}


def run(fmt: str, m: int, n: int, k: int, sweep: bool, time_us) -> list[dict]:
    key, wkey = KEYS[fmt]
    qa, wq, ws, bias, gs = problem(fmt, m, n, k)
    flops = 2.0 * m * n * k
    rows = []

    def record(name: str, fn, args, cfg=None, ok: dict | None = None):
        row = {"format": fmt, "m": m, "n": n, "k": k, "impl": name,
               "config": None if cfg is None else dataclasses.asdict(cfg)}
        try:
            us = time_us(fn, args)
            row.update(us=us, tflops=flops / us / 1e6, **(ok or {}))
        except Exception as e:  # noqa: BLE001 -- a config that does not compile (shared memory, registers) is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=2)
        rows.append(row)
        msg = row.get("error") or (f"{row['us']:9.1f} us  {row['tflops']:7.1f} TFLOP/s"
                                   + (f"  rel_l2 {row['rel_l2']:.1e}  err/bound {row['max_err_over_bound']:.2f}"
                                      if ok else ""))
        print(f"{fmt:6s} {m:5d}x{n}x{k}  {name:40s} {msg}", flush=True)

    ref_fn = jax.jit(lambda qa, w, s, b: R.scaled_mm(qa, w, s, wkey, bias=b, global_scale_a=gs.get("input_global_scale"),
                                                     global_scale_w=gs.get("weight_global_scale")))
    want = jax.block_until_ready(ref_fn(qa, wq, ws, bias))

    def xla_bf16(qa, w, s, b):
        a = R.dequantize_codes(qa.data, qa.scale, qa.quant_key, qa.orig_shape,
                               gs.get("input_global_scale")).astype(jnp.bfloat16)
        wv = R.dequantize_codes(w, s, wkey, (w.shape[0], k), gs.get("weight_global_scale")).astype(jnp.bfloat16)
        acc = jax.lax.dot_general(a, wv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return (acc + b).astype(jnp.bfloat16)

    configs = [None] + ((SWEEP_DECODE if m <= 64 else SWEEP_PREFILL) if sweep else [])
    for cfg in configs:
        fn = jax.jit(lambda qa, w, s, b, cfg=cfg: D.scaled_mm(qa, w, s, input_quant_key=key, bias=b, config=cfg, **gs))
        c = cfg or D.heuristic_config(m, n, k, key.format)
        name = (f"pallas {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages} sk{c.split_k}"
                + (" (heuristic)" if cfg is None else ""))
        try:
            ok = check(jax.block_until_ready(fn(qa, wq, ws, bias)), want, qa, wq, ws, wkey, gs)
        except Exception as e:  # noqa: BLE001 -- recorded, like a compile failure
            rows.append({"format": fmt, "m": m, "n": n, "k": k, "impl": name,
                         "config": None if cfg is None else dataclasses.asdict(cfg),
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{fmt:6s} {m:5d}x{n}x{k}  {name:40s} {rows[-1]['error']}", flush=True)
            continue
        record(name, fn, (qa, wq, ws, bias), c, ok)
    record("jnp reference (f32 HIGHEST)", ref_fn, (qa, wq, ws, bias))
    record("xla dequant + bf16 dot", jax.jit(xla_bf16), (qa, wq, ws, bias))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--formats", default="nvfp4,mxfp8")
    ap.add_argument("--no-sweep", action="store_true", help="heuristic config only")
    ap.add_argument("--shapes", help="MxNxK,... instead of the default 4096x4096x4096,16x8192x8192")
    args = ap.parse_args()
    time_us, how = timer()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; times: {how}", flush=True)
    rows = []
    for fmt in args.formats.split(","):
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
        for m, n, k in shapes:
            rows += run(fmt, m, n, k, not args.no_sweep, time_us)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "timing": how, "rows": rows}, f, indent=1)
    # failures: a wrong result anywhere, or the heuristic config not running (a sweep candidate that
    # does not compile is recorded, not a failure)
    bad = [r for r in rows if r["impl"].startswith("pallas") and (
        ("error" in r and "heuristic" in r["impl"])
        or ("error" not in r and (r["rel_l2"] >= 1e-3 or r["max_err_over_bound"] > 1 or not r["finite"])))]
    for r in bad:
        print("FAILED:", r, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
