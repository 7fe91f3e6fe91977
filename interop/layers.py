"""Key and scale exposure on layers, the same for JAX and torch layers.

A *kernel* (consumer implementation) that can take a pre-quantized input
advertises ``input_quant_key: QuantKey`` and may implement
``input_quant_scales(layer) -> InputQuantScales``. ``expose_input_quant_key``
copies both onto the layer, so producers read ``layer.input_quant_key`` /
``layer.input_quant_scales`` and never kernel-specific attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from interop.errors import NoInputQuantKeyError, QuantLayoutError
from interop.keys import InputQuantScales, QuantKey, ScaleDirection

KEY_ATTR = "input_quant_key"
SCALES_ATTR = "input_quant_scales"


def expose_input_quant_key(layer: Any, kernel: Any) -> QuantKey | None:
    """Set ``layer.input_quant_key`` (and ``input_quant_scales``) from ``kernel``.

    Leaves the layer without a key (``None``) when the kernel advertises none,
    so unsupported backends never receive a pre-quantized activation.
    Returns the exposed key.
    """
    key = getattr(kernel, KEY_ATTR, None)
    if key is not None and not isinstance(key, QuantKey):
        raise TypeError(f"{type(kernel).__name__}.{KEY_ATTR} must be a QuantKey or None, got {key!r}")
    scales = InputQuantScales()
    if key is not None and hasattr(kernel, "input_quant_scales"):
        scales = kernel.input_quant_scales(layer)
        if not isinstance(scales, InputQuantScales):
            raise TypeError(f"{type(kernel).__name__}.input_quant_scales must return InputQuantScales")
    if key is not None and key.scale.static and scales.input_scale is None and not key.is_fp4:
        raise ValueError(f"kernel advertises static key {key} but exposes no input_scale")
    object.__setattr__(layer, KEY_ATTR, key)  # works on frozen dataclasses too
    object.__setattr__(layer, SCALES_ATTR, scales if key is not None else None)
    return key


def get_input_quant_key(layer: Any, required: bool = False) -> QuantKey | None:
    """The key a layer exposes, or None; ``required=True`` raises instead of None."""
    key = getattr(layer, KEY_ATTR, None)
    if key is None and required:
        raise NoInputQuantKeyError(
            f"{type(layer).__name__} exposes no input quantization key: its kernel cannot consume a "
            "pre-quantized activation (call expose_input_quant_key(layer, kernel) first, or pass a plain array)")
    return key


def get_input_quant_scales(layer: Any) -> InputQuantScales:
    """The scales exposed with the key; raises ``NoInputQuantKeyError`` if the layer has no key."""
    get_input_quant_key(layer, required=True)
    return getattr(layer, SCALES_ATTR, None) or InputQuantScales()


def resolve_input_quant(key: QuantKey | None, layer: Any, scale: Any, global_scale: Any,
                        reciprocal: Callable[[Any], Any]) -> tuple[QuantKey, Any, Any]:
    """A producer's ``(key, scale, global_scale)``: the explicit ones, or those ``layer`` exposes.

    Explicit scales win over exposed ones; an explicit key must equal the exposed key. An exposed
    global scale in the dequant direction is inverted with ``reciprocal`` (the framework's own
    f32 division, so the JAX and torch producers stay bit-identical).
    """
    if key is None and layer is None:
        raise TypeError("pass a QuantKey or a layer that exposes one")
    if layer is not None:
        lkey = get_input_quant_key(layer, required=True)
        if key is not None and key != lkey:
            raise QuantLayoutError(f"requested {key} but the layer exposes {lkey}")
        key = lkey
        scales = get_input_quant_scales(layer)
        if scale is None:
            scale = scales.input_scale
        if global_scale is None and scales.global_scale is not None:
            global_scale = scales.global_scale
            if scales.global_scale_direction == ScaleDirection.DEQUANT:
                global_scale = reciprocal(global_scale)
    return key, scale, global_scale
