"""PyTorch ops that run quantact's Pallas kernels on torch tensors, through the DLPack bridge.

``quantize``, ``rms_norm_quant``, ``silu_and_mul_quant`` (producers) and ``scaled_mm`` (consumer)
have the names, arguments and bits of :mod:`quantact_jax.producers` / :mod:`quantact_jax.consumers`
(and of the torch reference), take torch tensors (CUDA or CPU) and return torch tensors and the
vLLM-style :class:`~quantact_torch.activation.QuantizedActivation`. Each call crosses into JAX with
:func:`interop.bridge.tensors_to_jax` and back with :func:`interop.bridge.arrays_to_torch` (the
bridge's per-call path: ``to_jax`` / ``to_torch`` for several tensors, with jaxlib's DLPack calls made
directly where verified): no device copies (the outputs are the JAX kernels' own buffers; CUDA inputs
are imported with ``copy=False``, so a copy would be an error). A cached ``jax.jit`` per (op, key,
eps, platform) runs the kernel; on CPU tensors the kernels run in Pallas interpret mode on JAX's CPU
device, on CUDA tensors compiled on the tensor's GPU.

Per-call host cost
    The public wrappers call the op's implementation directly in plain eager mode, skipping torch's
    dispatcher (``_direct``: anything that must see the op -- torch.compile, modes, the profiler,
    functorch, subclasses, inputs that need a gradient -- still goes through ``torch.ops.quantact``).
    JAX views of weight-like inputs (RMSNorm weight, static scales, ``scaled_mm``'s weight, weight
    scale, bias, input scale) are cached by (pointer, shape, dtype, device, torch version counter):
    an in-place update re-imports, and an entry dies with its tensor (``clear_view_cache()`` drops all).
    Every call (direct or through the custom op) looks up a *plan* by (op, key, eps / dtypes, and
    type, shape, dtype, device and contiguity of every tensor argument): the first call with that
    metadata runs the checks (which read nothing else), finds the jitted function and the output
    shape; later calls only check the per-call state (CUDA graph capture, the current device).
    ``scaled_mm`` given an activation whose ``quant_key`` is the key object passed also finds its plan
    by the activation's metadata (``_mm_known_plan``), skipping ``as_quantized_activation``, whose
    checks read only that metadata. ``clear_plan_cache()`` drops them. Where the bridge's lean DLPack
    path is verified for the device, ``_call`` makes its jaxlib/torch calls itself (the plan did the
    checks ``tensors_to_jax`` would repeat) and falls back to ``tensors_to_jax`` on any import error. On CUDA the torch -> JAX stream wait and the exports read
    torch's current stream through ``torch._C`` and reuse one event per device and thread
    (:mod:`interop.bridge`). ``bench/torch_ops_gpu.py`` splits one call into these steps.

torch.compile
    The kernels are ``torch.library`` custom ops in namespace ``quantact`` (``torch.ops.quantact.*``)
    with fake implementations, so they trace under ``torch.compile`` (``fullgraph=True`` works). The
    ops take and return plain tensors; the key travels as ``str(key)`` (parsed back by
    :func:`interop.keys.parse_quant_key`) and these wrappers assemble the ``QuantizedActivation``.
    Producer ops return ``[data, scale storage (dynamic keys only), residual_out (with a residual)]``;
    a static key's scale storage is the caller's tensor, so it is not an output (an op output may not
    alias an input).

Streams (CUDA)
    Ordered with torch's *current stream* of the input's device, without host synchronisation: once
    per call, JAX's external-ready stream is made to wait for an event recorded on torch's current
    stream (what ``torch.Tensor.__dlpack__(stream=...)`` does), and ``x`` is imported with that stream
    as its ready point; the executable waits for ``x`` like for all its inputs, so work queued before
    the call is visible to the kernel (see ``interop.bridge.tensors_to_jax(joint=True)``). When
    torch's current stream has already finished all its work (``cudaStreamQuery``, e.g. a host-bound
    loop) there is nothing to order after, and the inputs are imported as ready, with no events. Each
    output is exported with torch's current stream, and JAX makes that stream wait for the kernel's
    completion event (so work queued after the call sees the result). Because the current stream
    waits for the kernel before the call returns, freeing or overwriting an input afterwards (on that
    stream) is safe (a cached weight view keeps its storage alive until the weight tensor dies). Inputs allocated on another stream follow torch's usual rule (``record_stream``).
    Output buffers belong to JAX; they are freed when the torch tensor dies, and JAX may reuse them
    for its next computation: every op orders JAX after torch's current stream, but other JAX work
    launched directly (not through these ops) is not ordered after torch work still reading an
    output -- synchronise or keep the output alive until that work is done. On CPU both sides
    are host-synchronous at the boundary (the export waits for the JAX result).

CUDA graphs
    A JAX executable launched from a torch op cannot be captured into a torch CUDA graph (JAX
    launches on its own stream and allocates from its own pool, outside the capture), so the ops
    raise ``RuntimeError`` when ``torch.cuda.is_current_stream_capturing()``. The custom ops carry
    ``torch.Tag.cudagraph_unsafe`` where torch has it, so ``torch.compile(mode="reduce-overhead")``
    leaves them out of its CUDA graphs instead of capturing them.

Errors
    Raised before any kernel runs, in the eager call and while tracing: ``TypeError`` (not a tensor,
    not a ``QuantKey``), :class:`~interop.errors.BridgeError` (non-contiguous, a device other than
    cpu/cuda, tensors on different devices), :class:`~interop.errors.QuantLayoutError` (dtype,
    shape, K not a multiple of the group, a static key without its scale, a scale a key does not
    take), :class:`~interop.errors.QuantKeyMismatchError` (``scaled_mm`` given an activation of another
    key; checked here and again by the JAX consumer).
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch

from interop.bridge import arrays_to_torch, export_stream, import_stream, lean_api, lean_endpoints, tensors_to_jax
from interop.dtypes import canonical_dtype, torch_dtype
from interop.errors import BridgeError, QuantLayoutError
from interop.keys import (
    QuantFormat,
    QuantKey,
    ScaleDesc,
    parse_quant_key,
)
from interop.layers import resolve_input_quant
from interop.layout import check_k_divisible, data_storage, scale_storage_shape
from quantact_torch.activation import (
    _COL_LAYOUTS,
    QuantizedActivation,
    as_quantized_activation,
    scale_from_storage,
)
from quantact_torch.reference import static_scale_storage

Tensor = torch.Tensor
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_DYNAMIC_SCALE = "{key} is dynamic (the kernel computes its scales): do not pass scale"
_CAPTURE_MSG = (
    "quantact ops cannot run during CUDA graph capture: the Pallas kernel is a JAX executable launched "
    "on JAX's own stream with JAX's allocator, which a torch CUDA graph does not record. Call the op "
    "outside the captured region (torch.compile(mode='reduce-overhead') leaves these ops out of its graphs)")
_C = torch._C


# ---------------------------------------------------------------- checks (shared by the kernels and the fakes)
def _check_tensor(t: Any, what: str, x: Tensor, dtypes=None, shape=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise BridgeError(f"{what} is on {t.device} but the input is on {x.device}; put every tensor of the "
                          "call on one device")
    if not t.is_contiguous():
        raise BridgeError(f"{what} of shape {tuple(t.shape)} has strides {tuple(t.stride())}, not contiguous: the "
                          "Pallas kernels read row-major buffers and the bridge does not copy; call .contiguous()")
    if dtypes is not None and t.dtype not in dtypes:
        raise QuantLayoutError(f"{what} has dtype {t.dtype}; expected {' or '.join(map(str, dtypes))}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise QuantLayoutError(f"{what} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _check_scalar(t: Tensor | None, what: str, x: Tensor) -> None:
    if t is not None:
        _check_tensor(t, what, x, (torch.float32,))
        if t.numel() != 1:
            raise QuantLayoutError(f"{what} must hold one value, got shape {tuple(t.shape)}")


def _check_producer(op: str, key: QuantKey, x: Tensor, weight: Tensor | None, residual: Tensor | None,
                    scale: Tensor | None, global_scale: Tensor | None, scale_ub: Tensor | None) -> int:
    """Validate a producer call; returns K (the quantized row width)."""
    _check_tensor(x, "x", x, FLOATS)
    if x.dim() < 1 or x.numel() == 0:
        raise QuantLayoutError(f"x must have at least one dimension and one element, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if op == "silu":
        if k % 2:
            raise QuantLayoutError(f"silu_and_mul needs an even last dimension [gate | up], got {k}")
        k = k // 2
    check_k_divisible(key, k)
    if key.is_fp4 and k % 2:
        raise QuantLayoutError(f"{key}: packed fp4 needs an even K, got {k}")
    if op == "rms":
        _check_tensor(weight, "weight", x, FLOATS, (k,))
        if residual is not None:
            _check_tensor(residual, "residual", x, (x.dtype,), x.shape)
    if key.scale.static:
        if scale is None:
            raise QuantLayoutError(f"{key} is static: pass its scale")
        m = math.prod(x.shape[:-1])
        sdt = torch_dtype(key.scale.storage_dtype)
        _check_tensor(scale, "scale", x, (sdt,), scale_storage_shape(key.scale, m, k))
    elif scale is not None:
        raise QuantLayoutError(_DYNAMIC_SCALE.format(key=key))
    if key.format == QuantFormat.NVFP4:
        if global_scale is None:
            raise QuantLayoutError(f"{key} needs global_scale (the quantisation multiplier 448*6/amax)")
    elif global_scale is not None:
        raise QuantLayoutError(f"{key} takes no global_scale (only NVFP4 keys do)")
    _check_scalar(global_scale, "global_scale", x)
    _check_scalar(scale_ub, "scale_ub", x)
    return k


def _check_mm(key: QuantKey, x: Tensor, x_scale: Tensor | None, orig_dtype: torch.dtype | None, weight: Tensor,
              weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor | None) -> None:
    if x_scale is None:
        _check_tensor(x, "x", x, FLOATS)
    else:
        _check_tensor(x, "activation data", x, (torch_dtype(key.dtype),))
        _check_tensor(x_scale, "activation scale storage", x, (torch_dtype(key.scale.storage_dtype),))
        if orig_dtype not in FLOATS:
            raise QuantLayoutError(f"orig_dtype must be one of {FLOATS}, got {orig_dtype}")
    _check_tensor(weight, "weight", x, (torch.float8_e4m3fn,))
    if weight.dim() != 2:
        raise QuantLayoutError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    k = x.shape[-1] * (2 if key.is_fp4 and x_scale is not None else 1)
    if k != weight.shape[1]:
        raise QuantLayoutError(f"activation K={k} does not match weight [N={weight.shape[0]}, K={weight.shape[1]}]")
    _check_tensor(weight_scale, "weight_scale", x, FLOATS)
    if bias is not None:
        _check_tensor(bias, "bias", x, FLOATS, (weight.shape[0],))
    if input_scale is not None:
        _check_tensor(input_scale, "input_scale", x, (torch.float32,))


def _refuse_capture(x: Tensor) -> None:
    if x.device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(_CAPTURE_MSG)


def _device_index(x: Tensor) -> int:
    """The CUDA device index of the call (-1 on CPU); refuses devices the bridge cannot share."""
    if x.device.type == "cpu":
        return -1
    if x.device.type != "cuda":
        raise BridgeError(f"quantact ops run on cpu and cuda tensors, got a tensor on {x.device}")
    return x.device.index


# ---------------------------------------------------------------- the JAX side (cached jitted functions)
@functools.cache
def _producer_fn(op: str, key_s: str, eps: float, interpret: bool):
    import jax

    from quantact_jax import producers

    key = parse_quant_key(key_s)

    def fn(x, weight, residual, scale, global_scale, scale_ub):
        kw = {"scale": scale, "global_scale": global_scale, "scale_ub": scale_ub, "interpret": interpret}
        res = None
        if op == "quant":
            qa = producers.quantize(x, key, **kw)
        elif op == "silu":
            qa = producers.silu_and_mul_quant(x, key, **kw)
        else:
            qa, res = producers.rms_norm_quant(x, weight, key, eps=eps, residual=residual, **kw)
        return (qa.data, *(() if key.scale.static else (qa.scale,)), *(() if res is None else (res,)))

    return jax.jit(fn)


@functools.cache
def _consumer_fn(key_s: str, weight_key_s: str | None, orig_dtype: str | None, out_dtype: str | None,
                 interpret: bool):
    import jax

    from interop.dtypes import numpy_dtype
    from quantact_jax import consumers
    from quantact_jax.activation import QuantizedActivation as JaxQA

    key = parse_quant_key(key_s)
    wkey = None if weight_key_s is None else parse_quant_key(weight_key_s)

    def fn(x, x_scale, weight, weight_scale, bias, input_scale):
        if x_scale is not None:
            k = x.shape[-1] * (2 if key.is_fp4 else 1)
            x = JaxQA(x, x_scale, numpy_dtype(orig_dtype), (*x.shape[:-1], k), key)
        return consumers.scaled_mm(x, weight, weight_scale, bias=bias, input_quant_key=key, input_scale=input_scale,
                                   weight_key=wkey, interpret=interpret,
                                   out_dtype=None if out_dtype is None else numpy_dtype(out_dtype))

    return jax.jit(fn)


# ---------------------------------------------------------------- crossing the bridge per call
#: At most this many JAX views of weight-like tensors are cached (oldest evicted first).
VIEW_CACHE_SIZE = 64
_views: dict[tuple, tuple[Any, weakref.ref]] = {}


def _view_key(t: Tensor) -> tuple:
    """What identifies a cached view: the memory (pointer, shape, dtype, device) and torch's version
    counter, so an in-place update (``w.copy_(...)``, ``w.mul_(...)``, optimizer steps) misses. Strides
    are not needed: every tensor reaching here was checked contiguous, so the shape fixes the layout."""
    return (t.data_ptr(), t.shape, t.dtype, t.device, t._version)


def _remember(key: tuple, t: Tensor, a: Any) -> None:
    """Cache JAX view ``a`` of ``t`` (zero-copy views only) until the tensor that owns the memory
    (``t``, or the base ``t`` is a view of) dies or the entry is evicted.

    While cached, the view keeps the torch storage alive (the DLPack capsule holds it), so no other
    tensor can be allocated at that address: a hit by key is a view of the very same memory, and
    reads what is there now. The entry holds only a weak reference to the owner; its callback drops
    the entry, so the cache never outlives the weights it describes (and an evicted entry takes its
    callback with it). The view must be of a *detached* alias of ``t``: a capsule of ``t`` itself
    would hold its TensorImpl, which keeps the Python tensor (the owner) alive, so the callback would
    never run."""
    if a.unsafe_buffer_pointer() != t.data_ptr():
        return  # a copy (unaligned CPU buffer): caching it would go stale
    owner = t if t._base is None else t._base

    def drop(ref: weakref.ref, key: tuple = key) -> None:
        entry = _views.get(key)
        if entry is not None and entry[1] is ref:
            _views.pop(key, None)

    while len(_views) >= VIEW_CACHE_SIZE:
        _views.pop(next(iter(_views)), None)
    _views[key] = (a, weakref.ref(owner, drop))


def clear_view_cache() -> None:
    """Drop every cached JAX view of a weight (releases the torch storage they keep alive)."""
    _views.clear()


def _call(plan: _Plan, x: Tensor, args: tuple[Tensor | None, ...]) -> tuple:
    """Run the plan's jitted ``fn(x, *args)`` on torch tensors already validated by the op's checks;
    returns JAX's outputs as torch tensors. No device copies: the tensors are imported zero-copy (a
    CPU buffer that is not 64-byte aligned is copied by XLA, with a ``BridgeCopyWarning``; on CUDA a
    copy is an error) and the outputs are the executable's own buffers.

    ``args[i]`` for ``i`` in ``plan.cached`` (weights, weight scales, bias, static scales) are looked
    up in the view cache first. The tensors cross as ``tensors_to_jax(joint=True)`` would cross them,
    with ``x`` first: on CUDA JAX's stream waits for torch's current stream once, through ``x``'s
    ready event, and the executable waits for ``x`` like for all its inputs, so every tensor --
    including weights imported by an earlier call -- is read after the torch work queued before this
    call. The outputs come back as ``arrays_to_torch`` brings them: torch's current stream waits for
    each of them. Where the bridge's lean path is verified for the device, the call makes the
    bridge's lean calls itself (:data:`interop.bridge.lean_endpoints`: the op's plan already checked
    what ``tensors_to_jax`` checks, and the generic loops cost microseconds per call); any import
    error there (e.g. an unaligned CPU buffer) reruns the crossing through ``tensors_to_jax``, which
    copies, warns or raises as documented."""
    ep = lean_endpoints.get(plan.device)
    if ep is None:
        return _call_bridged(plan, x, args)
    imp, exp, t2d, d2t = lean_api()
    jdev, dl = ep.jax_device, ep.dl_type
    try:
        xj = imp(t2d(x), jdev, import_stream(ep, plan.device) if ep.cuda else None, False, dl)
        if plan.present:
            cached = plan.cached
            jargs = list(args)
            for i in plan.present:
                t = args[i]
                if i in cached:
                    k = _view_key(t)
                    hit = _views.get(k)
                    if hit is not None:
                        jargs[i] = hit[0]
                        continue
                    # a new TensorImpl on the same storage: the capsule must not keep the owner alive
                    a = jargs[i] = imp(t2d(t.detach()), jdev, None, False, dl)
                    _remember(k, t, a)
                else:
                    jargs[i] = imp(t2d(t), jdev, None, False, dl)
        else:
            jargs = args
    except Exception:  # noqa: BLE001 -- an import refused (unaligned CPU buffer ...): the bridge's own path
        return _call_bridged(plan, x, args)
    outs = plan.fn(xj, *jargs)
    stream = export_stream(ep) if ep.cuda else None
    if type(outs) is tuple:
        return tuple([d2t(exp(a, stream)) for a in outs])
    return (d2t(exp(outs, stream)),)


def _call_bridged(plan: _Plan, x: Tensor, args: tuple[Tensor | None, ...]) -> tuple:
    """``_call`` through ``tensors_to_jax`` / ``arrays_to_torch`` (the lean path not verified for the
    device, the public path chosen, or a lean import refused)."""
    cached = plan.cached
    jargs: list[Any] = [None] * len(args)
    todo, pos, keys = [x], [-1], {}
    for i in plan.present:
        t = args[i]
        if i in cached:
            k = keys[i] = _view_key(t)
            hit = _views.get(k)
            if hit is not None:
                jargs[i] = hit[0]
                continue
            t = t.detach()  # a new TensorImpl on the same storage: the capsule must not keep the owner alive
        todo.append(t)
        pos.append(i)
    imported = tensors_to_jax(todo, copy=None if plan.cuda < 0 else False, joint=True, checked=True)
    for i, a in zip(pos[1:], imported[1:]):
        jargs[i] = a
        if i in keys:
            _remember(keys[i], args[i], a)
    outs = plan.fn(imported[0], *jargs)
    return arrays_to_torch(outs if isinstance(outs, tuple) else (outs,), copy=False, device=plan.device,
                           checked=True)


def _run(plan: _Plan, x: Tensor, args: tuple[Tensor | None, ...]) -> tuple:
    """``_call`` on the input's device: refuses CUDA graph capture, and makes the input's device the
    current one for the call where it is not (torch's ``__dlpack__``, which the public bridge path
    uses, orders the *current device's* current stream)."""
    idx = plan.cuda
    if idx < 0:
        return _call(plan, x, args)
    if _C._cuda_getDevice() == idx:  # torch.cuda.current_device() minus its Python layer
        if _C._cuda_isCurrentStreamCapturing():  # torch.cuda.is_current_stream_capturing()
            raise RuntimeError(_CAPTURE_MSG)
        return _call(plan, x, args)
    with torch.cuda.device(idx):
        if _C._cuda_isCurrentStreamCapturing():
            raise RuntimeError(_CAPTURE_MSG)
        return _call(plan, x, args)


# ---------------------------------------------------------------- call plans
class _Plan(NamedTuple):
    """What a call needs beyond its tensors, prepared once per (op, key, scalar arguments, metadata
    of every tensor argument): the checks, which depend on nothing else, have passed; the jitted
    function is looked up; the output's shape is worked out."""

    fn: Any                          # the cached jax.jit of the op
    cuda: int                        # the CUDA device index; -1 on CPU
    device: torch.device             # the tensors' device
    cached: tuple[int, ...]          # argument positions read through the view cache (weight-like)
    present: tuple[int, ...]         # argument positions (after x) that are not None
    orig_shape: torch.Size | None = None  # producers: the activation's orig_shape (x's, with K)
    static: bool = False             # producers: a static key (the scale is the caller's tensor)
    scale_view: bool = True          # producers: the scale is a view of its storage (column-major layouts)


#: At most this many call plans are kept (cleared when full, so shapes made on the fly stay bounded).
PLAN_CACHE_SIZE = 4096
_plans: dict[tuple, _Plan] = {}


def _meta(t: Any) -> tuple:
    """What the checks of a tensor argument read: type, shape, dtype, device, contiguity (an optional
    argument that is None enters the plan key as None)."""
    return (type(t), t.shape, t.dtype, t.device, t.is_contiguous())


def _present(*args: Any) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(args) if t is not None)


