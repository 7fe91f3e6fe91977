"""Pure-jnp reference quantizers with vLLM's semantics (see shared NUMERICS.md).

Every function here is the *specification* the Pallas kernels and the torch
reference (``quantact_torch.reference``) must match bit for bit. The rules:

- compute in f32; clip to the format's finite range *before* every narrowing
  cast; the stored scale is the dequantisation scale (``x ~= q * scale``);
- exact arithmetic only: true division, ``1 / sqrt`` (both correctly rounded),
  no approximate reciprocal or ``rsqrt``;
- RMSNorm's sum of squares uses a fixed pairwise tree (:func:`tree_sum`), so
  every implementation adds in the same order;
- powers of two (UE8M0, MX) are found from the f32 bits, not ``log2``.

NaN/Inf policy (the same in every kernel and reference): non-finite values
propagate. A dynamic scale over a group holding NaN or Inf is NaN/Inf; codes of
NaN inputs are NaN for fp8 (sign unspecified), ``+-6`` (the largest code; fp4 has
no NaN) for fp4, and ``0`` for int8 (no NaN): the scale carries the NaN. Static
scales saturate ``+-Inf`` inputs to the largest finite code.

Subnormal inputs may be flushed to zero by some backends (XLA:CPU); tests use
normal values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.errors import QuantLayoutError
from interop.keys import QuantFormat, QuantKey, ScaleLayout
from interop.layout import (check_k_divisible, logical_scale_shape, round_up, rows_cols,
                            scale_storage_shape, swizzle_index)
from quantact_jax import exact
from quantact_jax.activation import QuantizedActivation

FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)  # vLLM's minimum dynamic fp8 scale
GROUP_EPS = 1e-10  # per_token_group_quant_fp8's amax floor
FP4_MAX = 6.0
INT8_MAX = 127.0
MX_MIN_EXP_BITS = 1  # smallest e8m0 exponent we produce: 2**-126 (normal f32; avoids subnormals)

F32 = jnp.float32
E4M3 = jnp.float8_e4m3fn
E8M0 = jnp.float8_e8m0fnu


# ---------------------------------------------------------------- elementwise pieces
def sat_fp8(v: jax.Array) -> jax.Array:
    """Clip f32 to +-448 then cast to e4m3fn (round to nearest even). NaN stays NaN."""
    # the where keeps NaN where a backend's clamp (Triton: minnum/maxnum) would drop it
    return jnp.where(jnp.isnan(v), jnp.nan, jnp.clip(v, -FP8_MAX, FP8_MAX)).astype(E4M3)


def sat_int8(v: jax.Array) -> jax.Array:
    """Round half to even, clip to [-128, 127], NaN -> 0, cast to int8."""
    r = jnp.clip(jnp.round(v), -128.0, 127.0)
    return jnp.where(jnp.isnan(r), 0.0, r).astype(jnp.int8)


def pow2_ceil(s: jax.Array) -> jax.Array:
    """``2**ceil(log2(s))`` for positive normal f32, exactly (from the bits); NaN/Inf unchanged."""
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    exp = (bits >> 23) & 0xFF
    up = exp + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    p = jax.lax.bitcast_convert_type(up << 23, F32)
    return jnp.where(jnp.isfinite(s), p, s)


def e8m0_from_f32(s: jax.Array) -> jax.Array:
    """Round a positive f32 up to a power of two and encode as e8m0 bytes (uint8).

    Floors at ``2**-126``; NaN and Inf encode as 0xFF (e8m0's NaN).
    """
    bits = jax.lax.bitcast_convert_type(jnp.maximum(s, np.float32(2.0**-126)), jnp.uint32)
    exp = (bits >> 23) & 0xFF
    up = jnp.minimum(exp + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32), 255)
    up = jnp.where(jnp.isfinite(s), up, 255)
    return up.astype(jnp.uint8)


def f32_from_e8m0(b: jax.Array) -> jax.Array:
    """Decode e8m0 bytes (uint8) to f32: ``2**(b-127)``; 0xFF -> NaN; 0 -> 2**-127 (via 2**-126 / 2)."""
    b32 = b.astype(jnp.uint32)
    v = jax.lax.bitcast_convert_type(jnp.maximum(b32, 1) << 23, F32)
    v = jnp.where(b32 == 0, v * np.float32(0.5), v)
    return jnp.where(b32 == 255, jnp.nan, v)


def e2m1_encode(v: jax.Array) -> jax.Array:
    """f32 -> e2m1 4-bit code (uint8 0..15), round to nearest even, saturating at +-6.

    Magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6]; sign in bit 3; NaN -> +-6 (code 7).
    """
    a = jnp.abs(v)
    mag = jnp.where(a <= 0.25, 0, jnp.where(a < 0.75, 1, jnp.where(a <= 1.25, 2, jnp.where(
        a < 1.75, 3, jnp.where(a <= 2.5, 4, jnp.where(a < 3.5, 5, jnp.where(a <= 5.0, 6, 7)))))))
    sign = ((jax.lax.bitcast_convert_type(v, jnp.uint32) >> 31) == 1) & ~jnp.isnan(v)
    return (mag + 8 * sign.astype(jnp.int32)).astype(jnp.uint8)


_E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def e2m1_decode(codes: jax.Array) -> jax.Array:
    return jnp.asarray(_E2M1_VALUES)[codes.astype(jnp.int32)]


def pack_fp4(codes: jax.Array) -> jax.Array:
    """[..., K] codes -> [..., K/2] uint8, element 2i in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(jnp.uint8)


