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
    """IEEE f32 product that cannot be contracted into an FMA with a later add."""
    return lax.optimization_barrier(jnp.asarray(a, F32) * jnp.asarray(b, F32))


def round_to(v: jax.Array, dtype) -> jax.Array:
    """Round f32 ``v`` to ``dtype`` (RNE) and back to f32, rounding for real."""
    dtype = jnp.dtype(dtype)
    if dtype == F32:  # nothing to round, but keep XLA from re-associating products around it
        return lax.optimization_barrier(v.astype(F32))
    return lax.optimization_barrier(v.astype(dtype)).astype(F32)
