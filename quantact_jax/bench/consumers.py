"""Consumer benchmark: Pallas scaled_mm vs torch._scaled_mm (cuBLASLt), XLA's fp8 dot with [N, K]
weights and the bf16 GEMM, side by side in one process. TFLOP/s = 2*M*N*K / time.

Decode rows (M <= 64) are device time, the summed kernel durations of a call (CUPTI through torch's
profiler; the lent H100's host spends ~50 us dispatching each JAX call, more than the kernels take);
the large shapes are back-to-back wall time, where dispatch hides behind the kernels, with every
method's repeats taken in turn (``time_interleaved``: the H100 runs fp8 GEMMs at its power limit,
and separate measurements of one kernel a few seconds apart differed by up to ~10%).

Usage: python -m quantact_jax.bench.consumers --out results.json [--configs]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from interop.bridge import to_jax  # noqa: E402
from interop.keys import kFp8Dynamic128Sym, kFp8DynamicTensorSym, kFp8DynamicTokenSym  # noqa: E402
from quantact_jax import consumers as C  # noqa: E402
from quantact_jax import mosaic_gemm as MG  # noqa: E402
from quantact_jax import producers as P  # noqa: E402
from quantact_jax.bench.producers import device_us, jax_runner, time_interleaved, torch_runner  # noqa: E402

SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 28672, 4096), (4096, 4096, 14336),
          (1, 8192, 8192), (16, 8192, 8192), (64, 8192, 8192)]


M = MG.MosaicConfig
# --configs: the Mosaic GEMM's tile orders and schedules (2-CTA multicast clusters, delayed release)
MOSAIC_SWEEP = [M(), M(grid_tile_width=4), M(grid_tile_width=16), M(grid_minor_n=True),
                M(grid_minor_n=True, grid_tile_width=16), M(cluster="m", grid_tile_width=4), M(cluster="m"),
                M(cluster="m", grid_tile_width=16), M(cluster="n"), M(cluster="n", grid_minor_n=True),
                M(delay_release=1)]
D = MG.DecodeConfig  # the swap-AB decode kernel (M <= 64), promoted; clusters share the activation tile
DECODE_SWEEP = [D(tile_k=tk, stages=st, split_k=sk, num_wgs=w, promote=True, cluster=c)
                for tk, st in ((256, 4), (128, 8)) for w in (1, 2) for sk in (1, 2) for c in (1, 2)]
# ... and the main kernel with one 64-row M tile (no swap, so no output transpose; rows past M zero-filled)
DECODE_SWEEP += [M(tile_m=64, tile_n=tn, tile_k=tk, stages=st, epi_tile_m=64, epi_tile_n=min(tn, 64), cluster=c)
                 for tn, tk, st in ((32, 128, 8), (64, 128, 6), (32, 256, 4), (64, 256, 3)) for c in (None, "n")]


def _device_s(fn, args) -> float:
    """Device time (s) per call: see the module docstring."""
    return device_us(fn, args) * 1e-6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", action="store_true", help="sweep a few tile configs per shape")
    ap.add_argument("--sweep-only", action="store_true", help="with --configs: the sweep and cuBLASLt row-wise only")
    ap.add_argument("--shapes", default="", help="MxNxK,... (default: the issue's shapes)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    if jax.default_backend() != "gpu":
        print("no GPU: the consumer benchmark needs one")
        return 0
    import torch

    dev = torch.device("cuda")
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), jax=jax.__version__,
               torch=torch.__version__, cases=[])
    for m, n, k in shapes:
        flops = 2 * m * n * k
        xt = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        wt = (torch.randn(n, k, device=dev) * 0.05)
        w8 = (wt / (wt.abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)  # [N, K]
        sw = (wt.abs().amax(1, keepdim=True) / 448).float()  # [N, 1]
        x = to_jax(xt)
        wj, swj = to_jax(w8), to_jax(sw)
        lean = args.configs and args.sweep_only
        blocks = k % 128 == 0 and n % 128 == 0
        jax_fns: dict[str, tuple] = {}  # name -> (fn, args): every method, timed together below
        # ours, pre-quantized activations (the consumer alone)
        for name, key, ws in (("token_x_channel", kFp8DynamicTokenSym, swj),
                              ("tensor_x_tensor", kFp8DynamicTensorSym, swj.max().reshape(1))):
            jax_fns[f"quantact_{name}"] = (jax.jit(lambda qa, w, s, key=key: C.scaled_mm(qa, w, s, input_quant_key=key)),
                                           (P.quantize(x, key), wj, ws))
        qa = P.quantize(x, kFp8DynamicTokenSym)
        if m >= 4096 and not lean:  # the Triton kernel alone, for the record
            jax_fns["quantact_triton_token_x_channel"] = (jax.jit(lambda qa, w, s: C.scaled_mm(
                qa, w, s, input_quant_key=kFp8DynamicTokenSym, backend="triton")), (qa, wj, swj))
        if blocks and not lean:
            sb = jnp.ones((n // 128, k // 128), jnp.float32) * 0.01
            jax_fns["quantact_block128"] = (jax.jit(lambda qa, w, s: C.scaled_mm(qa, w, s, input_quant_key=kFp8Dynamic128Sym)),
                                            (P.quantize(x, kFp8Dynamic128Sym), wj, sb))
        if not lean:
            xla = jax.jit(lambda a, sa, w, sw: (jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())),
                                                                    preferred_element_type=jnp.float32)
                                                * sw.reshape(1, -1) * sa).astype(jnp.bfloat16))
            jax_fns["xla_fp8_dot"] = (xla, (qa.data, qa.scale, wj, swj))
        sweep_names = {}
        if args.configs:
            for cfg in MOSAIC_SWEEP if m > 64 else DECODE_SWEEP:
                name = str(dataclasses.astuple(cfg))
                if not (MG.supports(m, n, k, jnp.bfloat16, cfg) if isinstance(cfg, M)
                        else MG.decode_supports(m, n, k, jnp.bfloat16, cfg)):
                    continue
                sweep_names[f"cfg {name}"] = name
                jax_fns[f"cfg {name}"] = (jax.jit(lambda qa, w, s, cfg=cfg: C.scaled_mm(
                    qa, w, s, input_quant_key=kFp8DynamicTokenSym, config=cfg, backend="mosaic")), (qa, wj, swj))
        # cuBLASLt through torch._scaled_mm (b = w8.T is column-major, as cuBLASLt wants)
        x8 = (xt.float() / (xt.float().abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
        sx = (xt.float().abs().amax(1, keepdim=True) / 448).float()
        peers = {
            "cublas_rowwise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16),
            "cublas_tensorwise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx.max(), scale_b=sw.max(),
                                                          out_dtype=torch.bfloat16),
            # the Mosaic kernel accumulates like use_fast_accum=True (docs/numerics.md): both are peers
            "cublas_rowwise_fast": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(),
                                                            out_dtype=torch.bfloat16, use_fast_accum=True),
            "cublas_tensorwise_fast": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx.max(), scale_b=sw.max(),
                                                               out_dtype=torch.bfloat16, use_fast_accum=True),
            "cublas_bf16": lambda: xt @ wt.to(torch.bfloat16).t(),
        }
        if lean:
            peers = {"cublas_rowwise": peers["cublas_rowwise"]}
        elif blocks:
            sa_blk = torch.ones(k // 128, m, device=dev).t()  # [M, K/128], M-major as cuBLASLt wants
            sb_blk = torch.ones(n // 128, k // 128, device=dev) * 0.01
            peers["cublas_block128"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa_blk, scale_b=sb_blk.t(),
                                                                out_dtype=torch.bfloat16)
        row: dict = dict(shape=[m, n, k], timing="device" if m <= 64 else "interleaved wall")
        times: dict[str, float] = {}
        if m <= 64:  # device time, one method after the other (module docstring)
            for name, (fn, fargs) in [*jax_fns.items(), *((nm, (fn, ())) for nm, fn in peers.items())]:
                try:
                    times[name] = _device_s(fn, fargs)
                except Exception as e:  # e.g. a config this problem does not fit, or no block scaling in cuBLASLt
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        else:
            runners = {}
            for name, make, fn, fargs in [*((nm, jax_runner, f, a) for nm, (f, a) in jax_fns.items()),
                                          *((nm, torch_runner, f, ()) for nm, f in peers.items())]:
                try:
                    runners[name] = make(fn, fargs)
                except Exception as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            row["gpu_state"] = {}
            times = time_interleaved(runners, state=row["gpu_state"])
        for name, t in times.items():
            if name in sweep_names:
                row.setdefault("config_sweep_us", {})[sweep_names[name]] = t * 1e6
            else:
                row[f"{name}_us"] = t * 1e6
                row[f"{name}_tflops"] = flops / t / 1e12
        if row.get("config_sweep_us"):
            best = min((v, c) for c, v in row["config_sweep_us"].items())
            print(f"  sweep {m}x{n}x{k}: best {best[1]} {best[0]:.1f} us", flush=True)
        res["cases"].append(row)
        print(json.dumps(row), flush=True)
    cols = [("ours tok", "quantact_token_x_channel"), ("ours tens", "quantact_tensor_x_tensor"),
            ("ours blk", "quantact_block128"), ("cuBLAS row", "cublas_rowwise"), ("tens", "cublas_tensorwise"),
            ("blk", "cublas_block128"), ("row fast", "cublas_rowwise_fast"),
            ("tens fast", "cublas_tensorwise_fast"), ("XLA fp8", "xla_fp8_dot"), ("bf16", "cublas_bf16")]
    for unit, pick in (("TFLOP/s", lambda r: r["shape"][0] > 64), ("us", lambda r: r["shape"][0] <= 64)):
        print(f"{'M x N x K':>20s} " + " ".join(f"{c:>10s}" for c, _ in cols) + f"  ({unit})")
        for r in filter(pick, res["cases"]):
            vals = [r.get(f"{key}_{'tflops' if unit == 'TFLOP/s' else 'us'}", float("nan")) for _, key in cols]
            print(f"{'x'.join(map(str, r['shape'])):>20s} " + " ".join(f"{v:10.1f}" for v in vals))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
