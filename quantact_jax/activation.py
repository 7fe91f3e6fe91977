"""``QuantizedActivation`` as a JAX pytree, and the consumer-side key check."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from interop.dtypes import canonical_dtype
from interop.errors import QuantKeyMismatchError, QuantLayoutError
from interop.keys import QuantKey
from interop.layers import expose_input_quant_key, get_input_quant_key, get_input_quant_scales
from interop.layout import check_storage


@dataclasses.dataclass(frozen=True)
class QuantizedActivation:
    """A quantized activation: the data and scale arrays plus static metadata.

    ``data`` and ``scale`` are pytree leaves; ``orig_dtype`` (a NumPy dtype),
    ``orig_shape`` and ``quant_key`` are static, so ``jit`` specialises per key
    and a mismatch fails at trace time. Shapes follow :mod:`interop.layout`:
    ``data`` is ``(*orig_shape[:-1], K)`` (``K // 2`` uint8 for packed fp4) and
    ``scale`` is the contiguous storage of the key's scale layout.
    """

    data: jax.Array
    scale: jax.Array
    orig_dtype: np.dtype
    orig_shape: tuple[int, ...]
    quant_key: QuantKey

    def __post_init__(self):
        # Normalise static fields only; leaves may be tracers or sentinels here.
        object.__setattr__(self, "orig_dtype", np.dtype(self.orig_dtype))
        object.__setattr__(self, "orig_shape", tuple(int(s) for s in self.orig_shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.orig_shape

    def validate(self) -> QuantizedActivation:
        """Raise ``QuantLayoutError`` if data/scale contradict the key and ``orig_shape``."""
        check_storage(self.quant_key, self.orig_shape, canonical_dtype(self.orig_dtype),
                      np.shape(self.data), canonical_dtype(self.data.dtype),
                      np.shape(self.scale), canonical_dtype(self.scale.dtype))
        return self

    def __repr__(self) -> str:
        return (f"QuantizedActivation({self.quant_key}, orig={self.orig_shape} {self.orig_dtype}, "
                f"data={tuple(self.data.shape)} {self.data.dtype}, scale={tuple(self.scale.shape)} {self.scale.dtype})")


jax.tree_util.register_dataclass(
    QuantizedActivation, data_fields=["data", "scale"], meta_fields=["orig_dtype", "orig_shape", "quant_key"])


def as_quantized_activation(x: Any, expected_key: QuantKey) -> QuantizedActivation | None:
    """Consumer-side check: ``None`` for a plain array (the consumer quantizes
    it itself), the activation when its key is ``expected_key``, else
    ``QuantKeyMismatchError``. Also validates data/scale against the key
    (``QuantLayoutError``). Never re-quantizes. Works under ``python -O``.
    """
    if not isinstance(x, QuantizedActivation):
        if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__jax_array__"):
            return None
        raise TypeError(f"expected a jax array or QuantizedActivation, got {type(x).__name__}")
    if not isinstance(expected_key, QuantKey):
        raise TypeError(f"expected_key must be a QuantKey, got {expected_key!r}")
    if x.quant_key != expected_key:
        raise QuantKeyMismatchError(
            f"activation was quantized as {x.quant_key}, but this consumer expects {expected_key}; "
            "route the producer from the consumer's exposed key (get_input_quant_key) instead of re-quantizing")
    return x.validate()


__all__ = ["QuantizedActivation", "as_quantized_activation", "expose_input_quant_key",
           "get_input_quant_key", "get_input_quant_scales", "QuantKeyMismatchError", "QuantLayoutError"]
