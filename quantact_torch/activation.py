"""``QuantizedActivation`` for PyTorch: vLLM's dataclass, registered as a torch pytree.

The ``scale`` tensor is exactly what vLLM's kernels return: for column-major
layouts a strided ``[M, G]`` view (``strides (1, M)``, or ``(1, round_up(M, 4))``
for the TMA-aligned and packed UE8M0 layouts) of a contiguous storage buffer.
``scale_storage`` recovers that buffer (what a JAX array holds) without copying;
``scale_from_storage`` builds vLLM's view from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

from interop.dtypes import canonical_dtype
from interop.errors import QuantKeyMismatchError, QuantLayoutError
from interop.keys import QuantKey, ScaleLayout
from interop.layers import expose_input_quant_key, get_input_quant_key, get_input_quant_scales
from interop.layout import check_storage, rows_cols, scale_storage_shape

_COL_LAYOUTS = (ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA, ScaleLayout.PACKED_UE8M0)


def scale_from_storage(storage: torch.Tensor, key: QuantKey, orig_shape) -> torch.Tensor:
    """vLLM's view of a contiguous scale storage tensor (no copy)."""
    if key.scale.layout not in _COL_LAYOUTS:
        return storage
    m, _ = rows_cols(orig_shape)
    groups, mp = storage.shape
    return storage.as_strided((m, groups), (1, mp))  # keeps the storage offset; no int-returning call to trace


def scale_storage(scale: torch.Tensor, key: QuantKey, orig_shape) -> torch.Tensor:
    """The contiguous storage behind vLLM's scale view (no copy); raises
    ``QuantLayoutError`` if the view's strides are not the layout's."""
    if key.scale.layout not in _COL_LAYOUTS:
        return scale
    m, k = rows_cols(orig_shape)
    want = scale_storage_shape(key.scale, m, k)
    groups, mp = want
    if scale.dim() != 2 or tuple(scale.shape) != (m, groups) or (m > 1 and scale.stride(0) != 1) or (
            groups > 1 and scale.stride(1) != mp):
        raise QuantLayoutError(
            f"{key}: scale is a {tuple(scale.shape)} tensor with strides {tuple(scale.stride())}, but layout "
            f"{key.scale.layout} needs vLLM's [M={m}, G={groups}] view with strides (1, {mp})")
    try:
        return scale.as_strided(want, (mp, 1), scale.storage_offset())
    except RuntimeError as e:  # e.g. an unpadded [M, 1] tensor for a padded (TMA / packed) layout
        raise QuantLayoutError(
            f"{key}: scale is a {tuple(scale.shape)} tensor whose storage cannot hold layout "
            f"{key.scale.layout}'s padded storage {want} (vLLM's [M={m}, G={groups}] view with strides "
            f"(1, {mp})): {e}") from e


#: Metadata (key, orig_shape, orig_dtype, data shape/dtype, scale storage shape/dtype) that
#: ``check_storage`` accepted: ``validate`` runs the check once per combination (a pure function
#: of these; the scale view's strides are checked on every call by ``scale_storage``).
_VALID: set[tuple] = set()


@dataclasses.dataclass
class QuantizedActivation:
    """vLLM-style quantized activation (same fields and semantics as the JAX pytree).

    ``data``: ``(*orig_shape[:-1], K)`` quantized codes (``K // 2`` uint8 for fp4).
    ``scale``: vLLM's scale tensor for ``quant_key``'s layout.
    """

    data: torch.Tensor
    scale: torch.Tensor
    orig_dtype: torch.dtype
    orig_shape: torch.Size
    quant_key: QuantKey

    def __post_init__(self):
        self.orig_shape = torch.Size(self.orig_shape)

    @property
    def shape(self) -> torch.Size:
        return self.orig_shape

    def scale_storage(self) -> torch.Tensor:
        return scale_storage(self.scale, self.quant_key, self.orig_shape)

    def validate(self) -> QuantizedActivation:
        """Raise ``QuantLayoutError`` if data/scale contradict the key and ``orig_shape``."""
        if not isinstance(self.data, torch.Tensor) or not isinstance(self.scale, torch.Tensor):
            raise QuantLayoutError("data and scale must be torch tensors")
        if self.data.device != self.scale.device:
            raise QuantLayoutError(f"data is on {self.data.device} but scale on {self.scale.device}")
        storage = self.scale_storage()
        meta = None
        if not torch.compiler.is_compiling():  # eager: check each metadata combination once
            meta = (self.quant_key, self.orig_shape, self.orig_dtype, self.data.shape, self.data.dtype, storage.shape,
                    storage.dtype)
            try:
                if meta in _VALID:
                    return self
            except TypeError:  # unhashable metadata: check every time
                meta = None
        check_storage(self.quant_key, tuple(self.orig_shape), canonical_dtype(self.orig_dtype),
                      tuple(self.data.shape), canonical_dtype(self.data.dtype),
                      tuple(storage.shape), canonical_dtype(storage.dtype))
        if meta is not None:
            if len(_VALID) >= 4096:  # shapes made on the fly: stay bounded
                _VALID.clear()
            _VALID.add(meta)
        return self

    def __repr__(self) -> str:
        return (f"QuantizedActivation({self.quant_key}, orig={tuple(self.orig_shape)} {self.orig_dtype}, "
                f"data={tuple(self.data.shape)} {self.data.dtype}, scale={tuple(self.scale.shape)} "
                f"{self.scale.dtype}, device={self.data.device})")


def _flatten(qa: QuantizedActivation):
    return [qa.data, qa.scale], (qa.orig_dtype, tuple(qa.orig_shape), qa.quant_key)


def _unflatten(leaves, ctx) -> QuantizedActivation:
    return QuantizedActivation(leaves[0], leaves[1], ctx[0], torch.Size(ctx[1]), ctx[2])


pytree.register_pytree_node(QuantizedActivation, _flatten, _unflatten,
                            serialized_type_name="quantact_torch.QuantizedActivation")


def as_quantized_activation(x: Any, expected_key: QuantKey) -> QuantizedActivation | None:
    """``None`` for a plain tensor, the activation when its key is
    ``expected_key``, else ``QuantKeyMismatchError``; also validates
    data/scale (``QuantLayoutError``). Same rules as the JAX side."""
    if not isinstance(x, QuantizedActivation):
        if isinstance(x, torch.Tensor):
            return None
        raise TypeError(f"expected a torch.Tensor or QuantizedActivation, got {type(x).__name__}")
    if not isinstance(expected_key, QuantKey):
        raise TypeError(f"expected_key must be a QuantKey, got {expected_key!r}")
    if x.quant_key != expected_key:
        raise QuantKeyMismatchError(
            f"activation was quantized as {x.quant_key}, but this consumer expects {expected_key}; "
            "route the producer from the consumer's exposed key (get_input_quant_key) instead of re-quantizing")
    return x.validate()


__all__ = ["QuantizedActivation", "as_quantized_activation", "expose_input_quant_key", "get_input_quant_key",
           "get_input_quant_scales", "scale_storage", "scale_from_storage"]
