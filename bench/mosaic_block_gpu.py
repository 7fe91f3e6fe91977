"""GPU check + benchmark of the Mosaic block-scaled fp8 GEMM (quantact_jax.mosaic_block_gemm).

1. Correctness at a few shapes (vs quantact_jax.reference.scaled_mm, per-block fast-accum
   tolerance of tests/test_mosaic_block_gemm.py), bf16 and f32 outputs, with and without bias.
2. TFLOP/s of several configs vs cuBLASLt's block-scaled ``torch._scaled_mm`` (1x128 activation
   groups, 128x128 weight blocks) and the Triton block-scaled consumer at 4096^3,
   4096x28672x4096 and 4096x4096x14336, in one process. Prints a table, writes JSON (--out).

Usage: PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/mosaic_block_gpu.py --out res.json
       [--quick] (the heuristic config and the SCHEDULES variants only) [--skip-check]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from interop.bridge import to_jax, to_torch  # noqa: E402
from interop.keys import kFp8Dynamic128Sym  # noqa: E402
from quantact_jax import consumers as C  # noqa: E402
from quantact_jax import mosaic_block_gemm as MB  # noqa: E402
from quantact_jax import producers as P  # noqa: E402
from quantact_jax.bench.producers import jax_runner, time_interleaved, torch_runner  # noqa: E402

SHAPES = [(4096, 4096, 4096), (4096, 28672, 4096), (4096, 4096, 14336)]
CHECK_SHAPES = [(200, 384, 640), (5, 256, 256), (1031, 1536, 1024), (4096, 4096, 4096)]
Cfg = MB.MosaicBlockConfig
# the schedules that overlap the tensor core with the promotion (mosaic_block_gemm docstring),
# side by side with the default (the heuristic at large M); --quick times and checks these
SCHEDULES = [
    Cfg(),                                                  # default: 128x256, wg 64x(2x128), 1 accumulator
    Cfg(wg_n=64, n_sub=4, n_acc=2),                         # 128x256, wg 64x(4x64), 2 accumulators
    Cfg(wg_n=64, n_sub=2, n_acc=2, stages=5),               # 128x128, wg 64x(2x64), 2 accumulators
    # ping-pong (re-added after the session-4 hang at 4096^3, a rendezvous paired across output
    # tiles against the pipeline's per-tile quiesce; now paired within each tile: CPU-verified only)
    Cfg(pingpong=True),                                     # warpgroups take turns per sub-tile
    Cfg(wg_n=64, n_sub=4, n_acc=2, pingpong=True),          # ... and turns per K block
    Cfg(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4, pingpong=True),  # 128x256, wg 128x(2x64), turns
    # 2-CTA clusters (mosaic_block_gemm docstring, "Clusters"; CPU-verified only, never run on a GPU):
    # "m": two 128x256 tiles stacked along M share the B tile by TMA multicast; "n": side by side
    # along N, sharing the A tile and its sa slice
    Cfg(cluster="m"),
    Cfg(cluster="n"),
    Cfg(pingpong=True, cluster="m"),
    Cfg(pingpong=True, cluster="n"),
]
SWEEP = SCHEDULES + [
    Cfg(grid_tile_width=4), Cfg(grid_tile_width=16), Cfg(grid_minor_n=True),
    Cfg(stages=3, epi_slots=2),
    Cfg(n_sub=1, stages=5),                            # 128x128, wg 64x128
    Cfg(n_sub=1, stages=6, epi_slots=1),
    Cfg(wg_m=128, wg_n=64, n_sub=1, stages=5),         # 128x128, wg 128x64
    Cfg(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4),  # 128x256, wg 128x(2x64)
    Cfg(wg_dim="n", n_sub=1, stages=6),                # 64x256
    Cfg(wg_n=64, n_sub=2, n_acc=2, stages=5),          # 128x128, wg 64x(2x64), 2 accumulators
    Cfg(wg_n=64, n_sub=4, n_acc=2, stages=3, epi_slots=2),
    Cfg(pingpong=True, grid_tile_width=16),
    # clusters with the other schedules, and a later stage release (CPU-verified only)
    Cfg(wg_n=64, n_sub=4, n_acc=2, cluster="m"),
    Cfg(wg_n=64, n_sub=4, n_acc=2, pingpong=True, cluster="m"),
    Cfg(wg_n=64, n_sub=4, n_acc=2, pingpong=True, cluster="n"),
    Cfg(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4, pingpong=True, cluster="m"),
    Cfg(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4, pingpong=True, cluster="n"),
    Cfg(pingpong=True, cluster="m", grid_tile_width=16),
    Cfg(pingpong=True, cluster="n", grid_minor_n=True),
    Cfg(pingpong=True, delay_release=1),               # a stage held one K step longer (body waits anyway)
    Cfg(pingpong=True, cluster="m", delay_release=1),
]


def check(res, configs) -> bool:
    import test_mosaic_block_gemm as T  # the test file's problem builder and tolerance

    ok = True

    def checked(name: str, run) -> None:
        """Run one check; record "ok" or the failure under ``name``."""
        nonlocal ok
        try:
            run()
            res["check"][name] = "ok"
        except Exception as e:
            ok = False
            res["check"][name] = f"FAIL {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        print(f"check {name}: {res['check'][name]}", flush=True)

    for (m, n, k) in CHECK_SHAPES:
        for bias in (False, True):
            for out_dtype in (jnp.bfloat16, jnp.float32):
                def run(m=m, n=n, k=k, bias=bias, out_dtype=out_dtype):
                    qa, wq, ws, b = T._problem(m, n, k, bias)
                    T._check(T._run(qa, wq, ws, b, out_dtype), qa, wq, ws, b, out_dtype)
                checked(f"{m}x{n}x{k} bias={bias} {jnp.dtype(out_dtype).name}", run)
    # every timed config once, on a shape with partial tiles
    m, n, k = 300, 768, 1152
    qa, wq, ws, b = T._problem(m, n, k, True, seed=1)
    for cfg in configs:
        cfg = MB.fit_smem(cfg, k)
        checked(f"{m}x{n}x{k} {dataclasses.astuple(cfg)}",
                lambda cfg=cfg: T._check(T._run(qa, wq, ws, b, jnp.bfloat16, cfg), qa, wq, ws, b, jnp.bfloat16))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="time the heuristic config and SCHEDULES only")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        print("no GPU: this benchmark needs a Hopper GPU")
        return 0
    import torch

    dev = torch.device("cuda")
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), jax=jax.__version__,
               torch=torch.__version__, check={}, cases=[])
    configs = SCHEDULES if args.quick else SWEEP
    ok = True if args.skip_check else check(res, configs)

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    dump()
    for m, n, k in SHAPES:
        flops = 2 * m * n * k
        kb, nb = k // 128, n // 128
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
        qa = P.quantize(x, kFp8Dynamic128Sym)
        a8, sa = qa.data, jnp.asarray(qa.scale, jnp.float32).reshape(m, kb)
        wt = torch.randn(n, k, device=dev) * 0.05
        w8t = (wt / (wt.abs().amax() / 448)).to(torch.float8_e4m3fn)  # [N, K]
        sbt = (torch.rand(nb, kb, device=dev) * 0.4 + 0.8) * (wt.abs().amax() / 448)
        w8, sb = to_jax(w8t), to_jax(sbt.contiguous())
        row = dict(shape=[m, n, k], sweep={})
        cfgs = [MB.heuristic_config(m, n, k)] + [MB.fit_smem(c, k) for c in configs]
        runners = {}  # every config and peer, timed together (time_interleaved: same GPU clocks)
        for cfg in cfgs:
            key = str(dataclasses.astuple(cfg))
            if key in runners or key in row["sweep"]:
                continue
            f = jax.jit(lambda a, b, sa, sb, cfg=cfg: MB.scaled_mm_block(a, b, sa, sb, None, jnp.bfloat16, cfg))
            try:
                runners[key] = jax_runner(f, (a8, w8, sa, sb))
            except Exception as e:
                row["sweep"][key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        try:  # the Triton block-scaled consumer
            runners["triton"] = jax_runner(jax.jit(lambda qa, w, s: C.scaled_mm(
                qa, w, s, input_quant_key=kFp8Dynamic128Sym, backend="triton")), (qa, w8, sb))
        except Exception as e:
            row["triton_block_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        # cuBLASLt block-scaled: scale_a [M, K/128] M-major, scale_b [K/128, N/128] (= sb.T)
        x8t = to_torch(a8)
        sat = to_torch(sa).t().contiguous().t()
        fn = lambda: torch._scaled_mm(x8t, w8t.t(), scale_a=sat, scale_b=sbt.t(), out_dtype=torch.bfloat16)
        try:
            runners["cublas"] = torch_runner(fn, ())
            # same problem, same answer? (norm-wise; both use fast per-block promotion)
            ours = np.asarray(MB.scaled_mm_block(a8, w8, sa, sb, None, jnp.bfloat16), np.float32)
            theirs = fn().float().cpu().numpy()
            row["rel_diff_vs_cublas"] = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
        except Exception as e:
            row["cublas_block128_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["gpu_state"] = {}
        times = time_interleaved(runners, state=row["gpu_state"])
        for key, t in times.items():
            if key == "triton":
                row["triton_block_tflops"] = flops / t / 1e12
            elif key == "cublas":
                row["cublas_block128_tflops"] = flops / t / 1e12
            else:
                row["sweep"][key] = dict(us=t * 1e6, tflops=flops / t / 1e12)
                print(f"  {m}x{n}x{k} {key}: {row['sweep'][key]}", flush=True)
        good = [(v["tflops"], c) for c, v in row["sweep"].items() if "tflops" in v]
        if good:
            row["mosaic_block_best_tflops"], row["mosaic_block_best_cfg"] = max(good)
            heur = row["sweep"].get(str(dataclasses.astuple(cfgs[0])), {})
            row["mosaic_block_heuristic_tflops"] = heur.get("tflops", float("nan"))
        if "cublas_block128_tflops" in row and "mosaic_block_best_tflops" in row:
            row["best_vs_cublas"] = row["mosaic_block_best_tflops"] / row["cublas_block128_tflops"]
        res["cases"].append(row)
        print(json.dumps({k_: v for k_, v in row.items() if k_ != "sweep"}), flush=True)
        dump()
    print(f"{'M x N x K':>18s} {'heur':>8s} {'best':>8s} {'cuBLAS':>8s} {'Triton':>8s} {'best/cuBLAS':>11s}  best cfg")
    for r in res["cases"]:
        g = lambda key: r.get(key, float("nan"))
        print(f"{'x'.join(map(str, r['shape'])):>18s} {g('mosaic_block_heuristic_tflops'):8.1f} "
              f"{g('mosaic_block_best_tflops'):8.1f} {g('cublas_block128_tflops'):8.1f} {g('triton_block_tflops'):8.1f} "
              f"{g('best_vs_cublas'):11.3f}  {r.get('mosaic_block_best_cfg', '')}")
    print("correctness:", "all ok" if ok else "FAILURES (see 'check' in the JSON)")
    dump()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