def unpack_fp4(packed: jax.Array) -> jax.Array:
    lo, hi = packed & 0xF, packed >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def tree_sum(v: jax.Array) -> jax.Array:
    """Sum over the last axis in a fixed pairwise order: zero-pad to a power of two,
    then repeatedly add adjacent pairs. Every implementation uses this order."""
    k = v.shape[-1]
    p = 1 << max(k - 1, 0).bit_length()
    if p != k:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, p - k)])
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def silu_f32(g: jax.Array) -> jax.Array:
    return exact.div(g, 1.0 + jnp.exp(-g))


# ---------------------------------------------------------------- scale layouts
_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bytes(x: jax.Array) -> jax.Array:
    """Same-shape unsigned view of ``x`` (f32 scales keep their shape; zero padding
    is zero bytes -- padding e8m0 with 0.0 would write 0xFF, its NaN)."""
    u = _UINT_OF_SIZE[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, u) if x.dtype != u else x


def _from_bytes(b: jax.Array, dtype) -> jax.Array:
    return b if jnp.dtype(dtype) == b.dtype else jax.lax.bitcast_convert_type(b, dtype)


def layout_scales(s: jax.Array, layout: ScaleLayout) -> jax.Array:
    """Logical scales ``[M, G]`` -> storage for ``layout`` (padding bytes are zero)."""
    m, g = s.shape
    if layout == ScaleLayout.ROW_MAJOR:
        return s
    if layout == ScaleLayout.COL_MAJOR:
        return s.T
    if layout == ScaleLayout.COL_MAJOR_TMA:
        return _from_bytes(jnp.pad(_bytes(s), ((0, round_up(m, 4) - m), (0, 0))), s.dtype).T
    if layout == ScaleLayout.PACKED_UE8M0:
        b = ((jax.lax.bitcast_convert_type(s, jnp.uint32) >> 23) & 0xFF)  # exponent byte
        b = jnp.pad(b, ((0, round_up(m, 4) - m), (0, round_up(g, 4) - g)))
        b = b.reshape(b.shape[0], -1, 4)
        words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
        return jax.lax.bitcast_convert_type(words, jnp.int32).T
    if layout == ScaleLayout.SWIZZLED_128x4:
        mp, gp = round_up(m, 128), round_up(g, 4)
        b = jnp.pad(_bytes(s), ((0, mp - m), (0, gp - g)))
        b = b.reshape(-1)[swizzle_index(mp, gp)].reshape(mp, gp)
        return _from_bytes(b, s.dtype)
    raise AssertionError(layout)


def unlayout_scales(storage: jax.Array, layout: ScaleLayout, m: int, g: int) -> jax.Array:
    """Storage -> logical ``[M, G]`` scales (f32 for PACKED_UE8M0)."""
    if layout == ScaleLayout.ROW_MAJOR:
        return storage
    if layout in (ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA):
        return storage.T[:m]
    if layout == ScaleLayout.PACKED_UE8M0:
        w = jax.lax.bitcast_convert_type(storage.T, jnp.uint32)[:m]
        b = jnp.stack([(w >> (8 * i)) & 0xFF for i in range(4)], axis=-1).reshape(m, -1)[:, :g]
        return jax.lax.bitcast_convert_type(b << 23, F32)
    if layout == ScaleLayout.SWIZZLED_128x4:
        mp, gp = storage.shape
        inv = np.argsort(swizzle_index(mp, gp))
        b = _bytes(storage).reshape(-1)[inv].reshape(mp, gp)[:m, :g]
        return _from_bytes(b, storage.dtype)
    raise AssertionError(layout)


