"""Pure-torch mirror of :mod:`quantact_jax.reference`: the same functions, the same bits.

Every public function has the jnp reference's name and signature, takes and
returns torch tensors, and returns :class:`quantact_torch.activation.QuantizedActivation`.
The op order is the jnp reference's, op for op (see shared NUMERICS.md):

- compute in f32; clamp to the format's finite range before every narrowing
  cast (``.to(torch.float8_e4m3fn)``, ``.to(torch.bfloat16)`` ... round to
  nearest even, as XLA's converts do);
- true division where the jnp code divides (torch's f32 ``/`` is IEEE on CPU
  and CUDA), ``x * (1/s)`` where it multiplies by a reciprocal;
- ``1 / sqrt`` with a *correctly rounded* square root (:func:`sqrt_rn`): torch's
  vectorised CPU ``sqrt`` is not correctly rounded (about 1 in 6 f32 results is
  one ulp off on AVX-512 builds), so it is taken in f64 and corrected with an
  exact midpoint test;
- the pairwise :func:`tree_sum`; powers of two and e8m0 bytes from the f32 bits
  (int32 views, shifts done in int64 so no sign/overflow surprises); e2m1 by
  the jnp threshold cascade; fp4 packing low nibble first; the 128x4 swizzle
  from :func:`interop.layout.swizzle_index`; padding bytes zero.

The only op whose bits can differ from the jnp reference is ``exp`` (SiLU):
XLA:CPU and torch round it differently in the last bit, so SiLU-and-mul
producers agree to one code step on a small fraction of elements (see
``tests/test_reference_equivalence.py``). Everything else is bit-exact, as long
as no f32 intermediate is subnormal (XLA:CPU flushes subnormals to zero, torch
does not).

Scales follow vLLM's torch representation: for ``COL_MAJOR``,
``COL_MAJOR_TMA`` and ``PACKED_UE8M0`` the returned ``scale`` is vLLM's
strided ``[M, G]`` view of the contiguous storage (``qa.scale_storage()`` gives
the storage, which is byte-for-byte the JAX array). A *static* scale (and the
``scale`` of :func:`dequantize_codes`) for those layouts may be passed either as
that view (recognised by its strides ``(1, Mp)``), as the contiguous storage
(the JAX shape), or as a plain ``[M, G]`` tensor of logical values (padding is
then zero). When the storage shape and ``[M, G]`` coincide, a tensor without the
view's strides is read as storage, as on the JAX side.

NaN/Inf policy: the jnp reference's (NaN propagates into dynamic scales; fp8
codes of NaN are NaN, int8 codes 0 -- torch's NaN->int8 cast is undefined, so
NaN is replaced explicitly -- fp4 codes 7; static scales saturate +-Inf).

This module does not import jax.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from interop.dtypes import canonical_dtype, torch_dtype
from interop.errors import QuantLayoutError
from interop.keys import QuantFormat, QuantKey, ScaleLayout
from interop.layout import (check_k_divisible, logical_scale_shape, round_up, rows_cols,
                            scale_storage_shape, swizzle_index)
from quantact_torch.activation import QuantizedActivation, scale_from_storage

FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)  # vLLM's minimum dynamic fp8 scale
GROUP_EPS = 1e-10  # per_token_group_quant_fp8's amax floor
FP4_MAX = 6.0
INT8_MAX = 127.0
MX_MIN_EXP_BITS = 1  # smallest e8m0 exponent produced: 2**-126

F32 = torch.float32
E4M3 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_COL_LAYOUTS = (ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA, ScaleLayout.PACKED_UE8M0)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _f32(v: float, like: torch.Tensor | None = None) -> torch.Tensor:
    """A 0-d f32 tensor holding ``float32(v)`` (as a NumPy/JAX weak-typed scalar rounds)."""
    return torch.tensor(v, dtype=F32, device=None if like is None else like.device)


def _u32(x: torch.Tensor) -> torch.Tensor:
    """The f32 bits of ``x`` as non-negative int64 (uint32 semantics)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _f32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> f32 (wrapping to int32 first)."""
    b = torch.where(bits >= 2**31, bits - 2**32, bits)
    return b.to(torch.int32).view(F32)


# ---------------------------------------------------------------- elementwise pieces
def sat_fp8(v: torch.Tensor) -> torch.Tensor:
    """Clip f32 to +-448 then cast to e4m3fn (round to nearest even). NaN stays NaN."""
    return torch.clamp(v, -FP8_MAX, FP8_MAX).to(E4M3)


def sat_int8(v: torch.Tensor) -> torch.Tensor:
    """Round half to even, clip to [-128, 127], NaN -> 0, cast to int8."""
    r = torch.clamp(torch.round(v), -128.0, 127.0)
    return torch.where(torch.isnan(r), torch.zeros_like(r), r).to(torch.int8)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """``2**ceil(log2(s))`` for positive normal f32, exactly (from the bits); NaN/Inf unchanged."""
    bits = _u32(s)
    exp = (bits >> 23) & 0xFF
    up = exp + ((bits & 0x7FFFFF) != 0).to(torch.int64)
    fin = torch.isfinite(s)
    p = _f32_from_bits(torch.where(fin, up, 0) << 23)
    return torch.where(fin, p, s)


def e8m0_from_f32(s: torch.Tensor) -> torch.Tensor:
    """Round a positive f32 up to a power of two and encode as e8m0 bytes (uint8).

    Floors at ``2**-126``; NaN and Inf encode as 0xFF (e8m0's NaN).
    """
    bits = _u32(torch.maximum(s, _f32(2.0**-126, s)))
    exp = (bits >> 23) & 0xFF
    up = torch.clamp(exp + ((bits & 0x7FFFFF) != 0).to(torch.int64), max=255)
    up = torch.where(torch.isfinite(s), up, 255)
    return up.to(torch.uint8)


def f32_from_e8m0(b: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 bytes (uint8) to f32: ``2**(b-127)``; 0xFF -> NaN; 0 -> 2**-127 (via 2**-126 / 2)."""
    b64 = b.to(torch.int64)
    v = _f32_from_bits(torch.clamp(b64, min=1) << 23)
    v = torch.where(b64 == 0, v * 0.5, v)
    return torch.where(b64 == 255, torch.full_like(v, float("nan")), v)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """f32 -> e2m1 4-bit code (uint8 0..15), round to nearest even, saturating at +-6.

    Magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6]; sign in bit 3; NaN -> +6 (code 7).
    """
    a = torch.abs(v)
    w = torch.where
    mag = w(a <= 0.25, 0, w(a < 0.75, 1, w(a <= 1.25, 2, w(
        a < 1.75, 3, w(a <= 2.5, 4, w(a < 3.5, 5, w(a <= 5.0, 6, 7)))))))
    sign = (v.contiguous().view(torch.int32) < 0) & ~torch.isnan(v)
    return (mag + 8 * sign.to(torch.int32)).to(torch.uint8)


_E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_E2M1_VALUES).to(codes.device)[codes.to(torch.int64)]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] uint8, element 2i in the low nibble."""
    c = codes.to(torch.int32)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int32)
    lo, hi = p & 0xF, p >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.uint8)


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in a fixed pairwise order: zero-pad to a power of two,
    then repeatedly add adjacent pairs (the jnp reference's order)."""
    k = v.shape[-1]
    p = 1 << max(k - 1, 0).bit_length()
    if p != k:
        v = torch.cat([v, v.new_zeros(*v.shape[:-1], p - k)], dim=-1)
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def true_div(a: Any, b: Any) -> torch.Tensor:
    """Correctly rounded f32 ``a / b`` (torch's division is IEEE; named for symmetry
    with the jnp side, where XLA would otherwise use a reciprocal)."""
    a = a.to(F32) if isinstance(a, torch.Tensor) else a
    b = b.to(F32) if isinstance(b, torch.Tensor) else b
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        raise TypeError("true_div needs at least one tensor")
    if not isinstance(a, torch.Tensor):
        a = _f32(a, b)
    if not isinstance(b, torch.Tensor):
        b = _f32(b, a)
    return a / b


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded f32 square root.

    torch's vectorised CPU ``sqrt`` (f32 and f64) is not correctly rounded, so:
    take the f64 root rounded to f32 (at most one ulp off), then compare ``x``
    with the squares of the midpoints to the neighbouring f32 values. The
    midpoints have 25 significant bits, so their squares (50 bits) are exact in
    f64, and can never equal an f32 ``x`` (no ties).
    """
    x = x.to(F32)
    xd = x.double()
    s = torch.sqrt(xd).to(F32)
    inf = torch.full_like(s, float("inf"))
    up = torch.nextafter(s, inf)
    mid_hi = (s.double() + up.double()) * 0.5
    s = torch.where(mid_hi * mid_hi < xd, up, s)
    dn = torch.nextafter(s, torch.zeros_like(s))
    mid_lo = (s.double() + dn.double()) * 0.5
    s = torch.where((mid_lo * mid_lo > xd) & (s > 0), dn, s)
    return s


def silu_f32(g: torch.Tensor) -> torch.Tensor:
    return true_div(g, 1.0 + torch.exp(-g))


def round_to(v: torch.Tensor, dtype) -> torch.Tensor:
    """Round f32 ``v`` to ``dtype`` (RNE) and back to f32."""
    return v.to(dtype).to(F32)


# ---------------------------------------------------------------- scale layouts
def _bits(x: torch.Tensor) -> torch.Tensor:
    """Same-shape integer view of ``x`` (zero padding is then zero bytes; e8m0 has no 0.0)."""
    it = _INT_OF_SIZE[x.element_size()]
    return x if x.dtype == it else x.contiguous().view(it)


def _from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return b if b.dtype == dtype else b.contiguous().view(dtype)


def _pad2(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = b.new_zeros(rows, cols)
    out[:b.shape[0], :b.shape[1]] = b
    return out


def _perm(mp: int, gp: int, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(swizzle_index(mp, gp))).to(device)


def layout_scales(s: torch.Tensor, layout: ScaleLayout) -> torch.Tensor:
    """Logical scales ``[M, G]`` -> contiguous storage for ``layout`` (padding bytes are zero)."""
    m, g = s.shape
    if layout == ScaleLayout.ROW_MAJOR:
        return s.contiguous()
    if layout == ScaleLayout.COL_MAJOR:
        return s.T.contiguous()
    if layout == ScaleLayout.COL_MAJOR_TMA:
        return _from_bits(_pad2(_bits(s), round_up(m, 4), g), s.dtype).T.contiguous()
    if layout == ScaleLayout.PACKED_UE8M0:
        b = (_u32(s) >> 23) & 0xFF  # exponent byte
        b = _pad2(b, round_up(m, 4), round_up(g, 4))
        b = b.reshape(b.shape[0], -1, 4)
        words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return words.T.contiguous()
    if layout == ScaleLayout.SWIZZLED_128x4:
        mp, gp = round_up(m, 128), round_up(g, 4)
        b = _pad2(_bits(s), mp, gp)
        b = b.reshape(-1)[_perm(mp, gp, s.device)].reshape(mp, gp)
        return _from_bits(b, s.dtype)
    raise AssertionError(layout)


def unlayout_scales(storage: torch.Tensor, layout: ScaleLayout, m: int, g: int) -> torch.Tensor:
    """Contiguous storage -> logical ``[M, G]`` scales (f32 for PACKED_UE8M0)."""
    if layout == ScaleLayout.ROW_MAJOR:
        return storage
    if layout in (ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA):
        return storage.T[:m]
    if layout == ScaleLayout.PACKED_UE8M0:
        w = storage.T[:m].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1).reshape(m, -1)[:, :g]
        return _f32_from_bits(b << 23)
    if layout == ScaleLayout.SWIZZLED_128x4:
        mp, gp = storage.shape
        inv = torch.from_numpy(np.argsort(swizzle_index(mp, gp))).to(storage.device)
        b = _bits(storage).reshape(-1)[inv].reshape(mp, gp)[:m, :g]
        return _from_bits(b, storage.dtype)
    raise AssertionError(layout)


def _expand(s: torch.Tensor, m: int, k: int, gr: int, gc: int) -> torch.Tensor:
    """Broadcast logical scales [M/gr, K/gc] to [M, K]."""
    gr, gc = (m if gr == -1 else gr), (k if gc == -1 else gc)
    return torch.repeat_interleave(torch.repeat_interleave(s, gr, dim=0)[:m], gc, dim=1)[:, :k]


def _scale_storage_of(key: QuantKey, scale: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Normalise a user scale for a column-major layout to its contiguous storage.

    Accepted: vLLM's strided ``[M, G]`` view, the storage itself (the JAX array's
    shape), or a plain ``[M, G]`` tensor of logical values (padding zero).
    """
    if key.scale.layout not in _COL_LAYOUTS or scale.dim() != 2:
        return scale
    want = scale_storage_shape(key.scale, m, k)
    groups, mp = want
    if tuple(scale.shape) != (m, groups):
        return scale  # storage (or wrong: the caller's shape check reports it)
    is_view = (m > 1 and scale.stride(0) == 1 and (groups == 1 or scale.stride(1) == mp))
    if tuple(scale.shape) == want and not is_view:
        return scale  # ambiguous shape, no view strides: storage, as on the JAX side
    if is_view:
        try:
            return scale.as_strided(want, (mp, 1), scale.storage_offset())
        except RuntimeError:
            pass  # an unpadded [M, G] view: fall through to the logical values
    storage = scale.new_zeros(want)
    storage[:, :m] = scale.T
    return storage