def _keep(pk: tuple | None, plan: _Plan) -> _Plan:
    if pk is not None:
        if len(_plans) >= PLAN_CACHE_SIZE:
            _plans.clear()
        _plans[pk] = plan
    return plan


def clear_plan_cache() -> None:
    """Drop every call plan (they are rebuilt, with their checks, on the next call)."""
    _plans.clear()


def _producer_plan(op: str, key: str, x: Tensor, weight: Tensor | None, residual: Tensor | None,
                   scale: Tensor | None, global_scale: Tensor | None, scale_ub: Tensor | None, eps: float) -> _Plan:
    """The producer call's plan: looked up by metadata, or made by the full checks (which raise)."""
    m = _meta
    try:
        pk = (op, key, eps, m(x), None if weight is None else m(weight), None if residual is None else m(residual),
              None if scale is None else m(scale), None if global_scale is None else m(global_scale),
              None if scale_ub is None else m(scale_ub))
        plan = _plans.get(pk)
    except Exception:  # noqa: BLE001 -- not tensors (or unhashable): the checks below say what is wrong
        pk = plan = None
    if plan is not None:
        return plan
    qkey = parse_quant_key(key)
    k = _check_producer(op, qkey, x, weight, residual, scale, global_scale, scale_ub)
    cuda = _device_index(x)
    fn = _producer_fn(op, key, float(eps), cuda < 0)
    present = _present(weight, residual, scale, global_scale, scale_ub)
    return _keep(pk, _Plan(fn, cuda, x.device, (0, 2), present, torch.Size((*x.shape[:-1], k)), qkey.scale.static,
                           qkey.scale.layout in _COL_LAYOUTS))