def _expand(s: jax.Array, m: int, k: int, gr: int, gc: int) -> jax.Array:
    """Broadcast logical scales [M/gr, K/gc] to [M, K]."""
    gr, gc = (m if gr == -1 else gr), (k if gc == -1 else gc)
    return jnp.repeat(jnp.repeat(s, gr, axis=0)[:m], gc, axis=1)[:, :k]


# ---------------------------------------------------------------- core quantizer
def as_f32_scalar(v: Any, what: str) -> jax.Array:
    """``v`` as a 0-d f32 array; ``QuantLayoutError`` unless it holds exactly one value."""
    a = jnp.asarray(v, F32)
    if a.size != 1:
        raise QuantLayoutError(f"{what} must hold one value, got shape {a.shape}")
    return a.reshape(())


def static_scale_storage(key: QuantKey, scale: Any, m: int, k: int) -> jax.Array:
    """Validate a user-supplied static scale against the key's storage shape for ``[M, K]``
    (a one-value per-tensor scale of any shape is accepted as ``(1,)``) and return it as
    that storage array. Shared by the reference and the Pallas producers."""
    if scale is None:
        raise QuantLayoutError(f"{key} is static: pass its scale")
    scale = jnp.asarray(scale)
    want = scale_storage_shape(key.scale, m, k)
    if key.scale.group_shape.is_per_tensor() and scale.size == 1:
        scale = scale.reshape(1)
    if tuple(scale.shape) != want:
        raise QuantLayoutError(f"{key}: static scale has shape {tuple(scale.shape)}, expected {want} for [M={m}, K={k}]")
    return scale


def _static_scales(key: QuantKey, scale: Any, m: int, k: int) -> jax.Array:
    """Validate a static scale (storage layout of the key) and return logical f32/e4m3/e8m0 [Mg, Kg]."""
    scale = static_scale_storage(key, scale, m, k)
    if key.scale.group_shape.is_per_tensor():
        return scale.astype(F32).reshape(1, 1)
    mg, kg = logical_scale_shape(key.scale, m, k)
    return unlayout_scales(scale, key.scale.layout, mg, kg)


