"""How far a sharded result may be from one device's: the bounds shared by ``tests/sharding_cases.py``
and the multi-GPU bench scripts (``bench/sharding_gpu.py``, ``bench/tp_block_gpu.py``, which put this
directory on ``sys.path``). No side effects at import; NumPy results.

Producers, data parallel and column parallel run every output element through the same kernel
arithmetic as one device, so they are compared bit for bit. Row parallel (and the TP MLP block's down
projection) sums per-shard partials with ``lax.psum``: another summation order than the single
device's K loop, bounded here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quantact_jax import consumers as C
from quantact_jax import reference as R

U32 = 2.0 ** -24  # unit roundoff of f32
BF16_STEP = 2.0 ** -7  # relative spacing of bf16 at the bottom of a binade: one output step
WMODE = {C.WEIGHT_PER_TENSOR: "tensor", C.WEIGHT_PER_CHANNEL: "channel", C.WEIGHT_BLOCK_128: "block"}
FAST_ACCUM_NORM_F32 = 1e-3  # tests/test_consumers.py: a fast-accumulation GEMM vs the exact references, f32 out


def interleave_halves(x, parts: int):
    """``x [..., 2d] = [gate | up]`` -> shard ``i`` of the last dim holds ``[gate_i | up_i]`` (what a
    column-parallel gate/up projection leaves; the input of a K-split ``silu_and_mul_quant``)."""
    d = x.shape[-1] // 2
    g, u = (a.reshape(*x.shape[:-1], parts, d // parts) for a in (x[..., :d], x[..., d:]))
    return jnp.concatenate([g, u], axis=-1).reshape(x.shape)


def gemm_magnitude(qa, w, ws, wmode: str) -> np.ndarray:
    """``sum_k |a[m, k]| |w[n, k]|`` of the dequantized operands (f32, HIGHEST): what every error term scales with."""
    wk = {"tensor": C.WEIGHT_PER_TENSOR, "channel": C.WEIGHT_PER_CHANNEL, "block": C.WEIGHT_BLOCK_128}[wmode]
    a = jnp.abs(R.dequantize(qa)).reshape(-1, qa.orig_shape[-1])
    wv = jnp.abs(R.dequantize_codes(w, ws, wk, w.shape))
    return np.asarray(jnp.matmul(a, wv.T, precision=jax.lax.Precision.HIGHEST))


def fast_accum_k(key, m: int, k: int, parts: int) -> int:
    """K that the two computations (one device's GEMM of K, a shard's of ``K / parts``) accumulate in
    the tensor core's fp8 accumulator (~14 mantissa bits, no promotion), for :func:`row_parallel_bound`.

    On a GPU the auto backend runs M > 8 on the Mosaic kernels (Hopper; conservatively assumed on
    any GPU): per-tensor / per-token activations accumulate the whole K there for M > 32 (cuBLASLt's
    ``use_fast_accum=True``), and each K step for 8 < M <= 32 (the decode kernel's promotion, within
    the same bound). 1x128-group activations go to the block-scaled kernel, which promotes every
    128-wide K block to f32 (the same blocks on both sides: only the f32 order differs), and
    M <= 8 to Triton's f32 accumulation: 0 for those, and on the CPU."""
    if jax.default_backend() != "gpu" or m <= C.TRITON_DECODE_MAX_M or key.scale.group_shape.is_per_group():
        return 0
    return k + k // parts


def row_parallel_bound(qa, w, ws, wmode: str, n_blocks: int, *, bias=None, fast_k: int = 0) -> np.ndarray:
    """Elementwise bound on ``|row parallel - one device|`` for ``qa @ dequant(w).T`` (f32 out).

    Row parallel sums the per-shard partials (scales applied) in another order than the
    single-device kernel's sequential K loop over 128-wide blocks; the products inside each block
    are the same. Both orders are sums of ``n_blocks`` f32 terms, each scaled by two roundings, so
    each is within ``(n_blocks + 2) * u * sum|terms|`` of the exact value (u = 2**-24); their
    difference within twice that, with ``sum|terms|`` = the GEMM of the dequantized magnitudes.

    ``bias``: each side adds it with one more rounding (the kernel's epilogue, possibly fused into
    an FMA, or after the psum): ``2 u (sum|terms| + |bias|)`` more. ``fast_k`` (:func:`fast_accum_k`):
    K accumulated in the tensor core's ~14-bit accumulator by the two sides together; each 32-wide
    wgmma step loses at most ``2**-13`` of the running magnitude (tests/test_consumers.py), so
    ``(fast_k / 32) 2**-13 sum|terms|`` more.
    """
    mag = gemm_magnitude(qa, w, ws, wmode)
    bound = 2 * (n_blocks + 2) * U32 * mag
    if bias is not None:
        bound = bound + 2 * U32 * (mag + np.abs(np.asarray(bias, np.float32)))
    if fast_k:
        bound = bound + (fast_k / 32) * 2.0 ** -13 * mag
    return bound


def mm_bound(y, layer, n_blocks: int, **kw) -> np.ndarray:
    """:func:`row_parallel_bound` for ``layer(y)`` with a quantized ``y`` (``kw``: ``bias``, ``fast_k``)."""
    return row_parallel_bound(y, layer.weight, layer.weight_scale, WMODE[layer.weight_key], n_blocks, **kw)


def partial_sum_bound(parts) -> np.ndarray:
    """Bound on two f32 sums of the same ``len(parts)`` partials in different orders:
    ``2 (n - 1) u sum|p_i|``; 0 for two partials (``a + b == b + a`` exactly)."""
    n = len(parts)
    if n <= 2:
        return np.zeros(np.shape(parts[0]), np.float32)
    return 2 * (n - 1) * U32 * sum(np.abs(np.asarray(p, np.float32)) for p in parts)


def close_after_cast(got, want, bound, min_equal: float | None = 0.95) -> tuple[bool, str]:
    """``got`` and ``want`` are the same f32 value in two summation orders (within ``bound``), each
    rounded to bf16: they differ by at most the bound plus one bf16 step (2**-7 relative) where the
    bound is not 0 (rounding can tip where the f32 values straddle a bf16 midpoint; such tips are
    rare: at least ``min_equal`` of the outputs must be equal). Returns ``(ok, why)``."""
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    bound = np.broadcast_to(np.asarray(bound, np.float32), g.shape)
    step = np.where(bound > 0, BF16_STEP * np.maximum(np.abs(g), np.abs(w)), 0.0)
    over = np.abs(g - w) > bound + step
    if over.any():
        return False, f"{int(over.sum())} of {over.size} outputs outside the bound"
    if min_equal is not None and (g == w).mean() <= min_equal:
        return False, f"{(g != w).mean():.3f} of the outputs differ"
    return True, ""


def rel_l2(got, want) -> float:
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-300))


def single_mlp(block, x, res, fused: bool = True):
    """One device's block, with the down projection's quantized input (for the bound) and the gate/up
    output: ``(out, residual, h, y)``."""
    from quantact_jax import mlp as M
    from quantact_jax import producers as PR

    out, res_out = M.mlp(block, x, res, fused=fused)
    a, _ = PR.rms_norm_quant(x, block.norm_weight, layer=block.gate_up, residual=res, eps=block.eps)
    if not fused:
        n = R.rms_norm(x, block.norm_weight, block.eps, res, add_in_f32=False)[0]
        a = block.gate_up.quantize_input(n)
    h = block.gate_up(a)
    y = PR.silu_and_mul_quant(h, layer=block.down) if fused else block.down.quantize_input(M.silu_and_mul(h))
    return out, res_out, h, y
