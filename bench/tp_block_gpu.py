#!/usr/bin/env python
"""Tensor-parallel fused MLP block on all visible GPUs against the fused block on one GPU.

The block of ``quantact_jax.bench.block`` (residual add + RMSNorm -> fp8 -> gate/up [2I, H] ->
SiLU-and-mul -> fp8 -> down [H, I], bf16 activations; H=4096, I=14336, M = 16 and 4096):

- ``single``: ``jax.jit(quantact_jax.mlp.mlp)`` on GPU 0 (the ``quantact_fused`` row of the block bench);
- ``tp``: ``jax.jit(quantact_jax.tp.tp_mlp)`` on the mesh ``("dp", "tp")`` of shape ``(1, n)`` (all
  visible GPUs): weights placed by ``tp.shard_mlp_block`` (gate/up split on N, down on K), the input
  and residual replicated, one all-reduce (``psum`` of the f32 partials of the down projection).

Keys: ``token`` = kFp8DynamicTokenSym (per-channel weights, the block bench's key). Under TP no shard
holds whole rows of the down projection's input, so its per-token scales are shard-local
(``shard_local_scales=True``: vLLM's behaviour, a different quantization than one GPU's);
``group`` = kFp8Dynamic128Sym (128x128 weight blocks): the groups stay inside a shard, so everything
before the psum is bit-identical to one GPU.

Checks (exit 1 if one fails):

1. ``residual``: bit-identical to one GPU.
2. ``shard_ref``: the TP output equals each shard's computation run on GPU 0 from that GPU's own weight
   shards (``addressable_shards``: the same kernels on the same shapes), partials summed in f32 in
   shard order: bit-exact for 2 GPUs (``a + b == b + a``), else within the reordering bound of n f32
   partials (``2 (n - 1) u sum|p_i|``) plus one bf16 step where that tips the cast.
3. ``vs_single`` (``group`` only: same down-projection input as one GPU): within the f32 summation-order
   bound of ``tests/sharding_bounds.py`` (``2 (K/128 + 2) u sum|y||w|``: the down projection's K blocks
   summed in shard order + psum instead of one K loop) plus one bf16 step where that tips the cast.
   For ``token`` the TP result is another quantization: only its relative L2 distance is reported.
4. ``accuracy``: against the block in f32 (dequantized weights, unquantized activations), the TP output
   is as accurate as one GPU's: ``rel_l2(tp) <= 1.1 rel_l2(single)``. Both errors are fp8 quantization
   noise (~4%): TP quantizes the same way (``group``) or with per-token scales no coarser than one GPU's
   (``token``: a shard's amax is at most the row's), and each GPU accumulates only half of K; the 10%
   covers the spread between two noise realizations (the ``--cpu`` smoke run: 1.01).

Times (per call; GPU):

- ``wall_us`` (**primary**, what a caller sees): ``quantact_jax.bench.producers.time_jax``: back-to-back
  async calls, synchronised (``block_until_ready``) at the end of each repeat; median of 5 repeats. Host
  dispatch of a multi-device program is included (at M=16 it can dominate).
- ``latency_us``: median of calls each followed by ``block_until_ready`` (dispatch + device + sync).
- device time: summed kernel durations per GPU from torch's CUPTI profiler (process-wide: XLA's,
  Mosaic's, Triton's and NCCL's kernels; launch gaps excluded):
  ``quantact_jax.bench.producers.kernel_times_by_device``. For TP: ``device_us`` = the busiest GPU's
  sum (its all-reduce kernel included: the
  transfer plus any wait for the peer), ``device_us_total`` = the sum over GPUs (the GPU time paid),
  ``collective_us`` = the all-reduce kernels' share per GPU.
- ``speedup`` = single / tp and ``efficiency`` = single / (tp * n), on wall and on device time.

Usage (a 2-GPU host; the NCCL variables keep NVLink multicast off and are also set here by default)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python bench/tp_block_gpu.py --out gpu_out/tp_block.json

Fewer than 2 GPUs: a message, exit 0. ``--cpu``: a smoke run of the script on 2 virtual CPU devices
(small shapes, Pallas interpret mode, no device time; the times are not performance figures).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _mgpu_env  # noqa: E402,F401  (before JAX starts: NCCL multicast off, --cpu devices)

import argparse
import dataclasses
import datetime
import json
import platform
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # sharding_bounds: the bounds the sharding tests use

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sharding_bounds import close_after_cast, fast_accum_k, mm_bound, partial_sum_bound, rel_l2, single_mlp

from interop import keys as K
from quantact_jax import producers as PR
from quantact_jax import reference as R
from quantact_jax import tp as T
from quantact_jax.bench.producers import kernel_times_by_device, latency_s, time_jax
from quantact_jax.mlp import make_block, mlp

GPU_SHAPE, GPU_MS = (4096, 14336), (16, 4096)  # (hidden, intermediate), token counts
CPU_SHAPE, CPU_MS = (256, 512), (16,)
KEYS = {"token": (K.kFp8DynamicTokenSym, True), "group": (K.kFp8Dynamic128Sym, False)}  # key, shard_local_scales
ACCURACY_SLACK = 1.1
COLLECTIVE = re.compile(r"nccl|all.?reduce|collective", re.I)


# ---------------------------------------------------------------- measurement
def measure(fn: Callable[..., Any], args: tuple, *, gpu: bool) -> dict[str, Any]:
    """Wall time, latency and (GPU) device time per call of ``fn(*args)``, in us."""
    wall = time_jax(fn, args, iters=20) if gpu else time_jax(fn, args, iters=3, reps=3)
    row: dict[str, Any] = {"wall_us": wall * 1e6, "latency_us": latency_s(fn, args, 20 if gpu else 3) * 1e6}
    if gpu:
        try:
            per = kernel_times_by_device(fn, args)
        except Exception as e:  # noqa: BLE001  (the profiler is a measurement, not a check: keep the wall times)
            row["device_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            return row
        busy = {d: sum(ks.values()) for d, ks in per.items()}
        row.update(device_us=max(busy.values()) if busy else None, device_us_total=sum(busy.values()),
                   gpus_profiled=len(busy),  # GPUs on which the profiler saw kernels
                   device_us_per_gpu=busy,
                   collective_us={d: sum(v for k, v in ks.items() if COLLECTIVE.search(k)) for d, ks in per.items()},
                   kernels_us={d: {k: round(v, 2) for k, v in sorted(ks.items(), key=lambda kv: -kv[1])[:12]}
                               for d, ks in per.items()})
    return row


# ---------------------------------------------------------------- references
def f32_block(block, x, r):
    """The block in f32: dequantized weights, unquantized activations (HIGHEST-precision dots)."""
    gu, dn = block.gate_up, block.down
    w1 = R.dequantize_codes(gu.weight, gu.weight_scale, gu.weight_key, gu.weight.shape)
    w2 = R.dequantize_codes(dn.weight, dn.weight_scale, dn.weight_key, dn.weight.shape)
    z = x.astype(jnp.float32) + r.astype(jnp.float32)
    n = z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + block.eps) * block.norm_weight.astype(jnp.float32)
    h = jnp.matmul(n, w1.T, precision=jax.lax.Precision.HIGHEST)
    g, u = jnp.split(h, 2, axis=-1)
    return jnp.matmul(jax.nn.silu(g) * u, w2.T, precision=jax.lax.Precision.HIGHEST)


def local_blocks(tpb: T.TPMLPBlock, mesh: Mesh, dev0) -> list:
    """Each TP shard's block (the weight shards its GPU holds), copied to ``dev0``, in mesh order."""
    def on(d):
        def shard(a):
            return jax.device_put(next(s.data for s in a.addressable_shards if s.device == d), dev0)
        return jax.tree.map(shard, tpb.block)

    return [on(d) for d in mesh.devices.flat]