# ---------------------------------------------------------------- core quantizer
def _as_f32_scalar(v: Any, what: str) -> torch.Tensor:
    a = torch.as_tensor(v).to(F32) if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float32))
    if a.numel() != 1:
        raise QuantLayoutError(f"{what} must hold one value, got shape {tuple(a.shape)}")
    return a.reshape(())


def _as_tensor(scale: Any) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale
    a = np.asarray(scale)
    if a.dtype == np.float64 or (a.dtype.kind in "iu" and a.ndim == 0):
        a = a.astype(np.float32)  # Python scalars / f64: f32, as jnp.asarray does (x64 off)
    return torch.from_numpy(np.ascontiguousarray(a))


def static_scale_storage(key: QuantKey, scale: Any, m: int, k: int) -> torch.Tensor:
    """Validate a user-supplied static scale against the key's storage shape for ``[M, K]`` and
    return it as that contiguous storage, without copying where it already is (vLLM's column-major
    view becomes its storage; a one-value per-tensor scale of any shape becomes ``(1,)``; see the
    module docstring). Mirror of ``quantact_jax.reference.static_scale_storage``; shared by the
    reference and :mod:`quantact_torch.ops`. The dtype is left as given."""
    if scale is None:
        raise QuantLayoutError(f"{key} is static: pass its scale")
    scale = _scale_storage_of(key, _as_tensor(scale), m, k)
    want = scale_storage_shape(key.scale, m, k)
    if key.scale.group_shape.is_per_tensor() and scale.numel() == 1:
        scale = scale.reshape(1)
    if tuple(scale.shape) != want:
        raise QuantLayoutError(f"{key}: static scale has shape {tuple(scale.shape)}, expected {want} for [M={m}, K={k}]")
    return scale


