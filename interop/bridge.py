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

import sys
import warnings
from typing import Any

from interop.dtypes import canonical_dtype
from interop.errors import BridgeError

#: Dtypes (canonical names) that cross the bridge zero-copy.
BRIDGE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "uint8", "int8", "int32",
                 "float32", "bfloat16", "float16")


class BridgeCopyWarning(UserWarning):
    """The bridge had to copy instead of sharing the buffer (CPU buffer not 64-byte aligned)."""


__all__ = ["to_jax", "to_torch", "BRIDGE_DTYPES", "BridgeCopyWarning", "BridgeError", "buffer_pointer",
           "is_compact"]


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
