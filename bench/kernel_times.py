"""Device time of a call: the summed duration of the GPU kernels it launches, read through
torch's CUPTI profiler (process-wide, so it sees the kernels XLA, Mosaic and Triton launch for JAX
as well as torch's). Host dispatch and launch gaps drop out: on the lent H100's host a JAX call
costs ~50 us of dispatch, more than a decode GEMM's whole device time, so back-to-back wall time
would measure the host. Inside a jitted model step that dispatch is paid once per step."""

from __future__ import annotations

import collections
from typing import Any, Callable


def kernel_times(fn: Callable[..., Any], args: tuple = (), iters: int = 20) -> dict[str, float]:
    """Mean device time per call (us) of each kernel ``fn(*args)`` launches (JAX or torch)."""
    import jax
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
    tot: dict[str, float] = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            tot[ev.name[:60]] += getattr(ev, "device_time_total", 0.0)
    return {k: v / iters for k, v in tot.items()}


def device_us(fn: Callable[..., Any], args: tuple = (), iters: int = 20) -> float:
    """Summed device time per call (us) of every kernel ``fn(*args)`` launches."""
    return sum(kernel_times(fn, args, iters).values())
