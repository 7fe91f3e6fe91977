"""Producer benchmark: Pallas fused producers vs XLA-fused jnp, torch eager, torch.compile
and the device-to-device copy ceiling, side by side in one process.

Effective bandwidth = (input bytes read once + codes written once + scales) / time.
Usage: quantact bench, or python -m quantact_jax.bench.producers --out results.json [--quick]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from interop.keys import kFp8Dynamic128Sym, kFp8DynamicTokenSym, kNvfp4Dynamic  # noqa: E402
from quantact_jax import producers as P  # noqa: E402


# Short kernels run in bursts of ~1 ms leave the GPU at idle clocks: warm up for WARMUP_S of
# back-to-back calls, then size each repeat to at least MIN_REP_S (METHOD.md: warm up, repeat, median).
WARMUP_S = 0.25
MIN_REP_S = 0.025


def jax_runner(fn, args) -> tuple[Callable[[int], float], Callable[[], Any]]:
    """``(run, sync)``: ``run(n)`` times n back-to-back async JAX calls (s, wall clock to the last result)."""
    out = [fn(*args)]
    jax.block_until_ready(out[0])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            out[0] = fn(*args)
        jax.block_until_ready(out[0])
        return time.perf_counter() - t0

    return run, lambda: jax.block_until_ready(out[0])


def torch_runner(fn, args) -> tuple[Callable[[int], float], Callable[[], Any]]:
    """As :func:`jax_runner`, for torch work, timed with CUDA events on the current stream."""
    import torch

    fn(*args)
    torch.cuda.synchronize()

    def run(n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    return run, torch.cuda.synchronize


def time_jax(fn, args, iters=50, reps=5) -> float:
    """Median over ``reps`` of the mean time (s) of ``iters`` (at least MIN_REP_S worth of)
    back-to-back async calls, after a WARMUP_S warm-up (:func:`time_interleaved` of one runner)."""
    return time_interleaved({"": jax_runner(fn, args)}, reps, iters)[""]


def time_torch(fn, args, iters=50, reps=5) -> float:
    """As :func:`time_jax`, for torch work, timed with CUDA events on the current stream."""
    return time_interleaved({"": torch_runner(fn, args)}, reps, iters)[""]


def latency_s(fn: Callable[..., Any], args: tuple = (), n: int = 20, warmup: int = 3) -> float:
    """Median time (s) of one call followed by ``block_until_ready``, after ``warmup`` such calls:
    what one synchronous call costs, host dispatch included (the multi-GPU and dequant benches)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gpu_state(index: int = 0) -> dict[str, float]:
    """SM clock (MHz), power (W) and temperature (C) of a GPU now, from nvidia-smi ({} where it fails)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
        clock, power, temp = (float(v) for v in out.strip().split(","))
        return dict(sm_mhz=clock, power_w=power, temp_c=temp)
    except Exception:  # no nvidia-smi, or an unexpected format: the timing does not depend on it
        return {}


def time_interleaved(runners: dict[str, tuple[Callable[[int], float], Callable[[], Any]]], reps: int = 7,
                     iters: int = 10, state: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Median per-call time (s) of each ``(run, sync)`` runner, the runners' repeats taken in turn
    (a, b, c, a, b, c, ...) so that each sees the same GPU clock and temperature history: an fp8
    GEMM at full load runs the H100 at its power limit, where back-to-back measurements of one
    kernel taken a few seconds apart differ by up to ~10% (session 5). Ratios between runners are
    then far steadier than separate measurements. ``state``: filled with each runner's median
    :func:`gpu_state` read right after its repeats (whether the card ran at its power limit)."""
    sized = {}
    for name, (run, sync) in runners.items():  # warm up; raise iters until one repeat lasts MIN_REP_S
        t_end, n_warm, t0 = time.perf_counter() + WARMUP_S, 0, time.perf_counter()
        while time.perf_counter() < t_end or n_warm < 3:
            run(1)
            sync()
            n_warm += 1
        per_call = (time.perf_counter() - t0) / n_warm  # host-synchronised: an upper bound
        sized[name] = max(iters, int(MIN_REP_S / max(per_call, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in runners}
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, (run, _sync) in runners.items():
            times[name].append(run(sized[name]) / sized[name])
            if state is not None:
                seen[name].append(gpu_state())
    if state is not None:
        for name, samples in seen.items():
            state[name] = {k: statistics.median(s_[k] for s_ in samples) for k in (samples[0] if samples else {})
                           if all(k in s_ for s_ in samples)}
    return {name: statistics.median(ts) for name, ts in times.items()}


# Device time of a call: the summed duration of the GPU kernels it launches, read through torch's
# CUPTI profiler (process-wide, so it sees the kernels XLA, Mosaic and Triton launch for JAX as well
# as torch's). Host dispatch and launch gaps drop out: on the lent H100's host a JAX call costs
# ~50 us of dispatch, more than a decode GEMM's whole device time, so back-to-back wall time would
# measure the host there. Inside a jitted model step that dispatch is paid once per step.


def kernel_times_by_device(fn: Callable[..., Any], args: tuple = (), iters: int = 20) -> dict[int, dict[str, float]]:
    """Mean device time per call (us) of each kernel ``fn(*args)`` launches (JAX or torch), per GPU index."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def sync(out):
        torch.cuda.synchronize()
        jax.block_until_ready([o for o in jax.tree.leaves(out) if isinstance(o, jax.Array)])

    for _ in range(3):
        sync(fn(*args))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            out = fn(*args)
        sync(out)
    tot: dict[int, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            tot[int(getattr(ev, "device_index", 0))][ev.name[:60]] += getattr(ev, "device_time_total", 0.0)
    return {d: {k: v / iters for k, v in ks.items()} for d, ks in sorted(tot.items())}


def kernel_times(fn: Callable[..., Any], args: tuple = (), iters: int = 20) -> dict[str, float]:
    """Mean device time per call (us) of each kernel ``fn(*args)`` launches, summed over GPUs."""
    tot: dict[str, float] = collections.defaultdict(float)
    for ks in kernel_times_by_device(fn, args, iters).values():
        for k, v in ks.items():
            tot[k] += v
    return dict(tot)


def device_us(fn: Callable[..., Any], args: tuple = (), iters: int = 20) -> float:
    """Summed device time per call (us) of every kernel ``fn(*args)`` launches."""
    return sum(kernel_times(fn, args, iters).values())


# ---------------------------------------------------------------- peers (plain, not bit-exact)
def jnp_rms_token(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    n = ((x32 * inv).astype(x.dtype) * w).astype(jnp.float32)
    s = jnp.maximum(jnp.max(jnp.abs(n), axis=-1, keepdims=True) / 448.0, 1 / (448 * 512))
    return jnp.clip(n / s, -448, 448).astype(jnp.float8_e4m3fn), s


def jnp_quant_token(x):
    x32 = x.astype(jnp.float32)
    s = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 448.0, 1 / (448 * 512))
    return jnp.clip(x32 / s, -448, 448).astype(jnp.float8_e4m3fn), s


def jnp_silu_group(x, g=128):
    """SiLU-and-mul -> fp8 with a scale per ``g`` columns (``g=None``: per token)."""
    d = x.shape[-1] // 2
    g = g or d
    gate, up = x[:, :d].astype(jnp.float32), x[:, d:].astype(jnp.float32)
    y = (gate / (1 + jnp.exp(-gate)) * up).reshape(x.shape[0], d // g, g)
    s = jnp.maximum(jnp.max(jnp.abs(y), axis=-1, keepdims=True) / 448.0, 1 / (448 * 512))
    return jnp.clip(y / s, -448, 448).astype(jnp.float8_e4m3fn).reshape(x.shape[0], d), s[..., 0]


def torch_rms_token(x, w, eps=1e-6):
    import torch
    x32 = x.float()
    inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    n = ((x32 * inv).to(x.dtype) * w).float()
    s = torch.clamp(n.abs().amax(-1, keepdim=True) / 448.0, min=1 / (448 * 512))
    return torch.clamp(n / s, -448, 448).to(torch.float8_e4m3fn), s


def torch_quant_token(x):
    import torch
    x32 = x.float()
    s = torch.clamp(x32.abs().amax(-1, keepdim=True) / 448.0, min=1 / (448 * 512))
    return torch.clamp(x32 / s, -448, 448).to(torch.float8_e4m3fn), s


def torch_silu_group(x, g=128):
    import torch
    d = x.shape[-1] // 2
    g = g or d
    gate, up = x[:, :d].float(), x[:, d:].float()
    y = (torch.nn.functional.silu(gate) * up).view(x.shape[0], d // g, g)
    s = torch.clamp(y.abs().amax(-1, keepdim=True) / 448.0, min=1 / (448 * 512))
    return torch.clamp(y / s, -448, 448).to(torch.float8_e4m3fn).view(x.shape[0], d), s


# ---------------------------------------------------------------- cases
def cases(quick: bool):
    rms = [(16384, 4096), (8192, 8192)] if not quick else [(4096, 4096)]
    silu = [(8192, 2 * 14336)] if not quick else [(2048, 2 * 14336)]
    out = []
    for m, k in rms:
        out.append(dict(name="rms_norm+per-token fp8", m=m, k=k, kind="rms", key=kFp8DynamicTokenSym,
                        bytes=m * k * 2 + k * 2 + m * k + m * 4))
        out.append(dict(name="quant per-token fp8", m=m, k=k, kind="quant", key=kFp8DynamicTokenSym,
                        bytes=m * k * 2 + m * k + m * 4))
        out.append(dict(name="rms_norm+nvfp4", m=m, k=k, kind="rms", key=kNvfp4Dynamic,
                        bytes=m * k * 2 + k * 2 + m * k // 2 + m * k // 16))
    for m, k2 in silu:
        d = k2 // 2
        out.append(dict(name="silu_and_mul+group-128 fp8", m=m, k=k2, kind="silu", key=kFp8Dynamic128Sym,
                        bytes=m * k2 * 2 + m * d + m * d // 128 * 4))
    # the MLP block's producers (hidden 4096, intermediate 14336, per-token keys) at M = 4096 and 16
    for m in ((2048,) if quick else (4096, 16)):
        out.append(dict(name="silu_and_mul+per-token fp8", m=m, k=2 * 14336, kind="silu", key=kFp8DynamicTokenSym,
                        bytes=m * 2 * 14336 * 2 + m * 14336 + m * 4))
    if not quick:
        out.append(dict(name="rms_norm+per-token fp8", m=16, k=4096, kind="rms", key=kFp8DynamicTokenSym,
                        bytes=16 * 4096 * 3 + 4096 * 2 + 16 * 4))
        out.append(dict(name="quant per-token fp8", m=16, k=4096, kind="quant", key=kFp8DynamicTokenSym,
                        bytes=16 * 4096 * 3 + 16 * 4))
    return out


def row_configs(k: int) -> dict[str, "P.ProducerConfig"]:
    """Per-row-scale variants swept with --configs: whole rows, a chunk loop, a program per chunk."""
    out = {}
    for bm, nw in ((1, 8), (1, 16), (2, 16)):
        out[f"whole_bm{bm}_w{nw}"] = P.ProducerConfig(block_m=bm, num_warps=nw)
    for chunk in (512, 1024, 2048, 4096):
        if k % chunk:
            continue
        for bm, nw in ((1, 4), (1, 8), (1, 16), (1, 32), (2, 8)):  # more warps: fewer rows in flight, L2 reuse
            out[f"loop{chunk}_bm{bm}_w{nw}"] = P.ProducerConfig(block_m=bm, num_warps=nw, row_chunk=chunk)
        for nw in (4, 8):
            out[f"split{chunk}_w{nw}"] = P.ProducerConfig(block_m=1, num_warps=nw, row_chunk=chunk, split=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", action="store_true", help="also sweep ProducerConfig (block_m, num_warps)")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        print("no GPU: the producer benchmark needs one (kernels would run in interpret mode)")
        return 0
    import torch

    dev = torch.device("cuda")
    # copy ceiling
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_(0, 255)
    t_copy = time_torch(lambda b: b.clone(), (buf,), iters=20)
    copy_bw = 2 * buf.numel() / t_copy
    del buf
    results = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                   jax=jax.__version__, torch=torch.__version__, python=platform.python_version(),
                   copy_tb_s=copy_bw / 1e12, cases=[])
    print(f"copy ceiling: {copy_bw / 1e12:.2f} TB/s")
    for c in cases(args.quick):
        if args.only not in c["name"]:
            continue
        m, k, kind, key = c["m"], c["k"], c["kind"], c["key"]
        xt = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        wt = (1 + 0.1 * torch.randn(k if kind != "silu" else 1, device=dev)).to(torch.bfloat16)
        x = jnp.asarray(np.asarray(xt.float().cpu()), jnp.bfloat16)
        w = jnp.asarray(np.asarray(wt.float().cpu()), jnp.bfloat16)
        kw = {"global_scale": np.float32(448 * 6 / 6.0)} if key.is_fp4 else {}
        row = dict(name=c["name"], shape=[m, k], key=str(key), bytes=c["bytes"])
        if kind == "rms":
            ours = jax.jit(lambda x, w: P.rms_norm_quant(x, w, key, **kw)[0])
            peers = {"xla_jnp": (jax.jit(jnp_rms_token), (x, w)), "torch_eager": (torch_rms_token, (xt, wt))}
            peers["torch_compile"] = (torch.compile(torch_rms_token), (xt, wt))
            ours_args = (x, w)
        elif kind == "quant":
            ours = jax.jit(lambda x: P.quantize(x, key, **kw))
            peers = {"xla_jnp": (jax.jit(jnp_quant_token), (x,)), "torch_eager": (torch_quant_token, (xt,)),
                     "torch_compile": (torch.compile(torch_quant_token), (xt,))}
            ours_args = (x,)
        else:
            ours = jax.jit(lambda x: P.silu_and_mul_quant(x, key))
            g = key.group_size or None  # None: per token
            jf, tf = functools.partial(jnp_silu_group, g=g), functools.partial(torch_silu_group, g=g)
            peers = {"xla_jnp": (jax.jit(jf), (x,)), "torch_eager": (tf, (xt,)), "torch_compile": (torch.compile(tf), (xt,))}
            ours_args = (x,)
        if key.is_fp4:  # peers implement fp8 per-token; an fp4 row is reported against the copy ceiling only
            peers = {}
        # device time (the kernels alone; a JAX call's host dispatch is ~50 us on the lent host, which
        # would swamp the small shapes); wall time is kept alongside as *_wall_us
        t = device_us(ours, ours_args) * 1e-6
        row["quantact_wall_us"] = time_jax(ours, ours_args) * 1e6
        row["quantact_us"] = t * 1e6
        row["quantact_tb_s"] = c["bytes"] / t / 1e12
        for name, (fn, a) in peers.items():
            tp = device_us(fn, a) * 1e-6
            row[f"{name}_us"] = tp * 1e6
            row[f"{name}_tb_s"] = c["bytes"] / tp / 1e12
            row[f"speedup_vs_{name}"] = tp / t
        row["fraction_of_copy"] = row["quantact_tb_s"] * 1e12 / copy_bw
        if args.configs:
            sweep = {}
            per_row = kind != "rms" and key in (kFp8DynamicTokenSym,)
            variants = row_configs(k // 2 if kind == "silu" else k) if per_row else {
                f"bm{bm}_w{nw}": P.ProducerConfig(block_m=bm, num_warps=nw) for bm in (1, 2, 4, 8) for nw in (4, 8, 16)}
            for name_, cfg in variants.items():
                if kind == "rms":
                    f = jax.jit(lambda x, w, cfg=cfg: P.rms_norm_quant(x, w, key, config=cfg, **kw)[0])
                elif kind == "quant":
                    f = jax.jit(lambda x, cfg=cfg: P.quantize(x, key, config=cfg, **kw))
                else:
                    f = jax.jit(lambda x, cfg=cfg: P.silu_and_mul_quant(x, key, config=cfg))
                try:
                    sweep[name_] = round(device_us(f, ours_args), 2)
                except Exception as e:  # a config may not compile (registers, shared memory)
                    sweep[name_] = f"error: {type(e).__name__}"
            row["config_best"] = min((v, n) for n, v in sweep.items() if isinstance(v, float))
            row["config_sweep_us"] = sweep
        results["cases"].append(row)
        print(json.dumps(row), flush=True)
    hdr = f"{'op':28s} {'shape':>14s} {'ours TB/s':>9s} {'%copy':>6s} {'xla':>6s} {'compile':>7s} {'eager':>6s}"
    print(hdr)
    for r in results["cases"]:
        print(f"{r['name']:28s} {str(tuple(r['shape'])):>14s} {r['quantact_tb_s']:9.2f} {100 * r['fraction_of_copy']:6.1f}"
              f" {r.get('xla_jnp_tb_s', float('nan')):6.2f} {r.get('torch_compile_tb_s', float('nan')):7.2f}"
              f" {r.get('torch_eager_tb_s', float('nan')):6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
