"""A quantized linear layer's weights as vLLM / compressed-tensors state dicts store them, checked
once for both frameworks.

``plan_linear(entries)`` reads only ``.shape`` and ``.dtype`` of each entry (NumPy, JAX or torch
arrays alike), rejects anything that contradicts the scheme with a :class:`QuantLayoutError` naming
the entry, and returns a :class:`LinearPlan`: the sizes, the weight key, the input key, and the shape
and dtype every entry is converted to. ``quantact_jax.layers`` and ``quantact_torch.layers`` build
their ``QuantLinear`` from it, so both accept and reject exactly the same dicts.

Entries (names relative to the layer's prefix):

- fp8: ``weight`` float8_e4m3fn ``[N, K]``; ``weight_scale`` (f32/bf16/f16, widened to f32 exactly)
  ``()``/``(1,)`` per-tensor, ``(N,)``/``(N, 1)`` per-output-channel or ``(cdiv(N,128), cdiv(K,128))``
  128x128 blocks; optional ``input_scale`` (one value: static per-tensor activations, dequantisation
  direction ``x ~= q * s``); optional ``bias`` ``(N,)``.
- NVFP4 (compressed-tensors W4A4): ``weight`` (or ``weight_packed``) uint8 ``[N, K/2]``, two e2m1
  codes per byte; ``weight_scale`` float8_e4m3fn ``[N, K/16]`` row-major; ``weight_global_scale`` and
  ``input_global_scale`` (one value each, *quantisation* direction ``448 * 6 / amax``, as
  compressed-tensors stores them and vLLM's ``scaled_fp4_quant`` takes them); optional ``bias``.

Anything else under the prefix is an error (nothing is silently ignored).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from interop.dtypes import canonical_dtype
from interop.errors import QuantLayoutError
from interop.keys import (
    QuantFormat,
    QuantKey,
    ScaleLayout,
    kFp8Dynamic128Sym,
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8Static128BlockSym,
    kFp8StaticTensorSym,
    kFp8StaticTokenSym,
    kMxfp4Static,
    kMxfp8Static,
    kNvfp4Dynamic,
    kNvfp4Static,
)
from interop.layout import cdiv

#: Weight keys, applied to the ``[N, K]`` weight as if it were an activation: per-tensor,
#: per-output-channel (one scale per row, ``(N, 1)``), DeepSeek 128x128 blocks, NVFP4 16-blocks
#: (row-major ``[N, K/16]`` e4m3 scales plus a global scale), MXFP8 / MXFP4 32-blocks (e4m3 codes
#: ``[N, K]`` or packed e2m1 ``[N, K/2]``, row-major ``[N, K/32]`` e8m0 scales, no global scale; the
#: dequantising GEMM's weights, :mod:`quantact_jax.dequant_gemm`; state-dict loading is fp8/NVFP4 only).
WEIGHT_PER_TENSOR = kFp8StaticTensorSym
WEIGHT_PER_CHANNEL = kFp8StaticTokenSym
WEIGHT_BLOCK_128 = kFp8Static128BlockSym
WEIGHT_NVFP4 = kNvfp4Static.with_layout(ScaleLayout.ROW_MAJOR)
WEIGHT_MXFP8 = kMxfp8Static.with_layout(ScaleLayout.ROW_MAJOR)
WEIGHT_MXFP4 = kMxfp4Static.with_layout(ScaleLayout.ROW_MAJOR)

ENTRIES = ("weight", "weight_scale", "bias", "input_scale", "weight_global_scale", "input_global_scale")
ALIASES = {"weight_packed": "weight"}  # compressed-tensors' name for packed fp4 weights
SCALE_DTYPES = ("float32", "bfloat16", "float16")  # widened to f32 exactly
BIAS_DTYPES = SCALE_DTYPES


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """What a loader builds: ``N`` (output features), ``K`` (input features), the weight key, the
    input key, and for every present entry the shape and canonical dtype to convert it to."""

    n: int
    k: int
    weight_key: QuantKey
    input_key: QuantKey
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]


def weight_key_for_input(input_key: QuantKey) -> QuantKey:
    """The weight scheme vLLM pairs with an activation key: per-token -> per-channel,
    per-tensor -> per-tensor, 1x128 groups -> 128x128 blocks, NVFP4 -> NVFP4."""
    if input_key.format == QuantFormat.NVFP4:
        return WEIGHT_NVFP4
    gs = input_key.scale.group_shape
    if input_key.format == QuantFormat.FP8:
        if gs.is_per_token():
            return WEIGHT_PER_CHANNEL
        if gs.is_per_tensor():
            return WEIGHT_PER_TENSOR
        if input_key.group_size == 128:
            return WEIGHT_BLOCK_128
    raise QuantLayoutError(f"no weight scheme pairs with input key {input_key}: quantized linear layers take "
                           "fp8 per-tensor / per-token / 1x128-group or NVFP4 activations")


def fp8_weight_key(scale_shape: tuple[int, ...], n: int, k: int, prefer_block: bool = False,
                   what: str = "weight_scale") -> QuantKey:
    """The fp8 weight key a ``weight_scale`` of this shape implies for an ``[N, K]`` weight.

    A ``(1, 1)`` scale on a weight of one 128x128 block reads both ways (the same number);
    ``prefer_block`` picks the block reading (for 1x128-group activations).
    """
    shp = tuple(int(s) for s in scale_shape)
    blocks = (cdiv(n, 128), cdiv(k, 128))
    if prefer_block and shp == blocks:
        return WEIGHT_BLOCK_128
    if shp in ((), (1,), (1, 1)):
        return WEIGHT_PER_TENSOR
    if shp in ((n,), (n, 1)):
        return WEIGHT_PER_CHANNEL
    if shp == blocks:
        return WEIGHT_BLOCK_128
    raise QuantLayoutError(f"{what} has shape {shp}, which fits no fp8 weight scheme for weight [N={n}, K={k}]: "
                           f"expected () or (1,) per-tensor, ({n}, 1) per-channel, or {blocks} 128x128 blocks")


def select_entries(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The entries directly under ``prefix`` (aliases resolved), e.g. ``prefix="mlp.down_proj."``."""
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        short = ALIASES.get(name[len(prefix):], name[len(prefix):])
        if short in out:
            raise QuantLayoutError(f"{prefix}{short} is given twice (as weight and weight_packed?)")
        out[short] = value
    if not out:
        raise QuantLayoutError(f"no state-dict entries under prefix {prefix!r} (have e.g. "
                               f"{sorted(state_dict)[:4]})")
    return out


