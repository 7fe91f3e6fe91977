"""Zero-copy DLPack bridge between PyTorch and JAX, for plain tensors and ``QuantizedActivation``.

``to_jax(x)`` takes a ``torch.Tensor`` or a torch ``QuantizedActivation`` and returns a ``jax.Array``
or a JAX ``QuantizedActivation``; ``to_torch(x)`` goes the other way. Both use the DLPack *object
protocol* (``jax.dlpack.from_dlpack(t)``, ``torch.from_dlpack(a)``), so on CUDA the two sides exchange
streams (each waits for the other's pending work on the device, the host is not blocked).
jax and torch are imported lazily, inside the functions: importing :mod:`interop` imports neither.

Sharing rule (read-only)
------------------------
The result **shares its buffer** with the source (same device pointer). Treat both as read-only
while either is alive: writing into the torch side (``t.add_(1)``, ``t[0] = ...``, an ``out=``
kernel) changes the JAX array behind XLA's back, which is undefined behaviour for JAX (JAX assumes its
arrays are immutable and may cache or alias them). If you must write, copy first (``copy=True``).
The result keeps the source's buffer alive (the DLPack capsule owns a reference), so the source
Python object may be deleted.

What crosses
------------
Dtypes: ``float8_e4m3fn``, ``float8_e5m2``, ``float8_e8m0fnu``, ``uint8`` (packed fp4 travels as
uint8, as in vLLM: ``float4_e2m1fn_x2`` does not cross DLPack), ``int8``, ``int32``, ``float32``,
``bfloat16``, ``float16`` (:data:`BRIDGE_DTYPES`). All of them cross DLPack natively in every version
quantact supports (jax 0.10.2 + torch 2.13 CPU; jax 0.11.2 + torch 2.11 CUDA), so there is no bit-view
fallback: re-typing a uint8 import in JAX (``lax.bitcast_convert_type``) materialises a new buffer,
i.e. it is a copy, so a dtype that does not cross natively raises :class:`~interop.errors.BridgeError`
instead. Anything else (``float64``, ``int64``, complex, bool, ``float4_e2m1fn_x2`` ...) raises
``BridgeError``; note that JAX would otherwise silently *convert* a float64/int64 tensor to 32 bits
(a copy, with x64 disabled).

Strides: compact strides only (any permutation of a dense layout: transposes are zero-copy both
ways); ``t[::2]``, ``expand()`` and other gaps/overlaps raise ``BridgeError`` (``.contiguous()``
first, or ``copy=True``). Size-1 dims may have any stride; 0-size tensors cross (they own no bytes,
so there is no pointer to share).

Alignment (CPU only): XLA's CPU client needs 64-byte-aligned buffers. A torch CPU tensor whose
``data_ptr()`` is not 64-byte aligned (e.g. ``buf[1:]`` of a uint8 buffer) is *copied* by JAX.
``to_jax`` detects it (the pointers differ) and, with the default ``copy=None``, returns the copy
with a :class:`BridgeCopyWarning`; with ``copy=False`` it raises ``BridgeError``. Fresh torch CPU
allocations are 64-byte aligned; CUDA buffers are not copied (measured on an H100 with jax 0.11.2:
a view 1 byte into a buffer is shared).

``copy``: ``None`` (default) zero-copy where the platform allows (see alignment); ``False`` never copy
(``BridgeError`` where a copy would be needed); ``True`` always return an independent copy (made on
the source side: torch ``clone()`` before the import, since jax 0.10.2's ``from_dlpack(copy=True)``
still shares a CPU buffer; this also accepts non-compact strides).

QuantizedActivation
-------------------
``key``, ``orig_shape`` and ``orig_dtype`` (torch dtype <-> NumPy dtype) are carried over. JAX holds the
contiguous scale *storage*; torch holds vLLM's strided view for the column-major layouts
(``strides (1, M)`` / ``(1, round_up(M, 4))``). The conversion goes through
``quantact_torch.activation.scale_storage`` / ``scale_from_storage``, so it is zero-copy both ways
and the torch view's strides come back exactly. Both sides are validated against the key
(:class:`~interop.errors.QuantLayoutError`) unless ``validate=False``; ``data`` and ``scale`` must
live on the same device (``BridgeError``).

Same-framework input is returned unchanged (``to_jax(jax_array) is jax_array``); any other type
(NumPy arrays, lists, scalars) raises ``BridgeError``, and so does a JAX tracer given to ``to_torch``
(convert outside ``jit``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

from interop.dtypes import canonical_dtype
from interop.errors import BridgeError

#: Dtypes (canonical names) that cross the bridge zero-copy.
BRIDGE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "uint8", "int8", "int32",
                 "float32", "bfloat16", "float16")


class BridgeCopyWarning(UserWarning):
    """The bridge had to copy instead of sharing the buffer (CPU buffer not 64-byte aligned)."""


__all__ = ["to_jax", "to_torch", "BRIDGE_DTYPES", "BridgeCopyWarning", "BridgeError", "buffer_pointer",
           "is_compact", "tensors_to_jax", "arrays_to_torch", "set_lean_dlpack", "lean_dlpack_status",
           "lean_endpoints", "lean_api", "import_stream", "export_stream"]


# ---- helpers ----------------------------------------------------------------------------


def is_compact(shape, strides) -> bool:
    """True if ``strides`` (in elements) describe a dense, non-overlapping layout of ``shape``:
    some permutation of row-major. Size-1 dims may have any stride; 0-size is always compact."""
    if any(int(s) == 0 for s in shape):
        return True
    dims = sorted((int(st), int(sz)) for sz, st in zip(shape, strides) if int(sz) != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def buffer_pointer(x: Any) -> int:
    """Address of the first element: ``t.data_ptr()`` for torch, ``a.unsafe_buffer_pointer()`` for JAX."""
    if hasattr(x, "data_ptr"):
        return int(x.data_ptr())
    return int(x.unsafe_buffer_pointer())


def _dtype_name(dt: Any) -> str | None:
    try:
        return canonical_dtype(dt)
    except TypeError:
        return None


def _check_dtype(dt: Any, what: str) -> str:
    name = _dtype_name(dt)
    if name not in BRIDGE_DTYPES:
        extra = ""
        if name == "float4_e2m1fn" or "float4" in str(dt):
            extra = " (carry packed fp4 as uint8, two e2m1 codes per byte, as vLLM does)"
        elif name in ("float64", "int64"):
            extra = " (JAX with x64 disabled would silently convert it to 32 bits, a copy)"
        raise BridgeError(f"{what} has dtype {dt}, which does not cross the DLPack bridge zero-copy; "
                          f"supported: {', '.join(BRIDGE_DTYPES)}{extra}")
    return name


def _jax_tracer_type():
    import jax

    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    if tracer is None:  # jax versions that hide jax.core.Tracer
        from jax._src.core import Tracer as tracer  # noqa: N813
    return tracer


def _is_jax_array(x: Any) -> bool:
    import jax

    return isinstance(x, jax.Array)


def _check_concrete_jax(a: Any, what: str) -> None:
    if isinstance(a, _jax_tracer_type()):
        raise BridgeError(f"{what} is a JAX tracer (inside jit/vmap/grad): only concrete arrays can cross "
                          "the bridge; convert outside the traced function")
    if a.is_deleted():
        raise BridgeError(f"{what} has been deleted (donated?) and cannot be shared")
    devs = a.devices()
    if len(devs) != 1:
        raise BridgeError(f"{what} spans {len(devs)} devices ({a.sharding}); DLPack shares one buffer on "
                          "one device: pass a single shard (a.addressable_shards[i].data)")


# ---- plain tensors ----------------------------------------------------------------------


def _tensor_to_jax(t: Any, copy: bool | None, what: str = "tensor"):
    import jax
    import torch

    dt = _check_dtype(t.dtype, what)
    if t.device.type not in ("cpu", "cuda"):
        raise BridgeError(f"{what} is on device {t.device}; the bridge handles cpu and cuda tensors")
    if t.requires_grad:
        t = t.detach()  # shares the buffer; autograd does not cross frameworks
    if copy:
        # jax 0.10.2's from_dlpack(t, copy=True) still shares a CPU buffer; copy on the torch side
        t = t.clone(memory_format=torch.contiguous_format)
    if not is_compact(t.shape, t.stride()):
        raise BridgeError(
            f"{what} of shape {tuple(t.shape)} has non-compact strides {tuple(t.stride())} (a strided slice, "
            "expand() or overlap); only dense layouts (row-major or a transpose of it) cross zero-copy: "
            "call .contiguous() first (or pass copy=True)")
    try:
        a = jax.dlpack.from_dlpack(t, copy=False if copy is False else None)
    except Exception as e:  # JaxRuntimeError / BufferError / ValueError / TypeError from either side
        msg = str(e)
        if "aligned" in msg:
            raise BridgeError(
                f"{what} at address {t.data_ptr():#x} is not 64-byte aligned, so XLA's CPU client would have "
                "to copy it, and copy=False forbids that (use copy=None to accept a copy, or allocate the "
                "tensor afresh)") from e
        raise BridgeError(f"{what} ({tuple(t.shape)} {t.dtype} on {t.device}) could not be imported into "
                          f"JAX {jax.__version__} via DLPack: {type(e).__name__}: {msg}") from e
    if _dtype_name(a.dtype) != dt:  # jax canonicalises 64-bit types (we reject them above)
        raise BridgeError(f"{what}: JAX imported {t.dtype} as {a.dtype}")
    if t.numel() and a.unsafe_buffer_pointer() != t.data_ptr():
        if copy is False:  # jax should have refused; never hand back a silent copy
            raise BridgeError(f"{what}: JAX copied the buffer although copy=False")
        warnings.warn(
            f"{what} ({tuple(t.shape)} {t.dtype}) was copied, not shared, by JAX: its CPU buffer at "
            f"{t.data_ptr():#x} is not 64-byte aligned (pass copy=False to make this an error)",
            BridgeCopyWarning, stacklevel=3)
    return a


def _array_to_torch(a: Any, copy: bool | None, what: str = "array"):
    import torch

    _check_concrete_jax(a, what)
    dt = _check_dtype(a.dtype, what)
    try:
        t = torch.from_dlpack(a)
    except Exception as e:
        raise BridgeError(f"{what} ({a.shape} {a.dtype} on {a.sharding}) could not be imported into "
                          f"torch {torch.__version__} via DLPack: {type(e).__name__}: {e}") from e
    if _dtype_name(t.dtype) != dt:
        raise BridgeError(f"{what}: torch imported {a.dtype} as {t.dtype}")
    if t.numel() and t.data_ptr() != a.unsafe_buffer_pointer():
        if copy is False:
            raise BridgeError(f"{what}: torch copied the buffer although copy=False")
        if copy is None:
            warnings.warn(f"{what} ({a.shape} {a.dtype}) was copied, not shared, by torch",
                          BridgeCopyWarning, stacklevel=3)
    if copy:
        t = t.clone()  # preserve_format: keeps the (possibly transposed) strides
    return t


# ---- QuantizedActivation ----------------------------------------------------------------


def _qa_to_jax(qa: Any, copy: bool | None, validate: bool):
    import torch

    from interop.dtypes import numpy_dtype
    from quantact_jax.activation import QuantizedActivation as JaxQA
    from quantact_torch.activation import scale_storage

    data, scale = qa.data, qa.scale
    for name, v in (("data", data), ("scale", scale)):
        if not isinstance(v, torch.Tensor):
            raise BridgeError(f"QuantizedActivation.{name} must be a torch.Tensor, got {type(v).__name__}")
    if data.device != scale.device:
        raise BridgeError(f"QuantizedActivation data is on {data.device} but scale on {scale.device}; "
                          "move both to one device before crossing the bridge")
    if validate:
        qa.validate()  # QuantLayoutError if data/scale contradict the key (incl. the scale view's strides)
    storage = scale_storage(scale, qa.quant_key, qa.orig_shape)  # contiguous, same buffer
    jd = _tensor_to_jax(data, copy, "QuantizedActivation.data")
    js = _tensor_to_jax(storage, copy, "QuantizedActivation.scale")
    out = JaxQA(jd, js, numpy_dtype(canonical_dtype(qa.orig_dtype)), tuple(int(s) for s in qa.orig_shape),
                qa.quant_key)
    return out.validate() if validate else out


def _qa_to_torch(qa: Any, copy: bool | None, validate: bool):
    from interop.dtypes import torch_dtype
    from quantact_torch.activation import QuantizedActivation as TorchQA
    from quantact_torch.activation import scale_from_storage

    data, scale = qa.data, qa.scale
    for name, v in (("data", data), ("scale", scale)):
        if not _is_jax_array(v):
            raise BridgeError(f"QuantizedActivation.{name} must be a jax.Array, got {type(v).__name__}")
        _check_concrete_jax(v, f"QuantizedActivation.{name}")
    if data.devices() != scale.devices():
        raise BridgeError(f"QuantizedActivation data is on {data.devices()} but scale on {scale.devices()}; "
                          "put both on one device before crossing the bridge")
    if validate:
        qa.validate()
    td = _array_to_torch(data, copy, "QuantizedActivation.data")
    ts = _array_to_torch(scale, copy, "QuantizedActivation.scale")
    if not ts.is_contiguous():  # the storage must be row-major for vLLM's view to describe it
        raise BridgeError(f"QuantizedActivation.scale arrived with strides {ts.stride()}; expected the "
                          "contiguous scale storage")
    out = TorchQA(td, scale_from_storage(ts, qa.quant_key, qa.orig_shape),
                  torch_dtype(canonical_dtype(qa.orig_dtype)), qa.orig_shape, qa.quant_key)
    return out.validate() if validate else out


# ---- several tensors per call: the lean path (the torch ops' per-call crossing) ----------
#
# ``jax.dlpack.from_dlpack`` spends most of its time in Python around two C calls: torch's
# ``__dlpack__(stream=...)`` (which, on CUDA, builds an ExternalStream and an Event per tensor) and
# jaxlib's ``dlpack_managed_tensor_to_buffer``, followed by a ``jnp.asarray`` that only matters for
# 64-bit dtypes (which the bridge refuses). The lean path calls jaxlib's import directly on
# ``torch.utils.dlpack.to_dlpack(t)``, and on CUDA synchronises torch's current stream with JAX's
# external-ready stream once per call instead of once per tensor (not at all when torch's current
# stream has no unfinished work: then the tensors are imported as ready). The jaxlib entry points are private:
# they are resolved once and verified on a probe tensor per device (zero-copy, shape, dtype, device,
# contents); if anything differs the bridge uses the public path (``to_jax`` / ``to_torch``).

_LEAN_ENV = "QUANTACT_LEAN_DLPACK"  # "0" forces the public path (tests, and an escape hatch)
_lean_state: dict[str, Any] = {"enabled": os.environ.get(_LEAN_ENV, "1") != "0", "api": None, "reason": None,
                               "idle_skip": os.environ.get("QUANTACT_IDLE_STREAM_SKIP", "1") != "0"}
_endpoints: dict[Any, Any] = {}     # torch.device -> _Endpoint, or None where the lean path is unusable
_ext_streams: dict[int, Any] = {}   # JAX external-ready stream pointer -> torch.cuda.ExternalStream
_cuda_events: dict[tuple[int, int], Any] = {}  # (CUDA device index, thread id) -> the event of its waits
_torch_streams: dict[tuple, Any] = {}  # torch._C._cuda_getCurrentStream() tuple -> torch.cuda.Stream


class _Endpoint(NamedTuple):
    """One torch device as the lean path needs it (resolved once, by the public path)."""

    jax_device: Any  # the device jax.dlpack.from_dlpack maps the torch device to
    dl_type: int     # DLPack device type (kDLCPU = 1, kDLCUDA = 2)
    cuda: bool
    index: int = -1  # CUDA: the device index, and torch's C entry points the per-call stream work uses
    current_stream_ids: Any = None  # torch._C._cuda_getCurrentStream: index -> (stream id, device, type)
    current_raw_stream: Any = None  # torch._C._cuda_getCurrentRawStream: index -> cudaStream_t
    record: Any = None              # torch._C._CudaEventBase.record(event, stream)
    wait: Any = None                # torch._C._CudaEventBase.wait(event, stream)
    query: Any = None               # torch._C._CudaStreamBase.query(stream) (cudaStreamQuery); None: never asked


def _cuda_endpoint(jax_device: Any, dl_type: int, index: int) -> _Endpoint:
    """A CUDA endpoint: the C functions behind ``torch.cuda.current_stream`` and ``torch.cuda.Event``'s
    ``record`` / ``wait`` (their Python wrappers cost microseconds per call)."""
    import torch

    c = torch._C
    return _Endpoint(jax_device, dl_type, True, index, c._cuda_getCurrentStream, c._cuda_getCurrentRawStream,
                     c._CudaEventBase.record, c._CudaEventBase.wait, getattr(c._CudaStreamBase, "query", None))


class _LeanAPI(NamedTuple):
    imp: Any  # jaxlib: DLPack capsule -> jax.Array (dlpack_managed_tensor_to_buffer)
    exp: Any  # jaxlib: jax.Array -> DLPack capsule (buffer_to_dlpack_managed_tensor)
    t2d: Any  # torch: tensor -> capsule (torch.utils.dlpack.to_dlpack, a C function)
    d2t: Any  # torch: capsule -> tensor (the C function torch.utils.dlpack.from_dlpack ends in)


def _lean_api() -> _LeanAPI | None:
    """(jaxlib import, jaxlib export, torch to_dlpack, torch from_dlpack), or None if this jaxlib lacks them."""
    api = _lean_state["api"]
    if api is None:
        try:
            import torch
            import torch.utils.dlpack as tdl
            from jax._src.lib import (
                _jax,  # private: the module jax.dlpack itself calls into
            )

            # torch.utils.dlpack.from_dlpack(capsule) is Python around the C _from_dlpack (it looks
            # for __dlpack__ first); a capsule needs only the C call
            api = _LeanAPI(_jax.dlpack_managed_tensor_to_buffer, _jax.buffer_to_dlpack_managed_tensor, tdl.to_dlpack,
                           getattr(torch._C, "_from_dlpack", tdl.from_dlpack))
        except (ImportError, AttributeError) as e:
            api = False
            _lean_state["reason"] = f"jaxlib has no lean DLPack entry points ({type(e).__name__}: {e})"
        _lean_state["api"] = api
    return api or None


def set_lean_dlpack(enabled: bool) -> bool:
    """Use (``True``, the default) or bypass (``False``) the lean path of :func:`tensors_to_jax` /
    :func:`arrays_to_torch`; returns the previous setting. Also set by ``QUANTACT_LEAN_DLPACK=0``.
    Re-enabling re-probes every device."""
    prev = _lean_state["enabled"]
    _lean_state["enabled"] = bool(enabled)
    _endpoints.clear()
    return prev


def lean_dlpack_status() -> dict[str, Any]:
    """Whether the lean path is on and, per torch device seen so far, whether its probe passed
    (``None`` = not probed yet); ``reason`` says why the lean path is off, if it is."""
    return {"enabled": _lean_state["enabled"], "reason": _lean_state["reason"], "idle_skip": _lean_state["idle_skip"],
            "devices": {str(d): ep is not None for d, ep in _endpoints.items()}}


def _cuda_stream_ptr(stream: Any) -> int:
    """The DLPack value of a torch CUDA stream: its pointer, 1 for the legacy default stream (as
    ``torch.from_dlpack`` passes it)."""
    ptr = stream.cuda_stream
    return 1 if ptr == 0 else ptr


def _current_stream_ptr(ep: _Endpoint) -> int:
    """``_cuda_stream_ptr(torch.cuda.current_stream(device))`` without building a Stream object."""
    ptr = ep.current_raw_stream(ep.index)
    return 1 if ptr == 0 else ptr


def _torch_current_stream(ep: _Endpoint) -> Any:
    """``torch.cuda.current_stream(device)`` from the C call, with one Stream object per (stream id,
    device, type) triple instead of one per call (a torch Stream object is only that triple)."""
    ids = ep.current_stream_ids(ep.index)
    st = _torch_streams.get(ids)
    if st is None:
        import torch

        if len(_torch_streams) > 256:  # streams made on the fly: stay bounded
            _torch_streams.clear()
        st = _torch_streams[ids] = torch.cuda.Stream(stream_id=ids[0], device_index=ids[1], device_type=ids[2])
    return st


def _wait_for_torch(ep: _Endpoint, device: Any, current: Any = None) -> int:
    """Make JAX's external-ready stream wait for torch's current stream of ``device`` (what torch's
    ``__dlpack__(stream=s)`` does: record an event on the current stream, make ``s`` wait for it);
    returns that JAX stream, to be given to the import whose buffer carries the wait.

    The event is reused, one per (device, thread), recorded and waited on back to back: a stream
    wait captures the event's latest record at the time of the call, so recording it again later
    does not change waits already queued. This skips creating and destroying a CUDA event per call
    and the Python layers of ``Stream.wait_stream`` / ``torch.cuda.current_stream``. ``current``:
    torch's current stream of the device, where the caller has it already."""
    s = ep.jax_device.get_stream_for_external_ready_events()  # JAX may rotate through several
    ext = _ext_streams.get(s)
    if ext is None:
        import torch

        ext = _ext_streams[s] = torch.cuda.ExternalStream(s, device=device)
    ev_key = (ep.index, threading.get_ident())
    ev = _cuda_events.get(ev_key)
    if ev is None:
        import torch

        ev = _cuda_events[ev_key] = torch.cuda.Event()
    ep.record(ev, _torch_current_stream(ep) if current is None else current)
    ep.wait(ev, ext)
    return s