def _static_scales(key: QuantKey, scale: Any, m: int, k: int) -> torch.Tensor:
    """Validate a static scale (see the module docstring for column-major layouts)
    and return logical f32/e4m3/e8m0 ``[Mg, Kg]``."""
    scale = static_scale_storage(key, scale, m, k)
    if key.scale.group_shape.is_per_tensor():
        return scale.to(F32).reshape(1, 1)
    mg, kg = logical_scale_shape(key.scale, m, k)
    return unlayout_scales(scale.contiguous(), key.scale.layout, mg, kg)


def _qa(data: torch.Tensor, storage: torch.Tensor, orig_dtype, orig_shape, key: QuantKey) -> QuantizedActivation:
    orig_shape = tuple(int(s) for s in orig_shape)
    return QuantizedActivation(data, scale_from_storage(storage.contiguous(), key, orig_shape),
                               orig_dtype, torch.Size(orig_shape), key)


def quantize_f32(v: torch.Tensor, key: QuantKey, orig_dtype, orig_shape, *, scale: Any = None,
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
    ub = None if scale_ub is None else _as_f32_scalar(scale_ub, "scale_ub").to(v.device)

    if fmt in (QuantFormat.FP8, QuantFormat.INT8):
        qmax = FP8_MAX if fmt == QuantFormat.FP8 else INT8_MAX
        sat = sat_fp8 if fmt == QuantFormat.FP8 else sat_int8
        if desc.static:
            s = _static_scales(key, scale, m, k).to(F32).to(v.device)
            if fmt == QuantFormat.FP8:  # vLLM static fp8: multiply by the reciprocal, computed once
                q = sat(v * _expand(true_div(1.0, s), m, k, gr, gc))
            else:  # vLLM static int8: true division
                q = sat(true_div(v, _expand(s, m, k, gr, gc)))
            storage = static_scale_storage(key, scale, m, k).to(torch_dtype(desc.storage_dtype))
            return _qa(q.reshape(*lead, k), storage.to(v.device), orig_dtype, orig_shape, key)
        a = torch.abs(v)
        if desc.group_shape.is_per_tensor():
            amax = torch.amax(a).reshape(1, 1)
        elif desc.group_shape.is_per_token():
            amax = torch.amax(a, dim=1, keepdim=True)
        elif desc.group_shape.is_per_group():
            amax = torch.amax(a.reshape(m, k // gc, gc), dim=2)
        else:
            raise QuantLayoutError(f"{key}: dynamic scales with group shape {desc.group_shape} are not supported")
        eps = _f32(GROUP_EPS, v)
        min_scale = _f32(FP8_MIN_SCALE, v)
        if fmt == QuantFormat.INT8:
            s = true_div(torch.maximum(amax, eps), INT8_MAX)
            q = sat(true_div(v, _expand(s, m, k, gr, gc)))
        elif desc.group_shape.is_per_tensor():
            s = torch.maximum(true_div(amax, qmax), min_scale)
            q = sat(v * true_div(1.0, s))
        elif desc.group_shape.is_per_token() or fused_group:
            if ub is not None:
                amax = torch.minimum(amax, ub)
            s = torch.maximum(true_div(amax, qmax), min_scale)
            if desc.ue8m0:
                s = pow2_ceil(s)
            q = sat(true_div(v, _expand(s, m, k, gr, gc)))
        else:
            s = true_div(torch.maximum(amax, eps), qmax)
            if desc.ue8m0:
                s = pow2_ceil(s)
            q = sat(true_div(v, _expand(s, m, k, gr, gc)))
        if desc.group_shape.is_per_tensor():
            storage = s.reshape(1)
        else:
            storage = layout_scales(s, desc.layout)
        return _qa(q.reshape(*lead, k), storage, orig_dtype, orig_shape, key)

    g = gc
    groups = v.reshape(m, k // g, g)
    if fmt == QuantFormat.NVFP4:
        if global_scale is None:
            raise QuantLayoutError(f"{key} needs global_scale (the quantisation multiplier 448*6/amax)")
        gs = _as_f32_scalar(global_scale, "global_scale").to(v.device)
        if desc.static:
            sf = _static_scales(key, scale, m, k).to(F32).to(v.device)
        else:
            amax16 = torch.amax(torch.abs(groups), dim=2)
            sf = sat_fp8(true_div(gs * amax16, FP4_MAX)).to(F32)
        ratio = torch.where(sf == 0, torch.zeros_like(sf), true_div(gs, sf))
        codes = e2m1_encode(groups * ratio[..., None]).reshape(m, k)
        sf_stored = sf.to(E4M3)
    else:  # MXFP8 / MXFP4: power-of-two e8m0 scales, rounded up from amax / max
        emax = FP8_MAX if fmt == QuantFormat.MXFP8 else FP4_MAX
        if desc.static:
            st = _static_scales(key, scale, m, k).to(v.device)
            sf_stored = st if st.dtype == torch.uint8 else st.contiguous().view(torch.uint8)
        else:
            sf_stored = e8m0_from_f32(true_div(torch.amax(torch.abs(groups), dim=2), emax))
        sf = f32_from_e8m0(sf_stored)
        y = true_div(groups, sf[..., None])
        codes = (sat_fp8(y) if fmt == QuantFormat.MXFP8 else e2m1_encode(y)).reshape(m, k)
        sf_stored = sf_stored.contiguous().view(E8M0)
    data = pack_fp4(codes) if key.is_fp4 else codes
    storage = layout_scales(sf_stored, desc.layout)
    return _qa(data.reshape(*lead, data.shape[-1]), storage, orig_dtype, orig_shape, key)


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if x.dim() < 1:
        raise QuantLayoutError("input must have at least one dimension")
    if x.dtype not in _FLOAT_INPUTS:
        raise QuantLayoutError(f"input dtype must be float32/float16/bfloat16, got {x.dtype}")
    m, k = rows_cols(x.shape)
    return x.reshape(m, k), m, k


# ---------------------------------------------------------------- public reference ops
def quantize(x: torch.Tensor, key: QuantKey, *, scale: Any = None, global_scale: Any = None,
             scale_ub: Any = None) -> QuantizedActivation:
    """Plain quantization of ``x [..., K]`` with ``key`` (vLLM's scaled_fp8_quant,
    per_token_group_quant_fp8, scaled_fp4_quant, mxfp8 quant, scaled_int8_quant).

    ``scale``: static scale (storage layout, or vLLM's view for column-major
    layouts); ``global_scale``: NVFP4 quantisation multiplier; ``scale_ub``:
    per-token amax upper bound.
    """
    x = torch.as_tensor(x)
    x2, _, _ = _flatten(x)
    return quantize_f32(x2.to(F32), key, x.dtype, tuple(x.shape), scale=scale,
                        global_scale=global_scale, scale_ub=scale_ub)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             add_in_f32: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vLLM's RMSNorm (optionally fused residual add) up to the pre-quant value.

    Returns ``(n, residual_out)``: ``n`` in the input dtype T
    (``T(float(z) * inv) * w``, weight multiplied in T), and ``residual_out``
    (``T(x + residual)``) or None. With ``add_in_f32`` the add is done in f32 and
    the norm reads the *unrounded* sum (vLLM's dynamic variants); otherwise the
    add is in T and the norm reads the rounded sum (static fp8 variant).
    """
    t = x.dtype
    x2, m, k = _flatten(x)
    if tuple(weight.shape) != (k,):
        raise QuantLayoutError(f"weight must have shape ({k},), got {tuple(weight.shape)}")
    res_out = None
    if residual is None:
        z = x2.to(F32)
    else:
        if tuple(residual.shape) != tuple(x.shape) or residual.dtype != t:
            raise QuantLayoutError(f"residual must be {tuple(x.shape)} {t}, got {tuple(residual.shape)} {residual.dtype}")
        r2 = residual.reshape(m, k)
        if add_in_f32:
            z = x2.to(F32) + r2.to(F32)
        else:  # add in T: the f32 sum of two T values, rounded to T (exact as a native T add)
            z = round_to(x2.to(F32) + r2.to(F32), t)
        res_out = z.to(t).reshape(x.shape)
    ms = true_div(tree_sum(z * z), float(k))
    inv = true_div(1.0, sqrt_rn(ms + _f32(eps, z)))
    # T(z * inv) * w in T: the exact f32 product of two T values, rounded to T
    # (``weight`` is expected in T; like the jnp side it is used as given, widened to f32)
    n = round_to(round_to(z * inv[:, None], t) * weight.to(F32), t).to(t)
    return n, res_out


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, key: QuantKey, *, eps: float = 1e-6,
                   residual: torch.Tensor | None = None, scale: Any = None, global_scale: Any = None,
                   scale_ub: Any = None) -> tuple[QuantizedActivation, torch.Tensor | None]:
    """Fused (residual add +) RMSNorm -> quant. Returns ``(activation, residual_out)``.

    As vLLM: static keys add the residual in T; dynamic keys add in f32.
    Per-group keys use the fused rule (``min_scale`` floor, ``scale_ub``).
    """
    x = torch.as_tensor(x)
    n, res = rms_norm(x, torch.as_tensor(weight), eps, residual, add_in_f32=not key.scale.static)
    qa = quantize_f32(n.to(F32), key, x.dtype, tuple(x.shape), scale=scale, global_scale=global_scale,
                      scale_ub=scale_ub, fused_group=True)
    return qa, res


def silu_and_mul(x: torch.Tensor, rounded: bool) -> torch.Tensor:
    """``[..., 2d] -> [M, d]`` f32 values of SiLU(gate) * up in vLLM's order.

    ``rounded``: ``T(T(silu(g)) * up)`` (static fp8 path); else all f32.
    """
    t = x.dtype
    x2, m, k2 = _flatten(x)
    if k2 % 2:
        raise QuantLayoutError(f"silu_and_mul needs an even last dimension, got {k2}")
    d = k2 // 2
    g, u = x2[:, :d].to(F32), x2[:, d:].to(F32)
    if rounded:
        return round_to(round_to(silu_f32(g), t) * u, t)
    return silu_f32(g) * u


def silu_and_mul_quant(x: torch.Tensor, key: QuantKey, *, scale: Any = None, global_scale: Any = None,
                       scale_ub: Any = None) -> QuantizedActivation:
    """Fused SiLU-and-mul -> quant of ``x [..., 2d] = [gate | up]``.

    Static fp8: ``y = T(T(silu(g)) * up)``, ``q = sat(y * (1/s))``. Dynamic fp8
    (per-token, per-group): all f32 with the fused scale rule. NVFP4 / MX / int8:
    ``y = T(silu_f32(g) * up_f32)`` then the key's quantizer.
    """
    x = torch.as_tensor(x)
    fmt = key.format
    if fmt == QuantFormat.FP8 and key.scale.static:
        y = silu_and_mul(x, rounded=True)
    elif fmt == QuantFormat.FP8:
        y = silu_and_mul(x, rounded=False)
    else:
        y = round_to(silu_and_mul(x, rounded=False), x.dtype)
    out_shape = (*x.shape[:-1], x.shape[-1] // 2)
    return quantize_f32(y, key, x.dtype, out_shape, scale=scale, global_scale=global_scale,
                        scale_ub=scale_ub, fused_group=True)


# ---------------------------------------------------------------- dequant and the consumer
def dequantize_codes(data: torch.Tensor, scale: torch.Tensor, key: QuantKey, shape: tuple[int, ...],
                     global_scale: Any = None) -> torch.Tensor:
    """f32 ``[M, K]`` values ``q * scale`` (NVFP4: ``e2m1 * (sf / gs)``) of stored codes.

    ``scale`` may be the storage or (column-major layouts) vLLM's view.
    """
    m, k = rows_cols(shape)
    fmt = key.format
    desc = key.scale
    d2 = data.reshape(m, -1)
    vals = e2m1_decode(unpack_fp4(d2)) if key.is_fp4 else d2.to(F32)
    if desc.group_shape.is_per_tensor():
        return vals * scale.to(F32).reshape(())
    mg, kg = logical_scale_shape(desc, m, k)
    s = unlayout_scales(_scale_storage_of(key, scale, m, k).contiguous(), desc.layout, mg, kg)
    if fmt in (QuantFormat.MXFP8, QuantFormat.MXFP4):
        s = f32_from_e8m0(s if s.dtype == torch.uint8 else s.contiguous().view(torch.uint8))
    else:
        s = s.to(F32)
    if fmt == QuantFormat.NVFP4:
        if global_scale is None:
            raise QuantLayoutError("NVFP4 dequantisation needs the global scale")
        s = true_div(s, _as_f32_scalar(global_scale, "global_scale").to(s.device))
    return vals * _expand(s, m, k, *desc.group_shape)


def dequantize(qa: QuantizedActivation, global_scale: Any = None) -> torch.Tensor:
    """f32 values of a ``QuantizedActivation`` in ``orig_shape``."""
    return dequantize_codes(qa.data, qa.scale, qa.quant_key, tuple(qa.orig_shape),
                            global_scale).reshape(qa.orig_shape)


def scaled_mm(a: QuantizedActivation, weight: torch.Tensor, weight_scale: torch.Tensor, weight_key: QuantKey, *,
              bias: torch.Tensor | None = None, out_dtype=None, global_scale_a: Any = None,
              global_scale_w: Any = None) -> torch.Tensor:
    """Reference consumer: ``dequant(a) @ dequant(weight).T (+ bias)`` in f32,
    cast to ``out_dtype`` (default ``a.orig_dtype``).

    ``weight`` is ``[N, K]`` (``[N, K/2]`` packed fp4) quantized with
    ``weight_key`` applied to its ``[N, K]`` view: per-channel weight scales are
    per *row* (``kFp8DynamicTokenSym``-like shape ``[N, 1]``), DeepSeek blocks
    are ``GroupShape(128, 128)`` (``kFp8Static128BlockSym``). The f32 sum's order
    is torch's (BLAS), not XLA's: results agree with the jnp reference to f32
    rounding of the accumulation.
    """
    m, k = rows_cols(tuple(a.orig_shape))
    n = weight.shape[0]
    av = dequantize_codes(a.data, a.scale, a.quant_key, tuple(a.orig_shape), global_scale_a)
    wv = dequantize_codes(weight, weight_scale, weight_key, (n, k), global_scale_w)
    out = torch.matmul(av, wv.T)
    if bias is not None:
        out = out + torch.as_tensor(bias).to(F32)
    out_dtype = a.orig_dtype if out_dtype is None else torch_dtype(canonical_dtype(out_dtype))
    return out.to(out_dtype).reshape(*a.orig_shape[:-1], n)


__all__ = [
    "FP8_MAX", "FP8_MIN_SCALE", "GROUP_EPS", "FP4_MAX", "quantize", "quantize_f32", "rms_norm",
    "rms_norm_quant", "silu_and_mul", "silu_and_mul_quant", "dequantize", "dequantize_codes", "static_scale_storage",
    "scaled_mm", "tree_sum", "layout_scales", "unlayout_scales", "sat_fp8", "e2m1_encode", "pack_fp4",
    "unpack_fp4", "pow2_ceil", "e8m0_from_f32", "f32_from_e8m0", "true_div", "sqrt_rn", "round_to",
]