def _consumer_plan(x: Tensor, x_scale: Tensor | None, key: str, orig_dtype: torch.dtype | None, weight: Tensor,
                   weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype | None,
                   input_scale: Tensor | None, weight_key: str | None) -> _Plan:
    """The consumer call's plan: looked up by metadata, or made by the full checks (which raise)."""
    m = _meta
    try:
        pk = ("mm", key, weight_key, orig_dtype, out_dtype, m(x), None if x_scale is None else m(x_scale), m(weight),
              m(weight_scale), None if bias is None else m(bias), None if input_scale is None else m(input_scale))
        plan = _plans.get(pk)
    except Exception:  # noqa: BLE001 -- not tensors (or unhashable): the checks below say what is wrong
        pk = plan = None
    if plan is not None:
        return plan
    _check_mm(parse_quant_key(key), x, x_scale, orig_dtype, weight, weight_scale, bias, input_scale)
    cuda = _device_index(x)
    fn = _consumer_fn(key, weight_key, None if orig_dtype is None else canonical_dtype(orig_dtype),
                      None if out_dtype is None else canonical_dtype(out_dtype), cuda < 0)
    present = _present(x_scale, weight, weight_scale, bias, input_scale)
    return _keep(pk, _Plan(fn, cuda, x.device, (1, 2, 3, 4), present))


