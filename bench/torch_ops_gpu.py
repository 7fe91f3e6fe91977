#!/usr/bin/env python
"""Host overhead per call of the torch ops (``quantact_torch.ops``) against the same JAX op called from JAX.

On a CUDA device, for small host-bound shapes (default 16 x 4096 bf16), times per call:

- ``jax``: the very executable the torch op runs (``ops._producer_fn`` / ``ops._consumer_fn``, a cached
  ``jax.jit`` of the public ``quantact_jax`` op) called on JAX arrays;
- ``torch_op``: the public torch wrapper (``ops.quantize`` ...: key resolution, checks, custom-op dispatch,
  DLPack in and out, assembling the ``QuantizedActivation``);
- ``custom_op``: ``torch.ops.quantact.*`` called directly (no wrapper);
- ``impl``: the custom op's Python kernel without the dispatcher (checks + DLPack + the jitted call);
- ``batch``: back-to-back calls ended by one synchronisation (per call; the device time when device-bound);

- ``host_no_jit_us``: ``torch_op`` / ``impl`` / ``custom_op`` again with the jitted call stubbed (it returns
  outputs computed once): the host work that is ours (checks, plan lookup, DLPack in and out, assembly),
  without JAX's dispatch and launch;

plus, for ``quantize`` and ``scaled_mm``, ``phases``: one eager call split into its steps (argument checks,
plan lookup, device/capture check, torch->JAX stream step (an idle query; the event wait only when torch's
stream is busy), DLPack import, jitted call, each export,
dropping the JAX arrays, assembly), timed inside the call, and probes that separate PJRT's share (import
with/without a ready stream, the jitted call on a fresh import vs on ready arrays, exports right after the
launch vs after the result is ready, releasing the imported input while the kernel may still read it vs
after); and the pieces: one ``to_jax`` / ``to_torch`` per tensor and the raw ``jax.dlpack.from_dlpack`` /
``torch.from_dlpack`` (and, through private jaxlib calls, where the import time goes). Calls are
not synchronised between iterations (each call's host time is measured alone; the kernels are far shorter
than the host work at these shapes); the statistic is the median over ``--calls`` calls. ``overhead_us`` is
``torch_op - jax``; the target is ``torch_op`` overhead <= 50 us per call. Each torch result is also
checked against the JAX result bit for bit.

Writes JSON to ``--out``. Without a CUDA device (torch and JAX both needed) it prints a message and exits 0.
From the repository root::

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python bench/torch_ops_gpu.py --out gpu_out/torch_ops_gpu.json

``--cpu`` (same as ``--device cpu``) measures the same table on CPU tensors, as a *proxy* for the host
overhead: the per-call work (checks, dispatch, DLPack, jaxlib) is the same Python and C++ as on a GPU host,
minus the CUDA stream calls. Defaults there are tiny shapes (4 x 128, N = 128), since the kernels run in
Pallas interpret mode; and since a CPU export waits for the result on the host, the CPU ``overhead_us``
is ``torch_op - jax_sync`` (the JAX call plus ``block_until_ready``; ``overhead_basis`` says which)::

    PYTHONPATH=. python bench/torch_ops_gpu.py --cpu --out /tmp/torch_ops_cpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: share the GPU with torch

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_US = 50.0


def _times_us(fn, calls: int, warmup: int = 100) -> dict:
    """Median (and p10/p90) host time of one call, in microseconds, over ``calls`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {"median": statistics.median(samples), "p10": samples[len(samples) // 10],
            "p90": samples[len(samples) * 9 // 10]}


def _batch_us(fn, sync, calls: int) -> float:
    """Wall time per call of ``calls`` back-to-back calls ended by one ``sync``: the throughput view,
    which is the device time when the device, not the host, is the bottleneck."""
    sync(fn())
    t0 = time.perf_counter()
    for _ in range(calls - 1):
        fn()
    sync(fn())
    return (time.perf_counter() - t0) * 1e6 / calls


def _cases(m: int, k: int, n: int, device: str):
    """(name, torch call, custom-op call, impl call, jax call, torch result -> bytes, jax result -> bytes)."""
    import torch

    from interop.bridge import to_jax
    from interop.keys import kFp8Dynamic128Sym, kFp8DynamicTokenSym
    from quantact_torch import ops

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).bfloat16()
    x2 = torch.randn(m, 2 * k, device=device, generator=g).bfloat16()
    res = torch.randn(m, k, device=device, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(k, device=device, generator=g)).bfloat16()
    wt = (torch.randn(n, k, device=device, generator=g) * 8).to(torch.float8_e4m3fn)
    ws = torch.full((1,), 0.01, device=device)
    interp = device == "cpu"
    tok, g128 = kFp8DynamicTokenSym, kFp8Dynamic128Sym
    stok, sg128 = str(tok), str(g128)
    xj, x2j, resj, wj, wtj, wsj = (to_jax(t) for t in (x, x2, res, w, wt, ws))
    qa = ops.quantize(x, tok)
    qd, qs = qa.data, qa.scale_storage()
    qdj, qsj = to_jax(qd), to_jax(qs)
    quant = ops._producer_fn("quant", stok, 0.0, interp)
    rms = ops._producer_fn("rms", stok, 1e-6, interp)
    silu = ops._producer_fn("silu", sg128, 0.0, interp)
    mm = ops._consumer_fn(stok, None, "bfloat16", None, interp)
    bf16 = torch.bfloat16
    data = lambda out: out.data
    return [
        (f"quantize {m}x{k} per-token fp8",
         lambda: ops.quantize(x, tok), lambda: ops._quantize_op(x, stok, None, None, None),
         lambda: ops._produce("quant", stok, x, None, None, None, None, None, 0.0),
         lambda: quant(xj, None, None, None, None, None), data, lambda out: out[0]),
        (f"rms_norm_quant+residual {m}x{k} per-token fp8",
         lambda: ops.rms_norm_quant(x, w, tok, residual=res),
         lambda: ops._rms_norm_quant_op(x, w, stok, 1e-6, res, None, None, None),
         lambda: ops._produce("rms", stok, x, w, res, None, None, None, 1e-6),
         lambda: rms(xj, wj, resj, None, None, None), lambda out: out[0].data, lambda out: out[0]),
        (f"silu_and_mul_quant {m}x{2 * k} group-128 fp8",
         lambda: ops.silu_and_mul_quant(x2, g128), lambda: ops._silu_and_mul_quant_op(x2, sg128, None, None, None),
         lambda: ops._produce("silu", sg128, x2, None, None, None, None, None, 0.0),
         lambda: silu(x2j, None, None, None, None, None), data, lambda out: out[0]),
        (f"scaled_mm {m}x{k} @ {n}x{k} per-token x per-tensor fp8",
         lambda: ops.scaled_mm(qa, wt, ws, input_quant_key=tok),
         lambda: ops._scaled_mm_op(qd, qs, stok, bf16, wt, ws, None, None, None, None),
         lambda: ops._consume(qd, qs, stok, bf16, wt, ws, None, None, None, None),
         lambda: mm(qdj, qsj, wtj, wsj, None, None), lambda out: out, lambda out: out),
    ]


@contextlib.contextmanager
def _jit_stubbed():
    """The ops with their jitted call replaced by a stub that returns the call's outputs computed once
    (ready): what is left of a call is its host work without JAX's dispatch and the kernel launch --
    our Python, the checks, the DLPack import of the activation and the exports."""
    import functools

    import jax

    from quantact_torch import ops

    real = ops._producer_fn, ops._consumer_fn

    def stubbed(make):
        @functools.cache
        def fn(*a):
            f, memo = make(*a), []

            def stub(*args):
                if not memo:
                    memo.append(jax.block_until_ready(f(*args)))
                return memo[0]
            return stub
        return fn

    ops.clear_plan_cache()
    ops._producer_fn, ops._consumer_fn = stubbed(real[0]), stubbed(real[1])
    try:
        yield
    finally:
        ops._producer_fn, ops._consumer_fn = real
        ops.clear_plan_cache()


def _phase_table(fn, calls: int, warmup: int = 100) -> dict:
    """``fn()`` returns perf_counter stamps taken between the phases of one call; median per phase."""
    for _ in range(warmup):
        fn()
    rows = [fn() for _ in range(calls)]
    names = rows[0][0]
    out = {}
    for i, name in enumerate(names):
        d = sorted((r[1][i + 1] - r[1][i]) * 1e6 for r in rows)
        out[name] = statistics.median(d)
    tot = sorted((r[1][-1] - r[1][0]) * 1e6 for r in rows)
    out["sum_of_medians"] = sum(v for k, v in out.items())
    out["total_median"] = statistics.median(tot)
    return out


def _phases(m: int, k: int, n: int, device: str, calls: int) -> dict:
    """Where one eager call's host time goes, for ``quantize`` (one input, two outputs) and
    ``scaled_mm`` (activation data + scale, cached weight views, one output): the steps the eager
    direct path of :mod:`quantact_torch.ops` runs, in its order, with the same internal functions
    (``_resolve`` ... ``_producer_plan`` ... the bridge's stream wait, jaxlib's import, the jitted
    call, jaxlib's export, the activation), each stamped with ``perf_counter`` inside one call.
    ``total_median`` is the whole sequence (compare with ``torch_op_us``: the difference is the glue
    between the steps); ``sum_of_medians`` adds the phases' medians.

    Plus single-step probes that separate what JAX/PJRT does from what the bridge asks of it:
    ``import_ready_us`` (jaxlib import without a stream: no ready event) vs ``import_with_stream_us``
    (with JAX's external-ready stream, as the op does for x, after the stream wait); ``jit_ready_us``
    (the jitted call on arrays ready long ago: the ``jax`` baseline) vs ``jit_fresh_import_us`` (on
    an x imported just before, as in the op), ``jit_fresh_import_no_stream_us`` (imported as ready, the
    op's idle-stream path), ``jit_fresh_import_synced_us`` (the same after ``block_until_ready``) and
    ``jit_fresh_jax_buffer_synced_us`` (a fresh buffer that JAX allocated itself: tells a DLPack view's
    cost from any new buffer's); ``export_ready_us`` (the two exports after the result
    is ready) vs the ``export_0`` / ``export_1`` phases (right after the launch). Measured on an H100
    (jax 0.11.2, torch 2.11; us): jit_ready 43.9, jit_fresh_import 73.0, jit_fresh_import_no_stream
    62.6, jit_fresh_import_synced 61.9, jit_fresh_jax_buffer_synced 69.5 -- a fresh JAX-owned buffer
    is as slow as a fresh import, so the jitted call's extra cost on a new input (~18-29 us) is PJRT's
    per-new-buffer cost, not DLPack's (a ready stream on the import adds ~10 us of it: 73.0 vs 62.6).

    ``stream_wait_torch_to_jax`` is the op's torch -> JAX stream step (``bridge._import_stream``): the
    idle query of torch's current stream, plus the event record and wait when it has work pending
    (in these back-to-back calls it is usually idle, so ``x`` is then imported as ready). The probes
    ``stream_query_us`` (the query alone) and ``*_busy_stream_us`` / ``*_always_wait_us`` /
    ``*_busy_at_return`` (:func:`_busy_stream_probes`, CUDA) time the ops with torch's stream busy
    and with the idle skip off."""
    import jax
    import torch

    from interop import bridge
    from interop.keys import kFp8DynamicTokenSym
    from quantact_torch import ops

    pc = time.perf_counter
    tok = kFp8DynamicTokenSym
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(m, k, device=device, generator=g).bfloat16()
    wt = (torch.randn(n, k, device=device, generator=g) * 8).to(torch.float8_e4m3fn)
    ws = torch.full((1,), 0.01, device=device)
    dev = x.device
    ops.quantize(x, tok)  # compiles, probes the device
    ep = bridge._endpoint(dev)
    api = bridge._lean_api()
    if ep is None or api is None:
        return {"error": f"lean DLPack path off ({bridge.lean_dlpack_status()}): no phase breakdown"}
    cuda, C = ep.cuda, torch._C
    jdev, dl = ep.jax_device, ep.dl_type
    out: dict = {}

    names_q = ("wrapper_args_checks", "plan_lookup", "device_capture_check", "stream_wait_torch_to_jax",
               "import_x", "jit_call", "export_0", "export_1", "release_jax_arrays", "assemble_activation")

    def quant_once():
        t0 = pc()  # the wrapper's path for a known plan (no layer, no scales): _direct, then the plan
        if not ops._direct(x):
            raise RuntimeError("phases: expected a plain eager call")
        key, static = tok, None
        t1 = pc()
        plan = ops._known_plan("quant", key, x, None, None, 0.0)
        if plan is None:
            raise RuntimeError("phases: the quantize plan is not cached")
        t2 = pc()
        if cuda and (C._cuda_getDevice() != plan.cuda or C._cuda_isCurrentStreamCapturing()):
            raise RuntimeError("phases: expected the input's device current and no capture")
        t3 = pc()
        s = bridge._import_stream(ep, dev) if cuda else None
        t4 = pc()
        xj = api.imp(api.t2d(x), jdev, s, False, dl)
        t5 = pc()
        outs = plan.fn(xj, None, None, None, None, None)
        t6 = pc()
        ptr = bridge._current_stream_ptr(ep) if cuda else None
        o0 = api.d2t(api.exp(outs[0], stream=ptr))
        t7 = pc()
        o1 = api.d2t(api.exp(outs[1], stream=ptr))
        t8 = pc()
        del xj, outs  # the imported x (its PJRT view) and the output Arrays (the capsules keep the buffers)
        t9 = pc()
        ops._planned_activation(plan, key, x, (o0, o1), static)
        t10 = pc()
        return names_q, (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10)

    qa = ops.quantize(x, tok)
    names_m = ("known_plan_lookup", "scale_storage_and_direct", "device_capture_check", "weight_view_cache",
               "stream_wait_torch_to_jax", "import_x_and_scale", "jit_call", "export_0", "release_jax_arrays")

    def mm_once():
        t0 = pc()  # the wrapper's path for an activation whose metadata a plan knows (ops._mm_known_plan)
        _, plan = ops._mm_known_plan(qa, tok, wt, ws, None, None, None, None)
        t1 = pc()
        if plan is None:
            raise RuntimeError("phases: the scaled_mm plan is not known")
        data, storage = qa.data, qa.scale_storage()
        if not ops._direct(data, storage, wt, ws, None, None):
            raise RuntimeError("phases: expected a plain eager call")
        t2 = pc()
        if cuda and (C._cuda_getDevice() != plan.cuda or C._cuda_isCurrentStreamCapturing()):
            raise RuntimeError("phases: expected the input's device current and no capture")
        t3 = pc()
        wj, wsj = (ops._views.get(ops._view_key(t)) for t in (wt, ws))
        if wj is None or wsj is None:
            raise RuntimeError("phases: the weight views are not cached (unaligned CPU buffer?)")
        wj, wsj = wj[0], wsj[0]
        t4 = pc()
        s = bridge._import_stream(ep, dev) if cuda else None
        t5 = pc()
        dj = api.imp(api.t2d(data), jdev, s, False, dl)
        sj = api.imp(api.t2d(storage), jdev, None, False, dl)
        t6 = pc()
        y = plan.fn(dj, sj, wj, wsj, None, None)
        t7 = pc()
        api.d2t(api.exp(y, stream=bridge._current_stream_ptr(ep) if cuda else None))
        t8 = pc()
        del dj, sj, y
        t9 = pc()
        return names_m, (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9)

    for _ in range(2):  # fills the view cache; the second call stores the known plan
        ops.scaled_mm(qa, wt, ws, input_quant_key=tok)
    out["quantize"] = _phase_table(quant_once, calls)
    out["quantize"]["torch_op_us"] = _times_us(lambda: ops.quantize(x, tok), calls)["median"]
    out["scaled_mm"] = _phase_table(mm_once, calls)
    out["scaled_mm"]["torch_op_us"] = _times_us(lambda: ops.scaled_mm(qa, wt, ws, input_quant_key=tok),
                                                calls)["median"]

    # single-step probes (see the docstring)
    plan = ops._producer_plan("quant", str(tok), x, None, None, None, None, None, 0.0)
    xr = jax.block_until_ready(api.imp(api.t2d(x), jdev, None, False, dl))
    probes = {"import_ready_us": _times_us(lambda: api.imp(api.t2d(x), jdev, None, False, dl), calls)["median"]}
    if cuda:
        probes["import_with_stream_us"] = _times_us(
            lambda: api.imp(api.t2d(x), jdev, bridge._wait_for_torch(ep, dev), False, dl), calls)["median"]
        probes["stream_wait_us"] = _times_us(lambda: bridge._wait_for_torch(ep, dev), calls)["median"]
        cur = torch.cuda.current_stream(dev)
        probes["stream_query_us"] = _times_us(lambda: ep.query(cur), calls)["median"] if ep.query else None
        probes.update(_busy_stream_probes(x, qa, wt, ws, tok, calls))
        probes["current_stream_ptr_us"] = _times_us(lambda: bridge._current_stream_ptr(ep), calls)["median"]
        probes["torch_cuda_current_stream_us"] = _times_us(lambda: torch.cuda.current_stream(dev), calls)["median"]
    probes["jit_ready_us"] = _times_us(lambda: plan.fn(xr, None, None, None, None, None), calls)["median"]

    def jit_fresh():
        s = bridge._wait_for_torch(ep, dev) if cuda else None
        xj = api.imp(api.t2d(x), jdev, s, False, dl)
        t0 = pc()
        plan.fn(xj, None, None, None, None, None)
        return ("jit_fresh_import",), (t0, pc())

    probes["jit_fresh_import_us"] = _phase_table(jit_fresh, calls)["jit_fresh_import"]

    # where a fresh input's extra cost in the jitted call comes from (the op's jit_call phase runs
    # ~11 us above jit_ready_us on an H100): an import as ready (no stream: the op's path when torch's
    # stream is idle), the same after block_until_ready (its definition event complete), and a fresh
    # JAX-owned buffer of the same shape (not DLPack: the previous call's ready output copied by XLA).
    # H100 answer (us): ready 43.9, fresh import 73.0, no stream 62.6, synced 61.9, fresh JAX buffer
    # synced 69.5: a new input buffer costs PJRT ~18-26 us in the call, DLPack-imported or JAX-owned.
    def jit_on(make, sync):
        def once():
            a = make()
            if sync:
                a.block_until_ready()
            t0 = pc()
            plan.fn(a, None, None, None, None, None)
            return ("jit",), (t0, pc())
        return once

    fresh_ready = lambda: api.imp(api.t2d(x), jdev, None, False, dl)
    copy = jax.jit(lambda a: a + 0)  # a new buffer, owned by JAX
    probes["jit_fresh_import_no_stream_us"] = _phase_table(jit_on(fresh_ready, False), calls)["jit"]
    probes["jit_fresh_import_synced_us"] = _phase_table(jit_on(fresh_ready, True), calls)["jit"]
    probes["jit_fresh_jax_buffer_synced_us"] = _phase_table(jit_on(lambda: copy(xr), True), calls)["jit"]
    ptr = (lambda: bridge._current_stream_ptr(ep)) if cuda else (lambda: None)

    def export_ready():
        outs = jax.block_until_ready(plan.fn(xr, None, None, None, None, None))
        t0 = pc()
        p = ptr()
        for o in outs:
            api.d2t(api.exp(o, stream=p))
        return ("export_ready",), (t0, pc())

    probes["export_ready_us"] = _phase_table(export_ready, calls)["export_ready"]

    def release(after_sync: bool):
        def once():
            s = bridge._wait_for_torch(ep, dev) if cuda else None
            xj = api.imp(api.t2d(x), jdev, s, False, dl)
            outs = plan.fn(xj, None, None, None, None, None)
            if after_sync:
                jax.block_until_ready(outs)
            t0 = pc()
            del xj
            return ("release",), (t0, pc())
        return once

    # dropping the imported x while the kernel that reads it may still run (what the op does) vs
    # after it finished: PJRT may have to defer the release (a host callback on the stream)
    probes["release_import_after_launch_us"] = _phase_table(release(False), calls)["release"]
    probes["release_import_after_sync_us"] = _phase_table(release(True), calls)["release"]
    out["probes"] = probes
    return out


def _busy_stream_probes(x, qa, wt, ws, tok, calls: int) -> dict:
    """The torch ops on CUDA with torch's current stream busy at each call (a ``torch.cuda._sleep``
    spin queued just before, outside the timing: the op must make JAX wait for it) and, on an idle
    stream, with the idle-stream skip turned off (every call records and waits for an event, as
    before the skip): ``*_busy_stream_us`` / ``*_always_wait_us`` against ``torch_op_us`` (idle
    stream: no events). ``busy_at_return`` is the fraction of busy calls whose spin was still running
    when the op returned (so the op did see a busy stream)."""
    import torch

    from interop import bridge
    from quantact_torch import ops

    pc = time.perf_counter
    ops_ = {"quantize": lambda: ops.quantize(x, tok),
            "scaled_mm": lambda: ops.scaled_mm(qa, wt, ws, input_quant_key=tok)}
    out: dict = {}
    for name, op in ops_.items():
        busy = []

        def once(op=op, busy=busy, name=name):
            torch.cuda._sleep(200_000)  # ~0.1 ms of spin, shorter than one host iteration: no backlog
            t0 = pc()
            op()
            t1 = pc()
            busy.append(not torch.cuda.current_stream().query())
            return (name,), (t0, t1)

        out[f"{name}_busy_stream_us"] = _phase_table(once, calls)[name]
        out[f"{name}_busy_at_return"] = sum(busy) / max(len(busy), 1)
        torch.cuda.synchronize()
        prev = bridge._lean_state["idle_skip"]
        bridge._lean_state["idle_skip"] = False
        try:
            out[f"{name}_always_wait_us"] = _times_us(op, calls)["median"]
        finally:
            bridge._lean_state["idle_skip"] = prev
    return out


def _bytes(t) -> bytes:
    import numpy as np
    import torch

    if isinstance(t, torch.Tensor):
        return t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return np.asarray(t).tobytes()


def _bridge_pieces(calls: int, device: str) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from interop.bridge import (
        arrays_to_torch,
        lean_dlpack_status,
        tensors_to_jax,
        to_jax,
        to_torch,
    )

    t = torch.randn(16, 4096, device=device).bfloat16()
    a = jax.device_put(jnp.ones((16, 4096), jnp.bfloat16), jax.devices("cpu" if device == "cpu" else "gpu")[0])
    a.block_until_ready()
    t2 = torch.randn(4096, device=device).bfloat16()
    out = {
        "to_jax_tensor_us": _times_us(lambda: to_jax(t, copy=False), calls)["median"],
        "raw_jax_from_dlpack_us": _times_us(lambda: jax.dlpack.from_dlpack(t), calls)["median"],
        "to_torch_array_us": _times_us(lambda: to_torch(a, copy=False), calls)["median"],
        "raw_torch_from_dlpack_us": _times_us(lambda: torch.from_dlpack(a), calls)["median"],
        # the ops' lean path: one call imports (exports) all of an op's tensors, one stream sync per call
        "tensors_to_jax_1_us": _times_us(lambda: tensors_to_jax((t,), joint=True, checked=True), calls)["median"],
        "tensors_to_jax_2_us": _times_us(lambda: tensors_to_jax((t, t2), joint=True, checked=True), calls)["median"],
        "arrays_to_torch_1_us": _times_us(lambda: arrays_to_torch((a,), device=t.device, checked=True),
                                          calls)["median"],
        "lean_dlpack": lean_dlpack_status(),
    }
    if device == "cpu":
        return out
    # where the import time goes (private jaxlib API: measured here only to guide the next optimisation)
    try:
        from interop import bridge

        ep = bridge._endpoint(t.device)
        out["current_stream_us"] = _times_us(lambda: torch.cuda.current_stream(t.device), calls)["median"]
        if ep is not None:  # the lean path's one torch -> JAX stream wait per call
            out["lean_stream_sync_us"] = _times_us(lambda: bridge._wait_for_torch(ep, t.device), calls)["median"]
    except Exception as e:  # noqa: BLE001
        out["lean_breakdown_error"] = f"{type(e).__name__}: {e}"
    try:
        from jax._src.lib import _jax

        dev = jax.devices("gpu")[t.device.index]
        stream = dev.get_stream_for_external_ready_events()
        out["stream_query_us"] = _times_us(lambda: dev.get_stream_for_external_ready_events(), calls)["median"]
        out["torch_dlpack_export_with_stream_us"] = _times_us(lambda: t.__dlpack__(stream=stream), calls)["median"]
        out["jaxlib_buffer_from_capsule_us"] = _times_us(
            lambda: _jax.dlpack_managed_tensor_to_buffer(t.__dlpack__(stream=stream), dev, stream, None, 2),
            calls)["median"] - out["torch_dlpack_export_with_stream_us"]
    except Exception as e:  # noqa: BLE001 -- the private API differs between jaxlib versions
        out["breakdown_error"] = f"{type(e).__name__}: {e}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="path of the JSON report")
    ap.add_argument("--m", type=int, default=None, help="tokens (default 16 on cuda: host-bound; 4 on cpu)")
    ap.add_argument("--k", type=int, default=None, help="hidden size (default 4096 on cuda, 128 on cpu)")
    ap.add_argument("--n", type=int, default=None, help="scaled_mm output features (default 1024 on cuda, 128 on cpu)")
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per measurement (default 2000)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the CPU proxy of the host overhead (interpret-mode kernels, tiny default shapes)")
    ap.add_argument("--cpu", action="store_true", help="same as --device cpu")
    args = ap.parse_args(argv)
    if args.cpu:
        args.device = "cpu"
    cpu = args.device == "cpu"
    args.m = args.m or (4 if cpu else 16)
    args.k = args.k or (128 if cpu else 4096)
    args.n = args.n or (128 if cpu else 1024)

    import torch

    reason = None
    if args.device == "cpu":
        pass
    elif not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    else:
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError as e:
            reason = f"jax has no GPU backend ({e})"
    if reason:
        print(f"torch_ops_gpu: {reason}; nothing to measure (run this on a GPU host)")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": reason}, f, indent=1)
        return 0

    import jax

    report: dict = {
        "env": {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (host-overhead proxy)"},
        "calls": args.calls, "target_us": TARGET_US, "shape": {"m": args.m, "k": args.k, "n": args.n},
        "overhead_basis": "jax_sync" if cpu else "jax", "ops": {},
    }
    rc = 0
    cases = _cases(args.m, args.k, args.n, args.device)
    sync_torch = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    for name, t_op, c_op, impl, j_op, t_bytes, j_bytes in cases:
        try:
            same = _bytes(t_bytes(t_op())) == _bytes(j_bytes(j_op()))
            row = {
                "jax_us": _times_us(j_op, args.calls),
                "jax_sync_us": _times_us(lambda j=j_op: jax.block_until_ready(j()), args.calls),
                "torch_op_us": _times_us(t_op, args.calls),
                "custom_op_us": _times_us(c_op, args.calls),
                "impl_us": _times_us(impl, args.calls),
                "batch_us": {"jax": _batch_us(j_op, jax.block_until_ready, args.calls),
                             "torch_op": _batch_us(t_op, lambda _: sync_torch(), args.calls)},
                "bit_identical_to_jax": same,
            }
            row["overhead_us"] = row["torch_op_us"]["median"] - row[f"{report['overhead_basis']}_us"]["median"]
            row["meets_target"] = row["overhead_us"] <= TARGET_US
            rc |= not same
        except Exception as e:  # noqa: BLE001 -- record the failure, measure the rest
            row = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            rc = 1
        report["ops"][name] = row
    # the same ops with the jitted call stubbed (its outputs computed once): the host work left
    try:
        with _jit_stubbed():
            for name, t_op, c_op, impl, *_ in cases:
                row = report["ops"][name]
                if "error" not in row:
                    row["host_no_jit_us"] = {"torch_op": _times_us(t_op, args.calls)["median"],
                                             "impl": _times_us(impl, args.calls)["median"],
                                             "custom_op": _times_us(c_op, args.calls)["median"]}
    except Exception as e:  # noqa: BLE001
        report["host_no_jit_error"] = f"{type(e).__name__}: {e}"
    try:
        report["phases"] = _phases(args.m, args.k, args.n, args.device, args.calls)
    except Exception as e:  # noqa: BLE001
        report["phases"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    try:
        report["bridge"] = _bridge_pieces(args.calls, args.device)
    except Exception as e:  # noqa: BLE001
        report["bridge"] = {"error": f"{type(e).__name__}: {e}"}

    print(f"quantact_torch.ops host time per call on {report['env']['device']} (jax {jax.__version__}, "
          f"torch {torch.__version__}; median of {args.calls} calls, us)")
    if cpu:
        print("CPU PROXY: interpret-mode kernels; overhead = torch op - (jax call + block_until_ready)")
    print(f"{'op':<50} {'jax':>7} {'jax+sync':>8} {'torch op':>9} {'custom op':>10} {'impl':>7} {'overhead':>9} "
          f"{'batch':>7}  ok")
    for name, r in report["ops"].items():
        if "error" in r:
            print(f"{name:<50} ERROR {r['error']}")
            continue
        print(f"{name:<50} {r['jax_us']['median']:7.1f} {r['jax_sync_us']['median']:8.1f} {r['torch_op_us']['median']:9.1f} "
              f"{r['custom_op_us']['median']:10.1f} {r['impl_us']['median']:7.1f} {r['overhead_us']:9.1f} "
              f"{r['batch_us']['torch_op']:7.1f}  {'bits=' if r['bit_identical_to_jax'] else 'BITS DIFFER'}"
              f"{'' if r['meets_target'] else f' (> {TARGET_US:.0f} us target)'}")
    nj = [(n, r["host_no_jit_us"]) for n, r in report["ops"].items() if "host_no_jit_us" in r]
    if nj:
        print("with the jitted call stubbed (host work only: checks, DLPack in/out, assembly), us:")
        for name, h in nj:
            print(f"  {name:<50} torch op {h['torch_op']:7.1f}  impl {h['impl']:7.1f}  custom op {h['custom_op']:7.1f}")
    ph = report["phases"]
    if "error" in ph:
        print("phases: ERROR", ph["error"])
    else:
        for op in ("quantize", "scaled_mm"):
            print(f"phases of one eager {op} call (median us):",
                  ", ".join(f"{k} {v:.1f}" for k, v in ph[op].items()))
        print("probes (us):", ", ".join(f"{k} {v:.1f}" for k, v in ph["probes"].items()))
    print("bridge pieces (us):", json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                              for k, v in report["bridge"].items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