def quantize_f32(v: jax.Array, key: QuantKey, orig_dtype, orig_shape, *, scale: Any = None,
                 global_scale: Any = None, scale_ub: Any = None, fused_group: bool = False
                 ) -> QuantizedActivation:
    """Quantize an f32 ``[M, K]`` matrix with ``key``; the common tail of every producer.

    ``fused_group=True`` selects the fused SiLU/RMSNorm per-group rule
    (``s = max(min(amax, ub) / 448, 1/(448*512))``) instead of plain
    ``per_token_group_quant_fp8``'s ``s = max(amax, 1e-10) / 448``.
    """
    m, k = v.shape
    check_k_divisible(key, k)
    fmt = key.format
    desc = key.scale
    gr, gc = desc.group_shape
    lead = tuple(orig_shape[:-1])
    ub = None if scale_ub is None else as_f32_scalar(scale_ub, "scale_ub")

    if fmt in (QuantFormat.FP8, QuantFormat.INT8):
        qmax = FP8_MAX if fmt == QuantFormat.FP8 else INT8_MAX
        sat = sat_fp8 if fmt == QuantFormat.FP8 else sat_int8
        if desc.static:
            storage = static_scale_storage(key, scale, m, k).astype(desc.storage_dtype)
            s = _static_scales(key, storage, m, k).astype(F32)
            if fmt == QuantFormat.FP8:  # vLLM static fp8: multiply by the reciprocal, computed once
                q = sat(v * _expand(exact.div(1.0, s), m, k, gr, gc))
            else:  # vLLM static int8: true division
                q = sat(exact.div(v, _expand(s, m, k, gr, gc)))
            return QuantizedActivation(q.reshape(*lead, k), storage, orig_dtype, orig_shape, key)
        a = jnp.abs(v)
        if desc.group_shape.is_per_tensor():
            amax = jnp.max(a).reshape(1, 1)
        elif desc.group_shape.is_per_token():
            amax = jnp.max(a, axis=1, keepdims=True)
        elif desc.group_shape.is_per_group():
            amax = jnp.max(a.reshape(m, k // gc, gc), axis=2)
        else:
            raise QuantLayoutError(f"{key}: dynamic scales with group shape {desc.group_shape} are not supported")
        if fmt == QuantFormat.INT8:
            s = exact.div(jnp.maximum(amax, GROUP_EPS), INT8_MAX)
            q = sat(exact.div(v, _expand(s, m, k, gr, gc)))
        elif desc.group_shape.is_per_tensor():
            s = jnp.maximum(exact.div(amax, qmax), FP8_MIN_SCALE)
            q = sat(v * exact.div(1.0, s))
        elif desc.group_shape.is_per_token() or fused_group:
            if ub is not None:
                amax = jnp.minimum(amax, ub)
            s = jnp.maximum(exact.div(amax, qmax), FP8_MIN_SCALE)
            if desc.ue8m0:
                s = pow2_ceil(s)
            q = sat(exact.div(v, _expand(s, m, k, gr, gc)))
        else:
            s = exact.div(jnp.maximum(amax, GROUP_EPS), qmax)
            if desc.ue8m0:
                s = pow2_ceil(s)
            q = sat(exact.div(v, _expand(s, m, k, gr, gc)))
        if desc.group_shape.is_per_tensor():
            storage = s.reshape(1)
        else:
            storage = layout_scales(s, desc.layout)
        return QuantizedActivation(q.reshape(*lead, k), storage, orig_dtype, orig_shape, key)

    g = gc
    groups = v.reshape(m, k // g, g)
    if fmt == QuantFormat.NVFP4:
        if global_scale is None:
            raise QuantLayoutError(f"{key} needs global_scale (the quantisation multiplier 448*6/amax)")
        gs = as_f32_scalar(global_scale, "global_scale")
        if desc.static:
            sf = _static_scales(key, scale, m, k).astype(F32)
        else:
            amax16 = jnp.max(jnp.abs(groups), axis=2)
            sf = exact.round_to(jnp.clip(exact.div(gs * amax16, FP4_MAX), -FP8_MAX, FP8_MAX), E4M3)
        ratio = jnp.where(sf == 0, 0.0, exact.div(gs, sf))
        codes = e2m1_encode(groups * ratio[..., None]).reshape(m, k)
        sf_stored = sf.astype(E4M3)
    else:  # MXFP8 / MXFP4: power-of-two e8m0 scales, rounded up from amax / max
        emax = FP8_MAX if fmt == QuantFormat.MXFP8 else FP4_MAX
        if desc.static:
            sf_stored = jax.lax.bitcast_convert_type(_static_scales(key, scale, m, k), jnp.uint8)
        else:
            sf_stored = e8m0_from_f32(exact.div(jnp.max(jnp.abs(groups), axis=2), emax))
        sf = f32_from_e8m0(sf_stored)
        y = exact.div(groups, sf[..., None])
        codes = (sat_fp8(y) if fmt == QuantFormat.MXFP8 else e2m1_encode(y)).reshape(m, k)
        sf_stored = jax.lax.bitcast_convert_type(sf_stored, E8M0)
    data = pack_fp4(codes) if key.is_fp4 else codes
    storage = layout_scales(sf_stored, desc.layout)
    return QuantizedActivation(data.reshape(*lead, data.shape[-1]), storage, orig_dtype, orig_shape, key)


def _flatten(x: jax.Array) -> tuple[jax.Array, int, int]:
    if x.ndim < 1:
        raise QuantLayoutError("input must have at least one dimension")
    if x.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        raise QuantLayoutError(f"input dtype must be float32/float16/bfloat16, got {x.dtype}")
    m, k = rows_cols(x.shape)
    return x.reshape(m, k), m, k


# ---------------------------------------------------------------- public reference ops
def quantize(x: jax.Array, key: QuantKey, *, scale: Any = None, global_scale: Any = None,
             scale_ub: Any = None) -> QuantizedActivation:
    """Plain quantization of ``x [..., K]`` with ``key`` (vLLM's scaled_fp8_quant,
    per_token_group_quant_fp8, scaled_fp4_quant, mxfp8 quant, scaled_int8_quant).

    ``scale``: static scale in the key's storage layout; ``global_scale``: NVFP4
    quantisation multiplier; ``scale_ub``: per-token amax upper bound.
    """
    x = jnp.asarray(x)
    x2, _, _ = _flatten(x)
    return quantize_f32(x2.astype(F32), key, x.dtype, x.shape, scale=scale,
                        global_scale=global_scale, scale_ub=scale_ub)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, residual: jax.Array | None = None,
             add_in_f32: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """vLLM's RMSNorm (optionally fused residual add) up to the pre-quant value.

    Returns ``(n, residual_out)``: ``n`` in the input dtype T
    (``T(float(z) * inv) * w``, weight multiplied in T), and ``residual_out``
    (``T(x + residual)``) or None. With ``add_in_f32`` the add is done in f32 and
    the norm reads the *unrounded* sum (vLLM's dynamic variants); otherwise the
    add is in T and the norm reads the rounded sum (static fp8 variant).
    """
    t = x.dtype
    x2, m, k = _flatten(x)
    if weight.shape != (k,):
        raise QuantLayoutError(f"weight must have shape ({k},), got {tuple(weight.shape)}")
    res_out = None
    if residual is None:
        z = x2.astype(F32)
    else:
        if residual.shape != x.shape or residual.dtype != t:
            raise QuantLayoutError(f"residual must be {tuple(x.shape)} {t}, got {tuple(residual.shape)} {residual.dtype}")
        r2 = residual.reshape(m, k)
        if add_in_f32:
            z = x2.astype(F32) + r2.astype(F32)
        else:  # add in T: the f32 sum of two T values, rounded to T
            z = exact.round_to(x2.astype(F32) + r2.astype(F32), t)
        res_out = z.astype(t).reshape(x.shape)
    ms = exact.div(tree_sum(exact.square(z)), np.float32(k))
    inv = exact.div(1.0, exact.sqrt(ms + np.float32(eps)))
    # T(z * inv) * w in T: the exact f32 product of two T values, rounded to T
    n = exact.round_to(exact.mul(exact.round_to(exact.mul(z, inv[:, None]), t), weight.astype(F32)), t).astype(t)
    return n, res_out


def rms_norm_quant(x: jax.Array, weight: jax.Array, key: QuantKey, *, eps: float = 1e-6,
                   residual: jax.Array | None = None, scale: Any = None, global_scale: Any = None,
                   scale_ub: Any = None) -> tuple[QuantizedActivation, jax.Array | None]:
    """Fused (residual add +) RMSNorm -> quant. Returns ``(activation, residual_out)``.

    As vLLM: static keys add the residual in T; dynamic keys add in f32.
    Per-group keys use the fused rule (``min_scale`` floor, ``scale_ub``).
    """
    x = jnp.asarray(x)
    n, res = rms_norm(x, jnp.asarray(weight), eps, residual, add_in_f32=not key.scale.static)
    qa = quantize_f32(n.astype(F32), key, x.dtype, x.shape, scale=scale, global_scale=global_scale,
                      scale_ub=scale_ub, fused_group=True)
    return qa, res


def silu_and_mul(x: jax.Array, rounded: bool) -> jax.Array:
    """``[..., 2d] -> [M, d]`` f32 values of SiLU(gate) * up in vLLM's order.

    ``rounded``: ``T(T(silu(g)) * up)`` (static fp8 path); else all f32.
    """
    t = x.dtype
    x2, m, k2 = _flatten(x)
    if k2 % 2:
        raise QuantLayoutError(f"silu_and_mul needs an even last dimension, got {k2}")
    d = k2 // 2
    g, u = x2[:, :d].astype(F32), x2[:, d:].astype(F32)
    if rounded:
        return exact.round_to(exact.round_to(silu_f32(g), t) * u, t)
    return silu_f32(g) * u


def silu_and_mul_quant(x: jax.Array, key: QuantKey, *, scale: Any = None, global_scale: Any = None,
                       scale_ub: Any = None) -> QuantizedActivation:
    """Fused SiLU-and-mul -> quant of ``x [..., 2d] = [gate | up]``.

    Static fp8: ``y = T(T(silu(g)) * up)``, ``q = sat(y * (1/s))``. Dynamic fp8
    (per-token, per-group): all f32 with the fused scale rule. NVFP4 / MX / int8:
    ``y = T(silu_f32(g) * up_f32)`` then the key's quantizer.
    """
    x = jnp.asarray(x)
    fmt = key.format
    if fmt == QuantFormat.FP8 and key.scale.static:
        y = silu_and_mul(x, rounded=True)
    elif fmt == QuantFormat.FP8:
        y = silu_and_mul(x, rounded=False)
    else:
        y = exact.round_to(silu_and_mul(x, rounded=False), x.dtype)
    out_shape = (*x.shape[:-1], x.shape[-1] // 2)
    return quantize_f32(y, key, x.dtype, out_shape, scale=scale, global_scale=global_scale,
                        scale_ub=scale_ub, fused_group=True)


# ---------------------------------------------------------------- dequant and the consumer
def dequantize_codes(data: jax.Array, scale: jax.Array, key: QuantKey, shape: tuple[int, ...],
                     global_scale: Any = None) -> jax.Array:
    """f32 ``[M, K]`` values ``q * scale`` (NVFP4: ``e2m1 * sf / gs``) of stored codes."""
    m, k = rows_cols(shape)
    fmt = key.format
    desc = key.scale
    d2 = data.reshape(m, -1)
    vals = e2m1_decode(unpack_fp4(d2)) if key.is_fp4 else d2.astype(F32)
    if desc.group_shape.is_per_tensor():
        return vals * scale.astype(F32).reshape(())
    mg, kg = logical_scale_shape(desc, m, k)
    s = unlayout_scales(scale, desc.layout, mg, kg)
    if fmt in (QuantFormat.MXFP8, QuantFormat.MXFP4):
        s = f32_from_e8m0(jax.lax.bitcast_convert_type(s, jnp.uint8))
    else:
        s = s.astype(F32)
    if fmt == QuantFormat.NVFP4:
        if global_scale is None:
            raise QuantLayoutError("NVFP4 dequantisation needs the global scale")
        s = exact.div(s, as_f32_scalar(global_scale, "global_scale"))
    return vals * _expand(s, m, k, *desc.group_shape)


def dequantize(qa: QuantizedActivation, global_scale: Any = None) -> jax.Array:
    """f32 values of a ``QuantizedActivation`` in ``orig_shape``."""
    return dequantize_codes(qa.data, qa.scale, qa.quant_key, qa.orig_shape, global_scale).reshape(qa.orig_shape)


def scaled_mm(a: QuantizedActivation, weight: jax.Array, weight_scale: jax.Array, weight_key: QuantKey, *,
              bias: jax.Array | None = None, out_dtype=None, global_scale_a: Any = None,
              global_scale_w: Any = None) -> jax.Array:
    """Reference consumer: ``dequant(a) @ dequant(weight).T (+ bias)`` in f32 at
    HIGHEST precision, cast to ``out_dtype`` (default ``a.orig_dtype``).

    ``weight`` is ``[N, K]`` (``[N, K/2]`` packed fp4) quantized with
    ``weight_key`` applied to its ``[N, K]`` view: per-channel weight scales are
    per *row* (``kFp8DynamicTokenSym``-like shape ``[N, 1]``), DeepSeek blocks
    are ``GroupShape(128, 128)`` (``kFp8Static128BlockSym``).
    """
    m, k = rows_cols(a.orig_shape)
    n = weight.shape[0]
    av = dequantize_codes(a.data, a.scale, a.quant_key, a.orig_shape, global_scale_a)
    wv = dequantize_codes(weight, weight_scale, weight_key, (n, k), global_scale_w)
    out = jnp.matmul(av, wv.T, precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        out = out + jnp.asarray(bias, F32)
    out_dtype = a.orig_dtype if out_dtype is None else out_dtype
    return out.astype(out_dtype).reshape(*a.orig_shape[:-1], n)


__all__ = [
    "FP8_MAX", "FP8_MIN_SCALE", "GROUP_EPS", "FP4_MAX", "quantize", "quantize_f32", "rms_norm",
    "rms_norm_quant", "silu_and_mul", "silu_and_mul_quant", "dequantize", "dequantize_codes",
    "scaled_mm", "tree_sum", "layout_scales", "unlayout_scales", "sat_fp8", "e2m1_encode", "pack_fp4",
    "unpack_fp4", "pow2_ceil", "e8m0_from_f32", "f32_from_e8m0",
]