# ---------------------------------------------------------------- custom ops
def _produce(op: str, key: str, x: Tensor, weight: Tensor | None, residual: Tensor | None, scale: Tensor | None,
             global_scale: Tensor | None, scale_ub: Tensor | None, eps: float) -> list[Tensor]:
    plan = _producer_plan(op, key, x, weight, residual, scale, global_scale, scale_ub, eps)
    return list(_run(plan, x, (weight, residual, scale, global_scale, scale_ub)))


def _consume(x: Tensor, x_scale: Tensor | None, key: str, orig_dtype: torch.dtype | None, weight: Tensor,
             weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype | None, input_scale: Tensor | None,
             weight_key: str | None) -> Tensor:
    plan = _consumer_plan(x, x_scale, key, orig_dtype, weight, weight_scale, bias, out_dtype, input_scale, weight_key)
    return _run(plan, x, (x_scale, weight, weight_scale, bias, input_scale))[0]


def _produce_fake(op: str, key: str, x: Tensor, weight: Tensor | None, residual: Tensor | None,
                  scale: Tensor | None, global_scale: Tensor | None, scale_ub: Tensor | None) -> list[Tensor]:
    qkey = parse_quant_key(key)
    k = _check_producer(op, qkey, x, weight, residual, scale, global_scale, scale_ub)
    orig_shape = (*x.shape[:-1], k)
    shape, dt = data_storage(qkey, orig_shape)
    outs = [x.new_empty(shape, dtype=torch_dtype(dt))]
    if not qkey.scale.static:
        storage = scale_storage_shape(qkey.scale, math.prod(orig_shape[:-1]), k)
        outs.append(x.new_empty(storage, dtype=torch_dtype(qkey.scale.storage_dtype)))
    if residual is not None:
        outs.append(torch.empty_like(residual))
    return outs


