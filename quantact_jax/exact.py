"""Correctly rounded arithmetic that XLA may not rewrite.

XLA:CPU's algebraic simplifier turns ``x / y`` into ``x * (1 / y)`` when ``y``
is broadcast (a scalar or a per-row scale), ``1 / sqrt(x)`` into ``rsqrt(x)``,
and (``xla_allow_excess_precision``) may skip rounding bf16/fp16 intermediates.
Each changes last bits, so vLLM's rounding order would not survive. These
helpers hide the operands behind ``optimization_barrier`` and force narrowing
casts through a barrier, so the jnp reference and interpret-mode kernels compute
exactly what torch (and the GPU kernels' ``div.rn``/``sqrt.rn``) compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _full(x, shape):
    return lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(x, F32), shape))


def div(a, b) -> jax.Array:
    """IEEE f32 ``a / b`` (true division, round to nearest even)."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    return _full(a, shape) / _full(b, shape)


def sqrt(a) -> jax.Array:
    """IEEE f32 square root, kept out of ``1/sqrt -> rsqrt`` rewrites."""
    return lax.optimization_barrier(jnp.sqrt(jnp.asarray(a, F32)))


def mul(a, b) -> jax.Array:
    """IEEE f32 product, kept out of re-association with neighbouring products."""
    return lax.optimization_barrier(jnp.asarray(a, F32) * jnp.asarray(b, F32))


def square(a) -> jax.Array:
    """``a * a`` that cannot be contracted into an FMA with a later add: the ``max``
    with 0 (a no-op on squares, NaN propagates) stands between the product and
    the add, whatever XLA does with barriers."""
    a = jnp.asarray(a, F32)
    return jnp.maximum(lax.optimization_barrier(a * a), 0.0)


# (mantissa bits, minimum normal exponent, largest finite value) of the narrow formats
_FORMATS = {"bfloat16": (7, -126, 3.3895313892515355e38), "float16": (10, -14, 65504.0),
            "float8_e4m3fn": (3, -6, 448.0)}


def round_to(v: jax.Array, dtype) -> jax.Array:
    """Round f32 ``v`` to ``dtype`` (round to nearest even, subnormals included) and
    return the result as f32.

    Done in integer arithmetic on the f32 bits: XLA:CPU may drop an
    f32 -> bf16 -> f32 convert pair (excess precision) even behind an
    ``optimization_barrier``; integer ops it cannot rewrite. Values past the
    format's range become +-inf (the caller clips first where vLLM saturates);
    NaN stays NaN. f32 inputs that are themselves subnormal are not expected.
    """
    dtype = jnp.dtype(dtype)
    v = jnp.asarray(v, F32)
    if dtype == F32:
        return v
    p, emin, fmax = _FORMATS[dtype.name]
    u32 = jnp.uint32
    b = lax.bitcast_convert_type(v, u32)
    sign = b & u32(0x80000000)
    a = b & u32(0x7FFFFFFF)
    ex = (a >> 23).astype(jnp.int32)  # biased exponent of |v|
    mant = (a & u32(0x7FFFFF)) | u32(0x800000)  # 24-bit significand
    # bits to drop: 23 - p at normal exponents, more below the format's normal range
    shift = (23 - p) + jnp.maximum(0, (emin + 127) - ex)
    shift = jnp.minimum(shift, 31).astype(u32)
    q = mant >> shift
    rem = mant & ((u32(1) << shift) - u32(1))
    half = u32(1) << (shift - u32(1))
    q = q + ((rem > half) | ((rem == half) & ((q & u32(1)) == u32(1)))).astype(u32)
    # q * 2**(ex - 150 + shift): q < 2**25 converts to f32 exactly; the power of two is built from bits
    e2 = (ex - 150 + shift.astype(jnp.int32) + 127)
    # e2 < 1 (bf16 results below 2**-119) has no normal f32 power of two: scale by
    # 2**64 more, then multiply by 2**-64 (both exact while the result is normal)
    lo = e2 < 1
    pow2 = lax.bitcast_convert_type((jnp.clip(jnp.where(lo, e2 + 64, e2), 1, 254).astype(u32) << 23), F32)
    mag = q.astype(F32) * pow2
    mag = jnp.where(lo, mag * jnp.float32(2.0 ** -64), mag)
    mag = jnp.where(mag > fmax, jnp.inf, mag)
    mag = jnp.where(a >= u32(0x7F800000), jnp.abs(v), mag)  # inf, nan pass through
    mag = jnp.where(a == u32(0), 0.0, mag)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(mag, u32) | sign, F32)