def shard_reference(blocks, x, r):
    """``tp_mlp``'s per-shard body run shard after shard on one device: the partials (f32) summed in
    shard order, the down bias added once, cast. Returns ``(out, residual, partials)``."""
    b0 = blocks[0]
    a, res = PR.rms_norm_quant(x, b0.norm_weight, layer=b0.gate_up, residual=r, eps=b0.eps)
    parts = []
    for b in blocks:
        h = b.gate_up(a)  # [M, 2I/n] = [gate_i | up_i]
        y = PR.silu_and_mul_quant(h, layer=b.down)  # per-token keys: scales of this shard's slice
        parts.append(dataclasses.replace(b.down, bias=None)(y, out_dtype=jnp.float32))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    if b0.down.bias is not None:
        out = out + b0.down.bias.astype(jnp.float32)
    return out.astype(x.dtype), (x if res is None else res), parts


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool((np.ascontiguousarray(a).view(np.uint8) == np.ascontiguousarray(b).view(
        np.uint8)).all())


# ---------------------------------------------------------------- one case
def run_case(name: str, block, tpb, mesh: Mesh, m: int, *, shard_local: bool, gpu: bool, seed: int = 0) -> dict:
    n = mesh.devices.size
    hidden, inter = block.hidden, block.intermediate
    dev0 = mesh.devices.flat[0]
    rng = np.random.default_rng(seed + m)
    x = jax.device_put(jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32), jnp.bfloat16), dev0)
    r = jax.device_put(jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32), jnp.bfloat16), dev0)
    rep = NamedSharding(mesh, P("dp"))  # rows over dp (size 1), replicated over tp
    x_tp, r_tp = jax.device_put(x, rep), jax.device_put(r, rep)
    single_fn = jax.jit(mlp)
    tp_fn = jax.jit(lambda b, a, res: T.tp_mlp(b, a, mesh, P("dp"), residual=res, shard_local_scales=shard_local))
    row: dict[str, Any] = {"key": name, "m": m, "hidden": hidden, "intermediate": inter, "n_gpus": n,
                           "shard_local_scales": shard_local, "checks": {}, "errors": {}}
    t0 = time.perf_counter()
    s_out, s_res = jax.block_until_ready(single_fn(block, x, r))
    t_out, t_res = jax.block_until_ready(tp_fn(tpb, x_tp, r_tp))
    row["compile_s"] = time.perf_counter() - t0
    checks = row["checks"]
    checks["residual"] = {"ok": _bits_equal(t_res, s_res), "bit_exact": _bits_equal(t_res, s_res)}

    blocks = local_blocks(tpb, mesh, dev0)
    ref_out, ref_res, parts = jax.jit(shard_reference)(blocks, x, r)
    ok, why = close_after_cast(t_out, ref_out, partial_sum_bound(parts), min_equal=None)
    exact = _bits_equal(t_out, ref_out)
    checks["shard_ref"] = {"ok": ok and _bits_equal(ref_res, s_res), "bit_exact": exact,
                           "rel_l2": rel_l2(t_out, ref_out), **({"why": why} if why else {})}
    del blocks, parts

    if not shard_local:  # the same down-projection input as one GPU: only the sum order differs
        y = jax.jit(lambda a, res: single_mlp(block, a, res)[3])(x, r)
        fast = fast_accum_k(block.down.input_key, m, inter, n)  # 0 for 1x128 groups (per-128-K promotion)
        bound = mm_bound(y, block.down, inter // 128, fast_k=fast)
        ok, why = close_after_cast(t_out, s_out, bound, min_equal=None if fast else 0.95)
        checks["vs_single"] = {"ok": ok, "bit_exact": _bits_equal(t_out, s_out), "rel_l2": rel_l2(t_out, s_out),
                               "equal_fraction": float((np.asarray(t_out) == np.asarray(s_out)).mean()),
                               **({"why": why} if why else {})}
        del y, bound
    else:
        checks["vs_single"] = {"ok": True, "informational": True, "bit_exact": _bits_equal(t_out, s_out),
                               "rel_l2": rel_l2(t_out, s_out),
                               "note": "shard-local per-token scales: another quantization than one GPU's"}

    exact_out = jax.jit(f32_block)(block, x, r)
    e_single, e_tp = rel_l2(s_out, exact_out), rel_l2(t_out, exact_out)
    checks["accuracy"] = {"ok": e_tp <= ACCURACY_SLACK * e_single + 1e-6, "rel_l2_single_vs_f32": e_single,
                          "rel_l2_tp_vs_f32": e_tp}
    del exact_out

    for label, fn, args in (("single", single_fn, (block, x, r)), ("tp", tp_fn, (tpb, x_tp, r_tp))):
        try:
            row[label] = measure(fn, args, gpu=gpu)
        except Exception as e:  # noqa: BLE001  (record and go on)
            row["errors"][label] = f"{type(e).__name__}: {str(e)[:300]}"
    s, t = row.get("single", {}), row.get("tp", {})
    for what in ("wall_us", "device_us"):
        if s.get(what) and t.get(what):
            row[f"speedup_{what[:-3]}"] = s[what] / t[what]
            row[f"efficiency_{what[:-3]}"] = s[what] / (t[what] * n)
    row["ok"] = all(c["ok"] for c in checks.values()) and not row["errors"]
    return row


# ---------------------------------------------------------------- report
def _f(v, fmt="9.1f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else f"{'-':>{fmt.split('.')[0]}}"


def table(res: dict) -> str:
    n = res["n_gpus"]
    lines = [f"TP MLP block on {n} x {res['device']} vs one (H={res['hidden']}, I={res['intermediate']}; "
             "per call, us; primary: wall)",
             f"{'key':>5} {'M':>5} | {'1 GPU wall':>10} {f'{n} GPU wall':>10} {'speedup':>7} {'eff':>5} | "
             f"{'1 GPU dev':>9} {'TP dev':>9} {'of which':>8} {'speedup':>7} {'eff':>5} | {'1 GPU lat':>9} {'TP lat':>8} | checks"]
    for c in res["cases"]:
        s, t = c.get("single", {}), c.get("tp", {})
        coll = max(t["collective_us"].values()) if t.get("collective_us") else None
        checks = " ".join(f"{k}:{'ok' if v['ok'] else 'FAIL'}{'=' if v.get('bit_exact') else ''}"
                          for k, v in c.get("checks", {}).items())
        if c.get("errors"):
            checks += " ERR " + "; ".join(f"{k}: {v[:80]}" for k, v in c["errors"].items())
        for label, r in (("1 GPU", s), ("TP", t)):
            if r.get("device_error"):
                checks += f" ({label} device time failed: {r['device_error'][:80]})"
        if t.get("gpus_profiled", n) < n:  # then the TP device time misses a GPU's kernels
            checks += f" (profiler saw kernels on {t['gpus_profiled']} of {n} GPUs)"
        lines.append(f"{c['key']:>5} {c['m']:>5} | {_f(s.get('wall_us'), '10.1f')} {_f(t.get('wall_us'), '10.1f')} "
                     f"{_f(c.get('speedup_wall'), '7.2f')} {_f(c.get('efficiency_wall'), '5.2f')} | "
                     f"{_f(s.get('device_us'))} {_f(t.get('device_us'))} {_f(coll, '8.1f')} "
                     f"{_f(c.get('speedup_device'), '7.2f')} {_f(c.get('efficiency_device'), '5.2f')} | "
                     f"{_f(s.get('latency_us'))} {_f(t.get('latency_us'), '8.1f')} | {checks}")
    lines.append("wall: back-to-back calls (time_jax); dev: summed kernel time, TP = busiest GPU incl. its all-reduce "
                 "('of which'); eff = single / (tp * n); lat: one call + block_until_ready; '=': bit-exact")
    if res["interpret"]:
        lines.append("(CPU, Pallas interpret mode: a smoke run of the script, not performance figures)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--cpu", action="store_true", help="smoke run on 2 virtual CPU devices (interpret mode)")
    ap.add_argument("--keys", default=",".join(KEYS), help=f"comma-separated, of {', '.join(KEYS)}")
    ap.add_argument("--m", default=None, help="comma-separated token counts (default 16,4096; --cpu: 16)")
    args = ap.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k]
    if any(k not in KEYS for k in keys):
        ap.error(f"--keys takes {', '.join(KEYS)}")
    try:
        devs = jax.devices("cpu" if args.cpu else "gpu")
    except RuntimeError:
        devs = []
    if len(devs) < 2:
        print(f"{len(devs)} {'CPU device' if args.cpu else 'GPU'}(s) visible to jax: tensor parallelism needs at "
              "least 2; nothing to do")
        return 0
    gpu = not args.cpu
    (hidden, inter), ms = (GPU_SHAPE, GPU_MS) if gpu else (CPU_SHAPE, CPU_MS)
    if args.m:
        ms = tuple(int(v) for v in args.m.split(","))
    mesh = Mesh(np.array(devs).reshape(1, len(devs)), ("dp", "tp"))
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    try:
        import torch
        versions["torch"] = torch.__version__
    except ImportError:
        pass
    res = {"device": str(devs[0].device_kind), "n_gpus": len(devs), "mesh": str(mesh), "hidden": hidden,
           "intermediate": inter, "date": datetime.date.today().isoformat(), **versions,
           "interpret": jax.default_backend() != "gpu",
           "env": {v: os.environ.get(v) for v in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                  "NVSHMEM_DISABLE_NVLS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")},
           "primary": "wall_us", "cases": []}
    t_start = time.perf_counter()
    total, i = len(keys) * len(ms), 0
    with jax.default_device(devs[0]):
        for name in keys:
            key, shard_local = KEYS[name]
            t0 = time.perf_counter()
            block = make_block(hidden, inter, key=key, seed=0)
            tpb = T.shard_mlp_block(block, mesh, "tp")
            print(f"[tp] key={name}: block built and sharded ({time.perf_counter() - t0:.1f} s)", flush=True)
            for m in ms:
                i += 1
                t0 = time.perf_counter()
                print(f"[tp {i}/{total}] key={name} M={m} H={hidden} I={inter} on {len(devs)} devices ...", flush=True)
                try:
                    row = run_case(name, block, tpb, mesh, m, shard_local=shard_local, gpu=gpu)
                except Exception as e:  # noqa: BLE001  (record and go on)
                    row = {"key": name, "m": m, "ok": False, "checks": {},
                           "errors": {"case": f"{type(e).__name__}: {str(e)[:300]}"},
                           "traceback": traceback.format_exc()}
                res["cases"].append(row)
                s, t = row.get("single", {}), row.get("tp", {})
                print(f"[tp {i}/{total}] key={name} M={m}: {'ok' if row['ok'] else 'FAIL'} "
                      f"(wall {_f(s.get('wall_us'), '.1f')} -> {_f(t.get('wall_us'), '.1f')} us, device "
                      f"{_f(s.get('device_us'), '.1f')} -> {_f(t.get('device_us'), '.1f')} us; "
                      f"{time.perf_counter() - t0:.1f} s)", flush=True)
                if not row["ok"]:
                    print("   ", json.dumps({"checks": row.get("checks"), "errors": row.get("errors")}, default=str),
                          flush=True)
            del block, tpb
    res["ok"] = all(c["ok"] for c in res["cases"])
    res["seconds"] = time.perf_counter() - t_start
    print(table(res))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(f"{'ALL CHECKS OK' if res['ok'] else 'FAILURES'} ({res['seconds']:.0f} s)"
          + (f"; wrote {args.out}" if args.out else ""))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