def _fake_quantize(x, key, scale, global_scale, scale_ub):
    return _produce_fake("quant", key, x, None, None, scale, global_scale, scale_ub)


def _fake_rms_norm_quant(x, weight, key, eps, residual, scale, global_scale, scale_ub):
    return _produce_fake("rms", key, x, weight, residual, scale, global_scale, scale_ub)


def _fake_silu_and_mul_quant(x, key, scale, global_scale, scale_ub):
    return _produce_fake("silu", key, x, None, None, scale, global_scale, scale_ub)


def _fake_scaled_mm(x, x_scale, key, orig_dtype, weight, weight_scale, bias, out_dtype, input_scale, weight_key):
    _check_mm(parse_quant_key(key), x, x_scale, orig_dtype, weight, weight_scale, bias, input_scale)
    dt = out_dtype or (x.dtype if x_scale is None else orig_dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dt)


#: The ops are registered with ``torch.library.Library`` (``QUANTACT_LEAN_OPS=0``, or a torch without the
#: pieces used here: ``torch.library.custom_op``) -- the same schema (``torch.library.infer_schema`` of
#: the function, as custom_op infers it), tags (``pt2_compliant_tag``, ``cudagraph_unsafe``), fake
#: implementation (``torch.library.register_fake``: Meta and FakeTensor), implementation for every
#: backend (``CompositeExplicitAutograd``) and autograd behaviour (the outputs of inputs that need a
#: gradient carry a node whose backward raises "no autograd formula"), minus custom_op's Python
#: layers on every call: its Autograd kernel builds a metadata dataclass and checks for ``out=``
#: arguments, its backend wrapper checks the outputs' aliasing. Here the Autograd kernel only asks
#: whether a gradient is needed (custom_op's own autograd implementation runs then) and otherwise
#: redispatches below autograd. CPU, host: 7.1 -> ~4 us per dispatch of a trivial op.
try:
    from torch._library.autograd import make_autograd_impl as _make_autograd_impl

    LEAN_OPS = (os.environ.get("QUANTACT_LEAN_OPS", "1") != "0" and hasattr(torch.library, "infer_schema")
                and hasattr(torch.library, "register_fake") and hasattr(_C, "_AutoDispatchBelowAutograd")
                and hasattr(_C, "_after_autograd_keyset"))
except ImportError:  # a torch that moved it: custom_op
    LEAN_OPS = False
_lib = torch.library.Library("quantact", "FRAGMENT") if LEAN_OPS else None


class _NoFormula:
    """What torch's generated autograd implementation reads of a custom op: no setup, no backward."""

    _setup_context_fn = None
    _backward_fn = None


def _autograd_kernel(op: Any):
    """The op's Autograd kernel: custom_op's (a node whose backward raises) when an input needs a
    gradient, else straight below autograd (what custom_op's does then, without its per-call Python)."""
    full = _make_autograd_impl(op, _NoFormula())
    after, below, grad_on, any_grad = (_C._after_autograd_keyset, _C._AutoDispatchBelowAutograd, _C.is_grad_enabled,
                                       _C._any_requires_grad)
    redispatch = op.redispatch

    def kernel(keyset, *args):
        if grad_on() and any_grad(*args):
            return full(keyset, *args)
        with below():
            return redispatch(keyset & after, *args)

    return kernel


def _custom_op(name: str, fake):
    """Register ``fn`` as ``quantact::<name>`` with fake implementation ``fake``; returns the callable
    op (``torch.ops.quantact.<name>.default``, or custom_op's wrapper of it)."""

    def register(fn):
        if not LEAN_OPS:
            op = torch.library.custom_op(f"quantact::{name}", mutates_args=(), tags=_TAGS)(fn)
            op.register_fake(fake)
            return op
        pt2 = (torch.Tag.pt2_compliant_tag,) if hasattr(torch.Tag, "pt2_compliant_tag") else ()
        _lib.define(name + torch.library.infer_schema(fn, mutates_args=()), tags=(*pt2, *_TAGS))
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"quantact::{name}", fake, lib=_lib)
        op = getattr(torch.ops.quantact, name).default
        _lib.impl(name, _autograd_kernel(op), "Autograd", with_keyset=True)
        return op

    return register


@_custom_op("quantize", _fake_quantize)
def _quantize_op(x: Tensor, key: str, scale: Tensor | None, global_scale: Tensor | None,
                 scale_ub: Tensor | None) -> list[Tensor]:
    """Pallas quantize: ``[data, scale storage (dynamic keys)]``."""
    return _produce("quant", key, x, None, None, scale, global_scale, scale_ub, 0.0)


@_custom_op("rms_norm_quant", _fake_rms_norm_quant)
def _rms_norm_quant_op(x: Tensor, weight: Tensor, key: str, eps: float, residual: Tensor | None,
                       scale: Tensor | None, global_scale: Tensor | None, scale_ub: Tensor | None) -> list[Tensor]:
    """Pallas (residual add +) RMSNorm -> quant: ``[data, scale storage (dynamic keys), residual_out (if given)]``."""
    return _produce("rms", key, x, weight, residual, scale, global_scale, scale_ub, eps)


