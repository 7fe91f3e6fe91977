"""Block-scaled (NVFP4 / MX) GEMM for GPUs without block-scaled MMA: dequantise each K tile in
registers, then a bf16 dot with f32 accumulation.

``out[m, n] = alpha * sum_k (q_a[m, k] * sa[m, k // g]) * (q_b[n, k] * sb[n, k // g]) (+ bias[n])``

- NVFP4: ``q`` are e2m1 codes packed two per byte (element ``2i`` in the low nibble), ``s`` e4m3
  scales per 16 elements, ``alpha = 1 / (gs_a * gs_w)`` from the two global scales (quantisation
  direction, ``448 * 6 / amax``), as vLLM's ``cutlass_scaled_fp4_mm``.
- MXFP8 / MXFP4: e4m3 codes (or packed e2m1) with e8m0 (power-of-two) scales per 32; no alpha.

Hopper has no block-scaled MMA, so the Triton-lowered kernel below (it runs in interpret mode
on CPU too) does what Triton's own ``dot_scaled`` emulation does there: each program owns a
``block_m x block_n`` output tile and walks K in ``block_k`` steps; per step it loads the code
tiles of both operands and their ``[rows, block_k / g]`` scale tiles (read straight from the
key's storage layout, row-major or 128x4-swizzled: no relayout pass), decodes codes x scales to
bf16, and accumulates ``dot(a_tile, b_tile.T)`` in f32. Packed fp4 is never interleaved: the
low nibbles (even k) and the high nibbles (odd k) of a byte tile are two half-width dots
(``sum_k = sum_even + sum_odd``), and both nibbles of a byte share its group's scale. ``alpha``
and the bias are applied in the f32 epilogue; the output is rounded once.

Numerics (why a bf16 dot is exact here, docs/numerics.md): a decoded operand is code x scale.
e2m1 has a 2-bit significand, e4m3 a 4-bit one, e8m0 a 1-bit one (a power of two), so every
NVFP4 / MXFP4 operand has at most 6 significant bits and every MXFP8 operand at most 4: all are
exact in bf16 (8-bit significand; f32's exponent range). The products of two bf16 values are
exact in f32 (16 <= 24 bits). The kernel therefore computes exactly the f32 products of the
dequantised values and differs from :func:`quantact_jax.reference.scaled_mm` only in (1) the
f32 summation order and (2) where the NVFP4 global scales enter: the reference rounds
``sf / gs`` and ``e2m1 * (sf / gs)`` per operand and their product (up to 5 f32 roundings), the
kernel rounds ``alpha`` (2 roundings) and ``alpha * acc`` (1). Both are bounded by a few f32
ulps of ``sum_k |a_k b_k|``; the tests use ``2 K 2**-24 sum_k |a_k b_k|`` (two recursive sums
of K terms) plus one output ulp. One exception to "exact": a decoded value below 2**-126 (an
e8m0 scale near its floor times a small e4m3 code) is subnormal, which bf16 holds with fewer
bits than f32 (and XLA:CPU may flush); the difference is below 2**-133 times the other operand.

Split-K (``split_k > 1``, the decode path): program ``z`` sums its slice of K steps into an f32
partial ``[split_k, M, N]``; the slices are added in a fixed order and the same epilogue runs in
XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from interop.errors import QuantLayoutError
from interop.keys import QuantFormat, QuantKey, ScaleLayout
from interop.layout import cdiv, check_k_divisible, scale_storage_shape
from interop.weights import WEIGHT_MXFP4, WEIGHT_MXFP8, WEIGHT_NVFP4
from quantact_jax import exact, producers
from quantact_jax import reference as ref
from quantact_jax.activation import QuantizedActivation, as_quantized_activation

F32 = jnp.float32
BF16 = jnp.bfloat16
U32 = jnp.uint32

#: Activation formats this kernel consumes, and the weight key each pairs with by default.
FORMATS = (QuantFormat.NVFP4, QuantFormat.MXFP8, QuantFormat.MXFP4)
DEFAULT_WEIGHT_KEYS = {QuantFormat.NVFP4: WEIGHT_NVFP4, QuantFormat.MXFP8: WEIGHT_MXFP8,
                       QuantFormat.MXFP4: WEIGHT_MXFP4}
#: Scale layouts read in-kernel (the ones the NVFP4 / MX producers write).
LAYOUTS = (ScaleLayout.ROW_MAJOR, ScaleLayout.SWIZZLED_128x4)
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class DequantGemmConfig:
    """Output tile ``block_m x block_n``, K step ``block_k`` (logical elements: NVFP4 reads
    ``block_k / 2`` bytes per row), warps, software-pipelining depth, and ``split_k`` K slices."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1

    def __post_init__(self):
        for name, lo in (("block_m", 16), ("block_n", 16), ("block_k", 32)):
            v = getattr(self, name)
            if v < lo or v & (v - 1):  # Triton: powers of two; dots need >= 16 (fp4 halves block_k)
                raise ValueError(f"{name} must be a power of two >= {lo}, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def heuristic_config(m: int, n: int, k: int, fmt: QuantFormat) -> DequantGemmConfig:
    """The H100 sweep's best (bench/results/h100-2026-11-24-s3-dequant_gemm.json, one run): for
    M > 64, 128x256x64 tiles, 8 warps, 3 stages for NVFP4 (130 TFLOP/s at 4096^3) and 128x128x64,
    4 warps, 4 stages for MXFP8 (204 TFLOP/s); for decode-sized M a narrow M tile, 256-element K
    steps and K split until about two waves of an H100's 132 SMs are busy."""
    if m > 64:
        if fmt == QuantFormat.MXFP8:
            return DequantGemmConfig(128, 128, 64, num_warps=4, num_stages=4)
        return DequantGemmConfig(128, 256, 64, num_warps=8, num_stages=3)
    bm = max(16, pl.next_power_of_2(m))
    cfg = DequantGemmConfig(bm, 64, 256, num_warps=4, num_stages=4)
    tiles = cdiv(n, cfg.block_n)
    split = max(1, min(8, 264 // max(tiles, 1), cdiv(k, cfg.block_k)))
    return dataclasses.replace(cfg, split_k=split)


# ------------------------------------------------------------------ decoding helpers (in-kernel)
def e2m1_to_f32(codes: jax.Array) -> jax.Array:
    """e2m1 codes (any unsigned int, values 0..15) -> f32, by building the f32 bits (no table:
    Triton has no gather from a constant). Sign in bit 3; exponent bits 2..1; mantissa bit 0;
    exponent 0 is the subnormal 0 / 0.5."""
    c = codes.astype(U32)
    e, mant = (c >> 1) & 3, c & 1
    mag = jnp.where(e == 0, mant * (126 << 23), ((e + 126) << 23) | (mant << 22))
    return jax.lax.bitcast_convert_type(mag | ((c >> 3) << 31), F32)


def _scale_tile(s_ref, rows, row_limit: int, g0, gt: int, n_groups: int, layout: ScaleLayout, e8m0: bool):
    """f32 scales ``[len(rows), gt]`` of groups ``g0 .. g0+gt`` read from the flat byte storage of
    ``layout`` (rows >= row_limit and groups >= n_groups read as 0)."""
    g = g0 + jnp.arange(gt, dtype=jnp.int32)
    off, live = producers._scale_offsets(layout, rows[:, None], g[None, :], row_limit, n_groups)
    live = live & (rows < row_limit)[:, None] & (g < n_groups)[None, :]
    b = plgpu.load(s_ref.at[jnp.where(live, off, 0)], mask=live, other=jnp.zeros((), jnp.uint8))
    if e8m0:
        return jnp.where(live, ref.f32_from_e8m0(b), 0.0)
    return jax.lax.bitcast_convert_type(b, ref.E4M3).astype(F32)


def _dequant(vals: jax.Array, s: jax.Array, per: int) -> jax.Array:
    """``vals [R, C] * s[R, C // per]`` (each scale over ``per`` adjacent columns) -> bf16, exact."""
    r, c = vals.shape
    s_full = jnp.broadcast_to(s[:, :, None], (r, c // per, per)).reshape(r, c)
    return (vals * s_full).astype(BF16)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [M, K] @ b[N, K].T`` in f32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


@dataclasses.dataclass(frozen=True)
class _Spec:
    m: int
    n: int
    k: int
    packed: bool  # e2m1 pairs in uint8 (NVFP4, MXFP4); else e4m3 codes (MXFP8)
    e8m0: bool  # MX scales; else e4m3 (NVFP4)
    group: int
    a_layout: ScaleLayout
    b_layout: ScaleLayout
    has_alpha: bool
    has_bias: bool
    poisoned: bool


def _kernel(*refs, spec: _Spec, cfg: DequantGemmConfig):
    refs = list(refs)
    a_ref, b_ref, sa_ref, sb_ref = refs[:4]
    del refs[:4]
    alpha_ref = refs.pop(0) if spec.has_alpha else None
    bias_ref = refs.pop(0) if spec.has_bias else None
    o_ref = refs[-1]  # after the aliased poison buffer, if any
    m, n, k, g = spec.m, spec.n, spec.k, spec.group
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m0, n0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rm = m0 + jnp.arange(bm, dtype=jnp.int32)
    rn = n0 + jnp.arange(bn, dtype=jnp.int32)
    kw = bk // 2 if spec.packed else bk  # stored columns per K step
    width = k // 2 if spec.packed else k
    gt, n_groups = bk // g, k // g  # groups per step (bk is a multiple of g), groups per row
    per = g // 2 if spec.packed else g  # stored columns per scale

    def body(i, acc):
        cols = i * kw + jnp.arange(kw, dtype=jnp.int32)
        a = plgpu.load(a_ref.at[pl.ds(m0, bm), pl.ds(i * kw, kw)], mask=(rm < m)[:, None] & (cols < width)[None, :],
                       other=jnp.zeros((), a_ref.dtype))
        b = plgpu.load(b_ref.at[pl.ds(n0, bn), pl.ds(i * kw, kw)], mask=(rn < n)[:, None] & (cols < width)[None, :],
                       other=jnp.zeros((), b_ref.dtype))
        sa = _scale_tile(sa_ref, rm, m, i * gt, gt, n_groups, spec.a_layout, spec.e8m0)
        sb = _scale_tile(sb_ref, rn, n, i * gt, gt, n_groups, spec.b_layout, spec.e8m0)
        if spec.packed:  # even k in the low nibbles, odd k in the high ones: two half-width dots
            even = _dot_t(_dequant(e2m1_to_f32(a & 0xF), sa, per), _dequant(e2m1_to_f32(b & 0xF), sb, per))
            odd = _dot_t(_dequant(e2m1_to_f32(a >> 4), sa, per), _dequant(e2m1_to_f32(b >> 4), sb, per))
            return acc + even + odd
        return acc + _dot_t(_dequant(a.astype(F32), sa, per), _dequant(b.astype(F32), sb, per))

    steps = cdiv(k, bk)
    out_mask = (rm < m)[:, None] & (rn < n)[None, :]
    if cfg.split_k > 1:  # this program's K slice; the epilogue runs after the slices are added
        per_slice = cdiv(steps, cfg.split_k)
        s0 = pl.program_id(2) * per_slice
        acc = jax.lax.fori_loop(s0, jnp.minimum(s0 + per_slice, steps), body, jnp.zeros((bm, bn), F32))
        plgpu.store(o_ref.at[pl.program_id(2), pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=out_mask)
        return
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), F32))
    if spec.has_alpha:
        acc = plgpu.load(alpha_ref.at[pl.ds(0, 1)]).reshape(1, 1) * acc
    if spec.has_bias:
        acc = acc + plgpu.load(bias_ref.at[pl.ds(n0, bn)], mask=rn < n, other=0.0).astype(F32)[None, :]
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=out_mask)


def _bytes(x: jax.Array) -> jax.Array:
    """Flat uint8 view of 1-byte scale storage (e4m3 / e8m0 / uint8)."""
    x = jnp.asarray(x)
    return (x if x.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(x, jnp.uint8)).reshape(-1)


def dequant_matmul(a: jax.Array, b: jax.Array, sa: jax.Array, sb: jax.Array, *, fmt: QuantFormat,
                   k: int, a_layout: ScaleLayout, b_layout: ScaleLayout, alpha: jax.Array | None = None,
                   bias: jax.Array | None = None, out_dtype: Any = jnp.bfloat16,
                   config: DequantGemmConfig | None = None, interpret: bool = False,
                   _poison: bool = False) -> jax.Array:
    """The kernel on raw operands: ``a [M, Ka]`` and ``b [N, Ka]`` codes (``Ka = K/2`` packed uint8
    for fp4, ``K`` e4m3 for MXFP8), their scale storage ``sa`` / ``sb`` in ``a_layout`` /
    ``b_layout`` (e4m3 / e8m0 or their uint8 bytes), ``alpha`` (``(1,)`` f32, NVFP4), ``bias``
    ``(N,)``. Returns ``[M, N]`` in ``out_dtype``. Shapes are trusted: :func:`scaled_mm` checks them.
    ``_poison`` (tests): the output starts as 0xA5 bytes, so an element the kernel misses shows."""
    m, n = a.shape[0], b.shape[0]
    out_dtype = jnp.dtype(out_dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    g = {QuantFormat.NVFP4: 16, QuantFormat.MXFP8: 32, QuantFormat.MXFP4: 32}[fmt]
    cfg = config or heuristic_config(m, n, k, fmt)  # block_k: a power of two >= 32, so whole groups
    split = cfg.split_k
    spec = _Spec(m=m, n=n, k=k, packed=fmt != QuantFormat.MXFP8, e8m0=fmt != QuantFormat.NVFP4, group=g,
                 a_layout=a_layout, b_layout=b_layout, has_alpha=alpha is not None and split == 1,
                 has_bias=bias is not None and split == 1, poisoned=_poison)
    inputs = [a, b, _bytes(sa), _bytes(sb)]
    if spec.has_alpha:
        inputs.append(jnp.asarray(alpha, F32).reshape(1))
    if spec.has_bias:
        inputs.append(jnp.asarray(bias))
    out_shape = jax.ShapeDtypeStruct((split, m, n) if split > 1 else (m, n), F32 if split > 1 else out_dtype)
    aliases = {}
    if _poison:
        aliases = {len(inputs): 0}
        inputs.append(producers._poisoned(out_shape))
    out = pl.pallas_call(
        functools.partial(_kernel, spec=spec, cfg=cfg),
        out_shape=out_shape,
        grid=(cdiv(m, cfg.block_m), cdiv(n, cfg.block_n)) + ((split,) if split > 1 else ()),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name=f"quantact_dequant_mm_{fmt.value}",
    )(*inputs)
    if split == 1:
        return out
    acc = out[0]
    for i in range(1, split):  # a fixed summation order: the result does not depend on XLA's reduce
        acc = acc + out[i]
    if alpha is not None:
        acc = jnp.asarray(alpha, F32).reshape(()) * acc
    if bias is not None:
        acc = acc + jnp.asarray(bias).astype(F32)[None, :]
    return acc.astype(out_dtype)


# ------------------------------------------------------------------ the consumer op
def supports(input_key: QuantKey, weight_key: QuantKey) -> bool:
    """Whether :func:`scaled_mm` takes this activation / weight key pair: NVFP4, MXFP8 or MXFP4
    activations with row-major or 128x4-swizzled scales, and a weight of the same format and
    group with row-major or swizzled scales (default pairing: :data:`DEFAULT_WEIGHT_KEYS`)."""
    fmt = input_key.format
    return (fmt in FORMATS and input_key.scale.layout in LAYOUTS and weight_key.format == fmt
            and weight_key.scale.group_shape == input_key.scale.group_shape and weight_key.scale.layout in LAYOUTS)


def _one_value(v: Any, what: str) -> jax.Array:
    if v is None:
        raise QuantLayoutError(f"NVFP4 GEMM needs {what} (one value, quantisation direction 448*6/amax)")
    return ref.as_f32_scalar(v, what)


def scaled_mm(x: QuantizedActivation | jax.Array, weight: jax.Array, weight_scale: jax.Array, *,
              input_quant_key: QuantKey, bias: jax.Array | None = None, out_dtype: Any = None,
              input_scale: Any = None, input_global_scale: Any = None, weight_global_scale: Any = None,
              weight_key: QuantKey | None = None, config: DequantGemmConfig | None = None,
              backend: str = "auto", interpret: bool | None = None, _poison: bool = False) -> jax.Array:
    """``x @ dequant(weight).T (+ bias)`` for NVFP4 / MXFP8 / MXFP4 operands (module docstring).

    ``x``: a ``QuantizedActivation`` keyed ``input_quant_key`` (checked: a mismatch raises
    ``QuantKeyMismatchError``, nothing is re-quantized) or a plain float array, then quantized with
    ``input_quant_key`` by the Pallas producer (``input_global_scale`` for NVFP4, ``input_scale``
    for static keys). ``weight``: ``[N, K/2]`` uint8 (packed e2m1) or ``[N, K]`` float8_e4m3fn
    (MXFP8); ``weight_scale``: its scales in ``weight_key``'s storage layout (default
    :data:`DEFAULT_WEIGHT_KEYS`: row-major ``[N, K/16]`` e4m3 or ``[N, K/32]`` e8m0; uint8 bytes
    are accepted for e8m0). NVFP4 needs ``input_global_scale`` and ``weight_global_scale`` (one
    value each, quantisation direction). Output ``[*orig_shape[:-1], N]`` in ``out_dtype``
    (default: the activation's ``orig_dtype``). ``backend``: ``"auto"`` or ``"triton"`` (the
    only implementation); ``interpret`` defaults to True off GPU.
    """
    if not isinstance(input_quant_key, QuantKey):
        raise TypeError(f"input_quant_key must be a QuantKey, got {input_quant_key!r}")
    fmt = input_quant_key.format
    if fmt not in FORMATS or input_quant_key.scale.layout not in LAYOUTS:
        raise QuantLayoutError(f"{input_quant_key}: the dequantising GEMM takes NVFP4 / MXFP8 / MXFP4 activations "
                               "with row-major or swizzled_128x4 scales")
    if backend not in ("auto", "triton"):
        raise ValueError(f"NVFP4 / MX GEMMs run on the Triton kernel only: backend must be 'auto' or 'triton', "
                         f"got {backend!r}")
    if config is not None and not isinstance(config, DequantGemmConfig):
        raise TypeError(f"config must be a DequantGemmConfig for {fmt.value} operands, got {type(config).__name__}")
    wkey = DEFAULT_WEIGHT_KEYS[fmt] if weight_key is None else weight_key
    if not supports(input_quant_key, wkey):
        raise QuantLayoutError(f"weight key {wkey} does not pair with activation key {input_quant_key}: expected "
                               f"{fmt.value} weights, group {input_quant_key.scale.group_shape}, row-major or "
                               "swizzled_128x4 scales")
    if fmt != QuantFormat.NVFP4 and (input_global_scale is not None or weight_global_scale is not None):
        raise QuantLayoutError(f"{fmt.value} has no global scales (they are NVFP4's)")
    weight = jnp.asarray(weight)
    packed = fmt != QuantFormat.MXFP8
    want_dt = jnp.dtype(jnp.uint8 if packed else jnp.float8_e4m3fn)
    if weight.ndim != 2 or weight.dtype != want_dt:
        raise QuantLayoutError(f"{fmt.value} weight must be [N, {'K/2' if packed else 'K'}] {want_dt}, got "
                               f"{tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape[0], weight.shape[1] * (2 if packed else 1)
    check_k_divisible(wkey, k)
    ws = jnp.asarray(weight_scale)
    want_s = scale_storage_shape(wkey.scale, n, k)
    ok_dt = (jnp.dtype(wkey.scale.dtype),) + ((jnp.dtype(jnp.uint8),) if fmt != QuantFormat.NVFP4 else ())
    if tuple(ws.shape) != want_s or ws.dtype not in ok_dt:
        raise QuantLayoutError(f"weight_scale is {tuple(ws.shape)} {ws.dtype}; {wkey} on weight [N={n}, K={k}] needs "
                               f"{want_s} {' or '.join(str(d) for d in ok_dt)} ({wkey.scale.layout})")
    if bias is not None and tuple(jnp.shape(bias)) != (n,):
        raise QuantLayoutError(f"bias must have shape ({n},), got {tuple(jnp.shape(bias))}")
    alpha = None
    if fmt == QuantFormat.NVFP4:
        gs_a = _one_value(input_global_scale, "input_global_scale")
        gs_w = _one_value(weight_global_scale, "weight_global_scale")
        alpha = exact.div(1.0, gs_a * gs_w).reshape(1)  # vLLM: alpha = 1 / (gs_a * gs_w), in f32

    qa = as_quantized_activation(x, input_quant_key)
    if qa is None:
        qa = producers.quantize(jnp.asarray(x), input_quant_key, scale=input_scale,
                                global_scale=input_global_scale, interpret=interpret)
    if qa.orig_shape[-1] != k:
        raise QuantLayoutError(f"activation K={qa.orig_shape[-1]} does not match weight [N={n}, K={k}]")
    out_dtype = jnp.dtype(qa.orig_dtype if out_dtype is None else out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise QuantLayoutError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    interpret = producers._default_interpret() if interpret is None else interpret
    m = int(np.prod(qa.orig_shape[:-1], dtype=np.int64))
    a2 = qa.data.reshape(m, -1)
    out = dequant_matmul(a2, weight, qa.scale, ws, fmt=fmt, k=k, a_layout=input_quant_key.scale.layout,
                         b_layout=wkey.scale.layout, alpha=alpha, bias=bias, out_dtype=out_dtype, config=config,
                         interpret=interpret, _poison=_poison)
    return out.reshape(*qa.orig_shape[:-1], n)


__all__ = ["DEFAULT_WEIGHT_KEYS", "FORMATS", "LAYOUTS", "DequantGemmConfig", "dequant_matmul", "e2m1_to_f32",
           "heuristic_config", "scaled_mm", "supports"]