def _import_stream(ep: _Endpoint, device: Any) -> int | None:
    """The ready stream for the lean imports of one call: ``_wait_for_torch``'s, or ``None`` (import as
    ready) when torch's current stream of the device has finished everything queued on it so far
    (``cudaStreamQuery``): then there is nothing to order after, and the imports skip the event record
    and wait on torch's side and the ready event PJRT records on its external-ready stream (which the
    executable then waits for). Work this thread queues later comes after the call anyway; work other
    streams do is not ordered either way (torch's ``record_stream`` rule). ``_lean_state["idle_skip"]``
    (``QUANTACT_IDLE_STREAM_SKIP=0``) turns the query off: every call waits."""
    current = _torch_current_stream(ep)
    if ep.query is not None and _lean_state["idle_skip"] and ep.query(current):
        return None
    return _wait_for_torch(ep, device, current)


def _probe(device: Any) -> _Endpoint | None:
    """Resolve ``device`` through the public path and check the lean path against it on a probe
    tensor; None (and the reason recorded) if anything differs or fails."""
    import jax
    import numpy as np
    import torch

    api = _lean_api()
    if api is None:
        return None
    imp, exp, t2d, d2t = api
    try:
        probe = torch.arange(64, dtype=torch.uint8, device=device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            ref = jax.dlpack.from_dlpack(probe)  # the public path chooses the device (torch exports the current one)
        (jdev,) = ref.devices()
        dl_type = int(probe.__dlpack_device__()[0])
        if device.type == "cuda":
            ep = _cuda_endpoint(jdev, dl_type, device.index)
            # the C calls name the stream torch.cuda.current_stream names
            cur = torch.cuda.current_stream(device)
            if _torch_current_stream(ep) != cur or _current_stream_ptr(ep) != _cuda_stream_ptr(cur):
                _lean_state["reason"] = f"torch's current-stream C calls on {device} disagree with torch.cuda.current_stream"
                return None
            try:  # the idle-stream query must answer a bool (else: always wait)
                if ep.query is not None and not isinstance(ep.query(cur), bool):
                    ep = ep._replace(query=None)
            except Exception:  # noqa: BLE001
                ep = ep._replace(query=None)
        else:
            ep = _Endpoint(jdev, dl_type, False)
        stream = _wait_for_torch(ep, device) if ep.cuda else None
        a = imp(t2d(probe), jdev, stream, False, dl_type)
        ok = (isinstance(a, jax.Array) and a.devices() == {jdev} and a.shape == (64,) and a.dtype == np.uint8
              and a.unsafe_buffer_pointer() == probe.data_ptr())
        ok = ok and np.array_equal(np.asarray(a), np.arange(64, dtype=np.uint8))
        back = d2t(exp(a, stream=_current_stream_ptr(ep) if ep.cuda else None))
        ok = ok and (isinstance(back, torch.Tensor) and back.device == probe.device and back.dtype == probe.dtype
                     and back.data_ptr() == probe.data_ptr())
        if not ok:
            _lean_state["reason"] = f"lean DLPack probe on {device} disagreed with the public path"
            return None
        return ep
    except Exception as e:  # noqa: BLE001 -- a private API that changed: fall back, say why
        _lean_state["reason"] = f"lean DLPack probe on {device} failed ({type(e).__name__}: {e})"
        return None


# ---- the lean path's pieces, for callers that cross the same tensors on every call (the torch ops) ----
#
# ``tensors_to_jax(checked=True)`` / ``arrays_to_torch(checked=True)`` are these pieces behind a generic
# signature (a tuple of tensors, ``None`` entries, keyword arguments). A caller whose arguments were
# validated once per metadata (the torch ops' plans: dtype, device, contiguity) may call the pieces
# itself, as ``tensors_to_jax`` does:
#
#     ep = lean_endpoints.get(device)          # None: not probed yet, or the lean path is off there
#     imp, exp, t2d, d2t = lean_api()          # non-None wherever an endpoint exists
#     s = import_stream(ep, device) if ep.cuda else None
#     a = imp(t2d(t), ep.jax_device, s, False, ep.dl_type)    # the first tensor carries s, the others None
#     ...                                      # (joint=True); any exception: use tensors_to_jax instead
#     t = d2t(exp(a, export_stream(ep) if ep.cuda else None))
#
#: torch.device -> verified ``_Endpoint`` (or None): read-only outside this module.
lean_endpoints = _endpoints


def lean_api() -> _LeanAPI:
    """(jaxlib import, jaxlib export, torch to_dlpack, torch from_dlpack): read per call, so that a
    replaced API (tests) is seen; valid wherever :data:`lean_endpoints` holds an endpoint."""
    return _lean_state["api"]


#: ``import_stream(ep, device)``: the ready stream of a call's first lean import on a CUDA endpoint
#: (``None``: import as ready; see :func:`tensors_to_jax`).
import_stream = _import_stream
#: ``export_stream(ep)``: the stream value of a lean export on a CUDA endpoint (torch's current stream).
export_stream = _current_stream_ptr


def _endpoint(device: Any) -> _Endpoint | None:
    try:
        return _endpoints[device]
    except KeyError:
        ep = _endpoints[device] = _probe(device) if _lean_state["enabled"] else None
        return ep


def _check_tensor_for_jax(t: Any, device: Any, what: str) -> None:
    """The checks :func:`to_jax` makes on a plain tensor, plus one device for all."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise BridgeError(f"{what} must be a torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}")
    _check_dtype(t.dtype, what)
    if t.device.type not in ("cpu", "cuda"):
        raise BridgeError(f"{what} is on device {t.device}; the bridge handles cpu and cuda tensors")
    if t.device != device:
        raise BridgeError(f"{what} is on {t.device} but the first tensor on {device}; import one device at a time")
    if not is_compact(t.shape, t.stride()):
        raise BridgeError(f"{what} of shape {tuple(t.shape)} has non-compact strides {tuple(t.stride())}; only "
                          "dense layouts cross zero-copy: call .contiguous() first (or pass copy=True)")


def tensors_to_jax(tensors: Sequence[Any], *, copy: bool | None = None, joint: bool = False,
                   checked: bool = False) -> tuple[Any, ...]:
    """Import several torch tensors of one device into JAX: ``tuple(to_jax(t, copy=copy) for t in
    tensors)`` (``None`` entries stay ``None``), at a fraction of the host cost.

    Same results and guarantees as :func:`to_jax` (zero-copy, the same ``BridgeError`` s and
    ``BridgeCopyWarning``), through the lean path where it is verified: contiguous tensors are
    imported with jaxlib's DLPack call directly (``copy=False``, so a CPU buffer XLA cannot share
    goes through ``to_jax`` instead, which copies with a warning or raises as ``copy`` says).

    Streams (CUDA): JAX's external-ready stream is made to wait for torch's current stream of the
    tensors' device *once*, and the first tensor's import records its ready event on that stream,
    after the wait. ``joint=False`` records it for every tensor (each array is ordered on its own).
    Where torch's current stream has already finished all its queued work (``cudaStreamQuery``, one
    C call) there is nothing to wait for: every tensor is imported as ready, with no event on either
    side (``_import_stream``; ``QUANTACT_IDLE_STREAM_SKIP=0`` always waits).
    ``joint=True`` records it for the first only and imports the others as ready: correct when
    the arrays are used *together* in one JAX computation, because an execution waits for every
    input's ready event, and the first one's already orders all torch work queued before this call
    (the torch side made no distinction between the tensors either: the wait covers its whole
    current stream). The torch ops use ``joint=True`` (one call, one executable).

    ``checked=True`` skips the per-tensor checks (type, dtype, device, strides) for callers that
    made them already (the torch ops validate every argument before importing).
    """
    tensors = tuple(tensors)
    if checked and not copy and tensors and tensors[0] is not None:  # the torch ops: x first, all checked
        device = tensors[0].device
        ep = _endpoints.get(device)
        if ep is not None:
            return _lean_import(ep, device, tensors, 0, joint, copy)
    first = next((i for i, t in enumerate(tensors) if t is not None), None)
    if first is None:
        return tensors
    if copy:
        return tuple(None if t is None else to_jax(t, copy=True) for t in tensors)
    device = getattr(tensors[first], "device", None)
    if not checked:
        for i, t in enumerate(tensors):
            if t is not None:
                _check_tensor_for_jax(t, device, f"tensor {i}")
    ep = _endpoints.get(device) or _endpoint(device)
    if ep is None:
        return tuple(None if t is None else to_jax(t, copy=copy) for t in tensors)
    return _lean_import(ep, device, tensors, first, joint, copy)


def _lean_import(ep: _Endpoint, device: Any, tensors: tuple, first: int, joint: bool, copy: bool | None) -> tuple:
    imp, _, t2d, _ = _lean_state["api"]
    jdev, dl_type = ep.jax_device, ep.dl_type
    stream = _import_stream(ep, device) if ep.cuda else None
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        try:
            if not t.is_contiguous():  # compact but permuted: the public path handles its layout
                raise BufferError("not contiguous")
            out.append(imp(t2d(t), jdev, stream if (i == first or not joint) else None, False, dl_type))
        except Exception:  # noqa: BLE001 -- e.g. an unaligned CPU buffer: to_jax copies/warns/raises as documented
            out.append(to_jax(t, copy=copy))
    return tuple(out)


def arrays_to_torch(arrays: Sequence[Any], *, copy: bool | None = None, device: Any = None,
                    checked: bool = False) -> tuple[Any, ...]:
    """Export several single-device JAX arrays of one device to torch: ``tuple(to_torch(a, copy=copy)
    for a in arrays)`` (``None`` entries stay ``None``), through the lean path where it is verified
    (jaxlib's DLPack export, then ``torch.utils.dlpack.from_dlpack`` on the capsule).

    Streams (CUDA): every export makes torch's current stream of the device wait for that array
    (as ``torch.from_dlpack`` does); on CPU the export waits for the array on the host. ``device``
    (the arrays' torch device) saves looking it up; ``checked=True`` skips the per-array checks
    (concrete, not deleted, one device, dtype) for callers that know them to hold (the torch ops
    export their executable's outputs).
    """
    arrays = tuple(arrays)
    if checked and device is not None and not copy:  # the torch ops: their executable's outputs
        ep = _endpoints.get(device)
        if ep is not None:
            _, exp, _, d2t = _lean_state["api"]
            stream = _current_stream_ptr(ep) if ep.cuda else None
            out = []
            for a in arrays:
                out.append(None if a is None else d2t(exp(a, stream=stream)))
            return tuple(out)
    import torch

    first = next((a for a in arrays if a is not None), None)
    if first is None:
        return arrays
    if copy or not _is_jax_array(first):
        return tuple(None if a is None else to_torch(a, copy=copy) for a in arrays)
    if not checked:
        for i, a in enumerate(arrays):
            if a is not None:
                if not _is_jax_array(a):
                    raise BridgeError(f"array {i} must be a jax.Array, got {type(a).__module__}.{type(a).__qualname__}")
                _check_concrete_jax(a, f"array {i}")
                _check_dtype(a.dtype, f"array {i}")
                if a.devices() != first.devices():
                    raise BridgeError(f"array {i} is on {a.devices()} but the first on {first.devices()}")
    if device is None:
        (jdev,) = first.devices()
        device = torch.device("cuda", jdev.local_hardware_id) if jdev.platform == "gpu" else torch.device("cpu")
    ep = _endpoint(device) if device.type in ("cpu", "cuda") else None
    if ep is None:
        return tuple(None if a is None else to_torch(a, copy=copy) for a in arrays)
    _, exp, _, d2t = _lean_state["api"]
    stream = _current_stream_ptr(ep) if ep.cuda else None
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        t = d2t(exp(a, stream=stream))
        if not checked and t.numel() and t.data_ptr() != a.unsafe_buffer_pointer():  # never seen; never hidden
            raise BridgeError(f"torch copied a {a.shape} {a.dtype} array on import")
        out.append(t)
    return tuple(out)


# ---- public -----------------------------------------------------------------------------


def to_jax(x: Any, *, copy: bool | None = None, validate: bool = True):
    """``torch.Tensor`` -> ``jax.Array``; torch ``QuantizedActivation`` -> JAX ``QuantizedActivation``.

    Zero-copy: the result shares the source's buffer (same pointer) and keeps it alive. **Read-only
    rule:** do not write into the torch tensor (or any view of it) while the JAX result is in use;
    JAX assumes immutability, so an in-place write is undefined behaviour for JAX. On CUDA the
    import is stream-ordered (JAX waits for torch's current stream).

    ``copy``: ``None`` shares where possible (a CPU buffer that is not 64-byte aligned is copied by
    JAX, with a :class:`BridgeCopyWarning`), ``False`` raises :class:`BridgeError` instead of copying,
    ``True`` returns an independent copy. ``validate`` checks a ``QuantizedActivation`` against its key
    (``QuantLayoutError``). A ``jax.Array`` or JAX ``QuantizedActivation`` is returned unchanged.

    Raises ``BridgeError`` for unsupported dtypes (see :data:`BRIDGE_DTYPES`), non-compact strides,
    data and scale on different devices, devices other than cpu/cuda, and other input types.
    """
    import jax

    from quantact_jax.activation import QuantizedActivation as JaxQA

    if isinstance(x, JaxQA) or isinstance(x, jax.Array):
        return x
    torch = sys.modules.get("torch")  # a torch input means torch is already imported
    tqa = sys.modules.get("quantact_torch.activation")
    if tqa is not None and isinstance(x, tqa.QuantizedActivation):
        return _qa_to_jax(x, copy, validate)
    if torch is not None and isinstance(x, torch.Tensor):
        return _tensor_to_jax(x, copy)
    raise BridgeError(f"to_jax takes a torch.Tensor or a quantact_torch QuantizedActivation, got "
                      f"{type(x).__module__}.{type(x).__qualname__}")


def to_torch(x: Any, *, copy: bool | None = None, validate: bool = True):
    """``jax.Array`` -> ``torch.Tensor``; JAX ``QuantizedActivation`` -> torch ``QuantizedActivation``.

    Zero-copy: the result shares the JAX array's buffer (same pointer) and keeps it alive. **Read-only
    rule:** never write into the returned tensor (no in-place ops, no ``out=``): the memory belongs to
    an immutable JAX array, and the write would be visible to JAX (undefined behaviour). Use
    ``copy=True`` for a writable, independent tensor. On CUDA the export is stream-ordered (torch's
    current stream waits for JAX's pending work).

    For a ``QuantizedActivation`` the torch ``scale`` is vLLM's view of the JAX scale storage
    (column-major layouts get strides ``(1, M)`` / ``(1, round_up(M, 4))``); ``orig_dtype`` becomes a
    torch dtype. A ``torch.Tensor`` or torch ``QuantizedActivation`` is returned unchanged.

    Raises ``BridgeError`` for tracers, deleted or multi-device arrays, unsupported dtypes, data and
    scale on different devices, and other input types.
    """
    torch = sys.modules.get("torch")
    tqa = sys.modules.get("quantact_torch.activation")
    if (torch is not None and isinstance(x, torch.Tensor)) or (
            tqa is not None and isinstance(x, tqa.QuantizedActivation)):
        return x
    import jax

    from quantact_jax.activation import QuantizedActivation as JaxQA

    if isinstance(x, JaxQA):
        return _qa_to_torch(x, copy, validate)
    if isinstance(x, jax.Array):
        return _array_to_torch(x, copy)
    raise BridgeError(f"to_torch takes a jax.Array or a quantact_jax QuantizedActivation, got "
                      f"{type(x).__module__}.{type(x).__qualname__}")