@_custom_op("silu_and_mul_quant", _fake_silu_and_mul_quant)
def _silu_and_mul_quant_op(x: Tensor, key: str, scale: Tensor | None, global_scale: Tensor | None,
                           scale_ub: Tensor | None) -> list[Tensor]:
    """Pallas SiLU-and-mul -> quant: ``[data, scale storage (dynamic keys)]``."""
    return _produce("silu", key, x, None, None, scale, global_scale, scale_ub, 0.0)


@_custom_op("scaled_mm", _fake_scaled_mm)
def _scaled_mm_op(x: Tensor, x_scale: Tensor | None, key: str, orig_dtype: torch.dtype | None, weight: Tensor,
                  weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype | None,
                  input_scale: Tensor | None, weight_key: str | None) -> Tensor:
    """Pallas scaled GEMM. ``x_scale`` given: ``x`` is the activation's data and ``x_scale`` its scale
    storage (``orig_dtype`` required); else ``x`` is a float input the kernel quantizes with ``key``."""
    return _consume(x, x_scale, key, orig_dtype, weight, weight_scale, bias, out_dtype, input_scale, weight_key)


# ---------------------------------------------------------------- public wrappers
#: Public wrappers call the op's implementation directly in plain eager mode (see ``_direct``);
#: ``QUANTACT_DIRECT_EAGER=0`` (or setting this to False) always goes through ``torch.ops.quantact``.
_EAGER_PROBES = all(
    hasattr(m, n) for m, n in ((_C, "_len_torch_function_stack"), (_C, "_len_torch_dispatch_stack"),
                               (_C, "_any_requires_grad"), (getattr(_C, "_functorch", None), "peek_interpreter_stack"),
                               (getattr(_C, "_autograd", None), "_profiler_enabled"), (_C, "_is_tracing")))
DIRECT_EAGER = os.environ.get("QUANTACT_DIRECT_EAGER", "1") != "0" and _EAGER_PROBES
_PLAIN = (torch.Tensor, torch.nn.Parameter)
if _EAGER_PROBES:  # bound once: each is a C function (no attribute chain per call)
    _fn_stack, _dispatch_stack, _peek_functorch = (_C._len_torch_function_stack, _C._len_torch_dispatch_stack,
                                                   _C._functorch.peek_interpreter_stack)
    _profiling, _tracing, _grad_on, _any_grad = (_C._autograd._profiler_enabled, _C._is_tracing, _C.is_grad_enabled,
                                                 _C._any_requires_grad)


def _direct(x: Tensor, *more: Tensor | None) -> bool:
    """Whether a public wrapper may run the op's implementation itself instead of calling
    ``torch.ops.quantact.*``: in plain eager execution the dispatcher only routes to that same
    implementation (its autograd kernel passes straight through when no input needs a gradient), at
    a host cost of tens of microseconds. Everything that must *see* the op keeps the dispatcher:
    torch.compile (Dynamo folds ``is_compiling()``), torch.jit tracing, torch function and dispatch
    modes (FakeTensorMode, make_fx/export, TorchDispatchMode loggers), functorch transforms (vmap,
    grad), the profiler, tensor subclasses, devices other than cpu/cuda (meta: the fake
    implementation), and inputs that require grad with grad mode on (the op's autograd kernel).
    (``torch.jit.is_tracing()`` is ``torch._C._is_tracing()`` outside TorchScript.)"""
    if not DIRECT_EAGER or torch.compiler.is_compiling():
        return False
    if type(x) not in _PLAIN or not (x.is_cuda or x.is_cpu):
        return False
    for t in more:
        if t is not None and type(t) not in _PLAIN:
            return False
    return (_fn_stack() == 0 and _dispatch_stack() == 0 and _peek_functorch() is None and not _profiling()
            and not _tracing() and not (_grad_on() and _any_grad(x, *more)))


def _scale_fields(s: ScaleDesc | None) -> tuple:
    return (None,) * 6 if s is None else (s.dtype, s.static, s.group_shape[0], s.group_shape[1], s.layout, s.ue8m0)


@torch.compiler.assume_constant_result
def _key_str_of(dtype: str, symmetric: bool, *scales: Any) -> str:
    """``str`` of the key with these fields (``_scale_fields`` of scale, then of scale2)."""
    sd = [None if f[0] is None else ScaleDesc(f[0], f[1], (f[2], f[3]), f[4], f[5]) for f in (scales[:6], scales[6:])]
    return str(QuantKey(dtype, sd[0], sd[1], symmetric))


_key_strs: dict[QuantKey, str] = {}  # eager calls: str(key) once per distinct key value
_key_ids: dict[int, tuple[QuantKey, str]] = {}  # and per key object (no dataclass hash per call)


def _key_str(key: QuantKey) -> str:
    """``str(key)``, a constant under torch.compile. The key is taken apart into its str / bool / int /
    enum fields (plain attribute reads that Dynamo traces) and only those reach the
    ``assume_constant_result`` function: Dynamo before torch 2.12 cannot turn a frozen-dataclass
    argument such as ``QuantKey`` into a constant ("currently can't reconstruct arbitrary frozen
    dataclass instances"). Eager calls look the string up, by the key object first (the entry holds
    the key, so its id stays its own), then by value (keys are frozen and value-hashed); Dynamo folds
    ``is_compiling()`` and never traces the dictionaries."""
    if not torch.compiler.is_compiling():
        hit = _key_ids.get(id(key))
        if hit is not None and hit[0] is key:
            return hit[1]
        s = _key_strs.get(key)
        if s is None:
            if len(_key_strs) > 1024:  # keys built on the fly: stay bounded
                _key_strs.clear()
            s = _key_strs[key] = str(key)
        if len(_key_ids) > 1024:
            _key_ids.clear()
        _key_ids[id(key)] = (key, s)
        return s
    return _key_str_of(key.dtype, key.symmetric, *_scale_fields(key.scale), *_scale_fields(key.scale2))


def _as_key(key: Any, what: str = "key") -> QuantKey:
    if not isinstance(key, QuantKey):
        raise TypeError(f"{what} must be a QuantKey (interop.keys), got {key!r}")
    return key