def check_names(entries: Mapping[str, Any], what: str = "") -> None:
    """``QuantLayoutError`` for entries a quantized linear layer does not have."""
    unknown = sorted(set(entries) - set(ENTRIES))
    if unknown:
        raise QuantLayoutError(f"unexpected state-dict entries {[what + u for u in unknown]}: a quantized linear "
                               f"layer has {', '.join(ENTRIES)}")


def _meta(value: Any) -> tuple[tuple[int, ...], str]:
    try:
        return tuple(int(s) for s in value.shape), canonical_dtype(value.dtype)
    except (AttributeError, TypeError) as e:
        raise QuantLayoutError(f"state-dict entries must be arrays or tensors, got {type(value).__name__}") from e


def plan_linear(entries: Mapping[str, Any], *, input_quant_key: QuantKey | None = None,
                what: str = "") -> LinearPlan:
    """Check a layer's entries (see the module docstring) and plan their conversion.

    ``input_quant_key``: the activation key; default: the one vLLM uses for the weights
    (``input_scale`` present -> ``kFp8StaticTensorSym``; per-channel -> ``kFp8DynamicTokenSym``;
    per-tensor -> ``kFp8DynamicTensorSym``; 128x128 blocks -> ``kFp8Dynamic128Sym``; NVFP4 ->
    ``kNvfp4Dynamic``). ``what`` prefixes entry names in error messages (the state-dict prefix).
    """
    check_names(entries, what)
    meta = {name: _meta(v) for name, v in entries.items()}
    for need in ("weight", "weight_scale"):
        if need not in meta:
            raise QuantLayoutError(f"{what}{need} is missing")
    if input_quant_key is not None and not isinstance(input_quant_key, QuantKey):
        raise TypeError(f"input_quant_key must be a QuantKey, got {input_quant_key!r}")

    def dtype_in(name: str, allowed: tuple[str, ...]) -> None:
        if meta[name][1] not in allowed:
            raise QuantLayoutError(f"{what}{name} has dtype {meta[name][1]}; expected {' / '.join(allowed)}")

    def one_value(name: str) -> None:
        dtype_in(name, SCALE_DTYPES)
        if math.prod(meta[name][0]) != 1:
            raise QuantLayoutError(f"{what}{name} must hold one value, got shape {meta[name][0]}")
        shapes[name], dtypes[name] = (1,), "float32"

    wshape, wdt = meta["weight"]
    if len(wshape) != 2 or wdt not in ("float8_e4m3fn", "uint8"):
        raise QuantLayoutError(f"{what}weight is {wshape} {wdt}; expected float8_e4m3fn [N, K] (fp8) or "
                               "uint8 [N, K/2] (packed NVFP4)")
    shapes: dict[str, tuple[int, ...]] = {"weight": wshape}
    dtypes: dict[str, str] = {"weight": wdt}
    sshape, sdt = meta["weight_scale"]
    if wdt == "float8_e4m3fn":
        n, k = wshape
        for name in ("weight_global_scale", "input_global_scale"):
            if name in meta:
                raise QuantLayoutError(f"{what}{name} is an NVFP4 entry, but {what}weight is fp8")
        dtype_in("weight_scale", SCALE_DTYPES)
        prefer_block = input_quant_key is not None and input_quant_key.group_size == 128
        wkey = fp8_weight_key(sshape, n, k, prefer_block, what + "weight_scale")
        shapes["weight_scale"] = {WEIGHT_PER_TENSOR: (1,), WEIGHT_PER_CHANNEL: (n, 1)}.get(wkey, (cdiv(n, 128), cdiv(k, 128)))
        dtypes["weight_scale"] = "float32"
        static_in = "input_scale" in meta
        if static_in:
            one_value("input_scale")
        key = input_quant_key or (kFp8StaticTensorSym if static_in else {
            WEIGHT_PER_TENSOR: kFp8DynamicTensorSym, WEIGHT_PER_CHANNEL: kFp8DynamicTokenSym,
            WEIGHT_BLOCK_128: kFp8Dynamic128Sym}[wkey])
        gs = key.scale.group_shape
        if key.format != QuantFormat.FP8 or not (gs.is_per_tensor() or (gs.is_per_token() and not key.scale.static)
                                                 or key.group_size == 128):
            raise QuantLayoutError(f"input key {key} does not fit fp8 weights: expected an fp8 per-tensor, dynamic "
                                   "per-token or 1x128-group key")
        if key.scale.static and not static_in:
            raise QuantLayoutError(f"input key {key} is static, but {what}input_scale is missing")
        if static_in and not key.scale.static:
            raise QuantLayoutError(f"{what}input_scale is given, but input key {key} is dynamic (drop the scale or "
                                   "use kFp8StaticTensorSym)")
        if (key.group_size == 128) != (wkey == WEIGHT_BLOCK_128):
            raise QuantLayoutError(f"1x128-group activations go with 128x128-block weight scales and only with "
                                   f"them; got input key {key} and {what}weight_scale of shape {sshape}")
    else:
        n, k = wshape[0], 2 * wshape[1]
        if k % 16:
            raise QuantLayoutError(f"{what}weight [N={n}, K/2={wshape[1]}] packs K={k} codes per row; NVFP4 "
                                   "needs K to be a multiple of 16")
        if "input_scale" in meta:
            raise QuantLayoutError(f"{what}input_scale is an fp8 entry; NVFP4 layers take input_global_scale")
        if sdt != "float8_e4m3fn" or sshape != (n, k // 16):
            raise QuantLayoutError(f"{what}weight_scale is {sshape} {sdt}; NVFP4 weights [N={n}, K={k}] need "
                                   f"float8_e4m3fn ({n}, {k // 16}) row-major block scales")
        shapes["weight_scale"], dtypes["weight_scale"] = sshape, sdt
        for name in ("weight_global_scale", "input_global_scale"):
            if name not in meta:
                raise QuantLayoutError(f"{what}{name} is missing (NVFP4 layers need both global scales)")
            one_value(name)
        wkey = WEIGHT_NVFP4
        key = input_quant_key or kNvfp4Dynamic
        if key.format != QuantFormat.NVFP4 or key.scale.static:
            raise QuantLayoutError(f"input key {key} does not fit NVFP4 weights: expected dynamic NVFP4 "
                                   "activations (kNvfp4Dynamic, any scale layout)")
    if "bias" in meta:
        dtype_in("bias", BIAS_DTYPES)
        if meta["bias"][0] != (n,):
            raise QuantLayoutError(f"{what}bias has shape {meta['bias'][0]}; expected ({n},)")
        shapes["bias"], dtypes["bias"] = (n,), meta["bias"][1]
    return LinearPlan(n=n, k=k, weight_key=wkey, input_key=key, shapes=shapes, dtypes=dtypes)


__all__ = [
    "ENTRIES",
    "WEIGHT_BLOCK_128",
    "WEIGHT_MXFP4",
    "WEIGHT_MXFP8",
    "WEIGHT_NVFP4",
    "WEIGHT_PER_CHANNEL",
    "WEIGHT_PER_TENSOR",
    "LinearPlan",
    "check_names",
    "fp8_weight_key",
    "plan_linear",
    "select_entries",
    "weight_key_for_input",
]