def _resolve(key: QuantKey | None, layer: Any, scale: Any, global_scale: Any):
    """The key and scales: explicit, or those a consumer layer exposes (``expose_input_quant_key``)."""
    key, scale, global_scale = resolve_input_quant(
        key, layer, scale, global_scale, lambda g: 1.0 / torch.as_tensor(g, dtype=torch.float32))
    return _as_key(key), scale, global_scale


def _scalar(v: Any, x: Tensor) -> Tensor | None:
    """A one-value scale as an f32 tensor: tensors are kept (cast to f32); host numbers go to x's device."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        return v if v.dtype == torch.float32 else v.float()
    _refuse_capture(x)  # before torch's own capture error for the host-to-device copy
    return torch.tensor([float(np.float32(v))], dtype=torch.float32, device=x.device)


def _static_storage(key: QuantKey, scale: Any, x: Tensor, k: int) -> Tensor | None:
    """A static key's scale as its contiguous storage in the key's storage dtype (vLLM's column-major
    view is accepted; host numbers become f32 on x's device); None for a dynamic key."""
    if not key.scale.static:
        if scale is not None:
            raise QuantLayoutError(_DYNAMIC_SCALE.format(key=key))
        return None
    if scale is not None and not isinstance(scale, Tensor):
        if key.format not in (QuantFormat.FP8, QuantFormat.INT8):
            raise TypeError(f"{key}: pass the static block scales as a torch tensor")
        _refuse_capture(x)
        scale = torch.tensor(np.asarray(scale, np.float32), device=x.device)  # a torch allocation (aligned)
    storage = static_scale_storage(key, scale, math.prod(x.shape[:-1]), k)
    sdt = torch_dtype(key.scale.storage_dtype)
    if storage.dtype == torch.uint8 and sdt.itemsize == 1:
        return storage.view(sdt)  # e4m3 / e8m0 block scales given as raw bytes
    return storage if storage.dtype == sdt else storage.to(sdt)


def _activation(key: QuantKey, x: Tensor, k: int, outs: list[Tensor], static: Tensor | None) -> QuantizedActivation:
    storage = static if key.scale.static else outs[1]
    orig_shape = (*x.shape[:-1], k)
    return QuantizedActivation(outs[0], scale_from_storage(storage, key, orig_shape), x.dtype, orig_shape, key)


def _planned_activation(plan: _Plan, key: QuantKey, x: Tensor, outs: tuple, static: Tensor | None
                        ) -> QuantizedActivation:
    """``_activation`` with the plan's orig_shape (eager direct calls)."""
    storage = static if plan.static else outs[1]
    if plan.scale_view:  # else scale_from_storage returns the storage itself
        storage = scale_from_storage(storage, key, plan.orig_shape)
    return QuantizedActivation(outs[0], storage, x.dtype, plan.orig_shape, key)


def _known_plan(op: str, key: Any, x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float
                ) -> _Plan | None:
    """The plan of a plain eager producer call without static scale, global_scale, scale_ub or layer,
    looked up before the wrapper's own argument handling: the key object's string from ``_key_str``'s
    table (a key seen before), the plan key ``_producer_plan`` builds for these arguments. A hit is a
    call whose checks all passed with this metadata (the wrapper's steps it skips -- ``_resolve``,
    ``_check_tensor(x)``, ``_static_storage``, ``_scalar`` -- only read the key, which this key object
    had, and x's metadata, which the plan key holds, and give ``None`` for the absent arguments);
    ``None`` sends the call down the full path, with its errors. Call after ``_direct`` returned True
    (plain tensors, not compiling)."""
    hit = _key_ids.get(id(key))
    if hit is None or hit[0] is not key:
        return None
    m = _meta
    return _plans.get((op, hit[1], eps, m(x), None if weight is None else m(weight),
                       None if residual is None else m(residual), None, None, None))


def _wrap_producer(op: str, x: Tensor, weight: Tensor | None, residual: Tensor | None, key: QuantKey | None,
                   layer: Any, scale: Any, global_scale: Any, scale_ub: Any, eps: Any
                   ) -> tuple[QuantizedActivation, Any]:
    """The three producer wrappers' one body: ``(activation, kernel outputs)``. A call with no layer and
    no scales whose metadata a plan already checked goes straight to it (``_known_plan``); otherwise the
    key and scales are resolved and checked, and the call runs through its plan when no dispatcher mode
    needs the custom op (``_direct``), else through ``torch.ops.quantact.*``."""
    if (layer is None and scale is None and global_scale is None and scale_ub is None and type(eps) is float
            and _direct(x, weight, residual)):
        plan = _known_plan(op, key, x, weight, residual, eps)
        if plan is not None and not plan.static:
            outs = _run(plan, x, (weight, residual, None, None, None))
            return _planned_activation(plan, key, x, outs, None), outs
    key, scale, global_scale = _resolve(key, layer, scale, global_scale)
    _check_tensor(x, "x", x)
    k = x.shape[-1] // 2 if op == "silu" else x.shape[-1]
    static = _static_storage(key, scale, x, k)
    gs, ub = _scalar(global_scale, x), _scalar(scale_ub, x)
    if _direct(x, weight, residual, static, gs, ub):
        plan = _producer_plan(op, _key_str(key), x, weight, residual, static, gs, ub, float(eps))
        outs = _run(plan, x, (weight, residual, static, gs, ub))
        return _planned_activation(plan, key, x, outs, static), outs
    if op == "quant":
        outs = _quantize_op(x, _key_str(key), static, gs, ub)
    elif op == "rms":
        outs = _rms_norm_quant_op(x, weight, _key_str(key), float(eps), residual, static, gs, ub)
    else:
        outs = _silu_and_mul_quant_op(x, _key_str(key), static, gs, ub)
    return _activation(key, x, k, outs, static), outs


def quantize(x: Tensor, key: QuantKey | None = None, *, layer: Any = None, scale: Any = None,
             global_scale: Any = None, scale_ub: Any = None) -> QuantizedActivation:
    """Quantize ``x [..., K]`` with ``key`` (or the key ``layer`` exposes) with the Pallas kernel.

    Same arguments and bits as ``quantact_jax.producers.quantize`` and ``quantact_torch.reference.quantize``:
    ``scale`` is a static key's scale (storage, or vLLM's column-major view), ``global_scale`` NVFP4's
    quantisation multiplier, ``scale_ub`` the per-token amax bound; one-value scales may be Python
    numbers (put on x's device). Returns a ``QuantizedActivation`` whose data and dynamic scales are
    the kernel's buffers.
    """
    return _wrap_producer("quant", x, None, None, key, layer, scale, global_scale, scale_ub, 0.0)[0]


def rms_norm_quant(x: Tensor, weight: Tensor, key: QuantKey | None = None, *, layer: Any = None, eps: float = 1e-6,
                   residual: Tensor | None = None, scale: Any = None, global_scale: Any = None,
                   scale_ub: Any = None) -> tuple[QuantizedActivation, Tensor | None]:
    """Fused (residual add +) RMSNorm -> quant with the Pallas kernel; ``(activation, residual_out)``.

    As ``quantact_jax.producers.rms_norm_quant``: static keys add the residual in the input dtype, dynamic
    keys in f32 (vLLM). ``residual_out`` is a new tensor (vLLM updates the residual in place; an op
    here never writes its inputs).
    """
    qa, outs = _wrap_producer("rms", x, weight, residual, key, layer, scale, global_scale, scale_ub, eps)
    return qa, (outs[-1] if residual is not None else None)


def silu_and_mul_quant(x: Tensor, key: QuantKey | None = None, *, layer: Any = None, scale: Any = None,
                       global_scale: Any = None, scale_ub: Any = None) -> QuantizedActivation:
    """Fused SiLU-and-mul -> quant of ``x [..., 2d] = [gate | up]`` with the Pallas kernel."""
    return _wrap_producer("silu", x, None, None, key, layer, scale, global_scale, scale_ub, 0.0)[0]


def scaled_mm(x: QuantizedActivation | Tensor, weight: Tensor, weight_scale: Tensor, *, bias: Tensor | None = None,
              out_dtype: Any = None, input_quant_key: QuantKey, input_scale: Any = None,
              weight_key: QuantKey | None = None) -> Tensor:
    """``x @ dequant(weight).T`` with the Pallas consumer (``quantact_jax.consumers.scaled_mm``).

    ``x``: a ``QuantizedActivation`` keyed ``input_quant_key`` -- checked here (``QuantKeyMismatchError``,
    ``QuantLayoutError``) and again by the JAX consumer, never re-quantized -- or a float tensor the
    kernel quantizes with ``input_quant_key`` (``input_scale`` for static keys). ``weight``: ``[N, K]``
    float8_e4m3fn; ``weight_scale``: ``(1,)``, ``(N, 1)`` or ``(cdiv(N,128), cdiv(K,128))``. Output
    ``[*orig_shape[:-1], N]`` in ``out_dtype`` (default: the activation's ``orig_dtype``).
    """
    known, plan = _mm_known_plan(x, input_quant_key, weight, weight_scale, bias, out_dtype, input_scale, weight_key)
    if plan is not None:
        storage = x.scale_storage()  # vLLM's column-major view -> its storage (checks the view's strides)
        if _direct(x.data, storage, weight, weight_scale, bias, input_scale):
            return _run(plan, x.data, (storage, weight, weight_scale, bias, input_scale))[0]
    key = _as_key(input_quant_key, "input_quant_key")
    qa = as_quantized_activation(x, key)
    if qa is None:
        data, storage, orig_dtype = x, None, None
        input_scale = _static_storage(key, input_scale, x, x.shape[-1])
    else:
        data, storage, orig_dtype = qa.data, qa.scale_storage(), qa.orig_dtype
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        out_dtype = torch_dtype(canonical_dtype(out_dtype))
    wkey = None if weight_key is None else _key_str(_as_key(weight_key, "weight_key"))
    if _direct(data, storage, weight, weight_scale, bias, input_scale):
        plan = _consumer_plan(data, storage, _key_str(key), orig_dtype, weight, weight_scale, bias, out_dtype,
                              input_scale, wkey)
        if known is not None:  # this activation's metadata passed validate() and the checks: remember it
            _keep(known, plan)
        return _run(plan, data, (storage, weight, weight_scale, bias, input_scale))[0]
    return _scaled_mm_op(data, storage, _key_str(key), orig_dtype, weight, weight_scale, bias, out_dtype, input_scale,
                         wkey)


def _mm_known_plan(x: Any, key: Any, weight: Any, weight_scale: Any, bias: Any, out_dtype: Any, input_scale: Any,
                   weight_key: Any) -> tuple[tuple | None, _Plan | None]:
    """``(plan key, plan)`` of a ``scaled_mm`` call whose activation a plan may already know (the plan
    ``None`` where none is stored under that key yet; both ``None`` where the call does not qualify):
    ``x`` a torch
    ``QuantizedActivation`` whose ``quant_key`` *is* the key object given, a key object (and weight
    key) seen before (``_key_str``'s table), ``out_dtype`` None or a torch dtype; else None (the full
    path). The key holds everything ``as_quantized_activation`` reads besides the key -- the types,
    shapes, dtypes and devices of data and scale *storage*, ``orig_shape``, ``orig_dtype`` -- and
    everything ``_consumer_plan`` reads, so a plan stored under it (by a call that passed both) stands
    for both checks; the scale's view is turned into its storage, with its stride check, on every
    call."""
    if type(x) is not QuantizedActivation or x.quant_key is not key or not (
            out_dtype is None or type(out_dtype) is torch.dtype):
        return None, None
    hit = _key_ids.get(id(key))
    if hit is None or hit[0] is not key:
        return None, None
    wk = None
    if weight_key is not None:
        whit = _key_ids.get(id(weight_key))
        if whit is None or whit[0] is not weight_key:
            return None, None
        wk = whit[1]
    m = _meta
    try:
        data, scale = x.data, x.scale
        k = ("mm-qa", hit[1], wk, x.orig_dtype, x.orig_shape, out_dtype, m(data), m(scale), scale.stride(), m(weight),
             m(weight_scale), None if bias is None else m(bias), None if input_scale is None else m(input_scale))
        return k, _plans.get(k)
    except Exception:  # noqa: BLE001 -- not tensors, unhashable metadata: the full path says what is wrong
        return None, None


__all__ = ["quantize", "rms_norm_quant", "scaled_mm", "silu_and_mul_quant"]
