"""Scaled-matmul consumer: ``scaled_mm`` takes a ``QuantizedActivation`` (or a plain array it
quantizes itself) and fp8 weights ``[N, K]`` and runs an fp8 GEMM with the scale epilogue.

This is the Triton-lowered Pallas implementation (runs in interpret mode on CPU). Each
program owns a ``block_m x block_n`` output tile and walks K in ``block_k`` steps with an
fp8 x fp8 -> f32 dot (weights K-major, as ``torch.nn.Linear.weight``). Scales, following
vLLM (NUMERICS.md):

- per-tensor / per-token activations x per-tensor / per-channel weights:
  ``out = scale_a[m] * (scale_b[n] * acc) (+ bias[n])`` in the epilogue;
- DeepSeek block scaling (activation groups 1x128, weight blocks 128x128):
  ``out[m, n] = sum_kb scale_a[m, kb] * scale_b[n // 128, kb] * dot_kb`` in the main loop
  (``block_k`` is 128 so each step is one scale block).

Backends (``backend=``): ``"mosaic"`` is the Hopper kernel in :mod:`quantact_jax.mosaic_gemm`
(TMA + warp-specialised wgmma, per-tensor / per-token x per-channel scales; the fast path on an
H100; its fp8 accumulation is the tensor core's, like cuBLASLt's ``use_fast_accum=True``); ``"triton"`` is the kernel below, which takes every supported key, runs in interpret
mode on CPU, and with ``split_k > 1`` is the small-M decode path: K is cut into ``split_k``
slices whose f32 partial sums are added (in a fixed order) before the same epilogue.
For M <= 32 ``"mosaic"`` is the swap-AB decode kernel (``mosaic_gemm.scaled_mm_decode``: the
weight fills wgmma's 64-row side, the activation rows its N side; 25.2 us of kernel at
1x8192x8192 on an H100, 2.7 TB/s), which by default promotes the tensor core's ~14-bit fp8
accumulator into f32 registers every K step (max error 8.7e-6 of sum|a||w| at K = 8192, against
3.2e-4 for the fast accumulator over all K and 1.4e-8 for Triton's mma.sync; bench/decode_gpu.py).
For 32 < M <= 64 it is the main kernel with one 64-row tile (no wasted rows left to pad, no output
transpose; the fast accumulator, as for M > 64): 25.9 us at 64x8192x8192 against the decode
kernel's 27.6 (session 5 sweep; at M = 16 the decode kernel is ahead, 44.7 against 45.2 us at
16x28672x4096, transpose included).
``"auto"`` (default) on a Hopper GPU picks the Mosaic GEMM for M > 32 and the Mosaic decode
kernel for 8 < M <= 32 when the problem fits them (H100, N = K = 8192, device time: 26.2 us at
M = 16 against split-K Triton's 27.3), and split-K Triton for M <= 8, where its exact f32
accumulation also comes faster (26.2 us at M = 1 against 27.2: the decode kernel's output
transpose and padded scales cost ~2.5 us there). Otherwise Triton (CPU, interpret mode, untiled
shapes, block scales at M <= 64).
Block scales on Mosaic (M > 64) are :mod:`quantact_jax.mosaic_block_gemm` (per-128-K promotion).

NVFP4 / MXFP8 / MXFP4 activations go to :mod:`quantact_jax.dequant_gemm` (Hopper has no block-scaled
MMA: its kernel dequantises each K tile in registers and runs a bf16 dot with f32 accumulation).
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
from interop.keys import GroupShape, QuantFormat, QuantKey, ScaleLayout
from interop.layout import cdiv
from interop.weights import WEIGHT_BLOCK_128, WEIGHT_PER_CHANNEL, WEIGHT_PER_TENSOR
from quantact_jax import dequant_gemm, mosaic_block_gemm, mosaic_gemm, producers
from quantact_jax.activation import QuantizedActivation, as_quantized_activation

F32 = jnp.float32
TRITON_DECODE_MAX_M = 8  # auto: M <= 8 stays on split-K Triton (module docstring)
MOSAIC_DECODE_MAX_M = 32  # auto and backend="mosaic": M <= 32 on the swap-AB decode kernel, above on the main one
FP8 = jnp.float8_e4m3fn

# Weight keys on the ``[N, K]`` weight (interop.weights, re-exported): per-tensor, per-output-channel
# (a scale per row, shape ``[N, 1]``), DeepSeek 128x128 blocks (``[cdiv(N,128), cdiv(K,128)]``).


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Output tile, K step, warps and software-pipelining depth."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1  # > 1: K slices summed after the kernel (the decode path)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


#: Decode (M <= 64) configs from an H100 sweep (bench/results/, N = K = 8192): narrow M tiles,
#: and K split so that enough programs stream the weight at once.
DECODE_CONFIGS = {16: MatmulConfig(16, 64, 256, 4, 4, split_k=4), 32: MatmulConfig(32, 64, 256, 4, 4, split_k=4),
                  64: MatmulConfig(64, 64, 256, 4, 4, split_k=4)}


def heuristic_config(m: int, n: int, k: int, block_scaled: bool) -> MatmulConfig:
    """Triton config: the decode table for M <= 64 (K step 128 for block scales, one scale
    block per step), 128x128x128 otherwise. Split-K only when the output tiles alone leave
    most SMs idle."""
    if m > 64:
        return MatmulConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4)
    cfg = DECODE_CONFIGS[16 if m <= 16 else 32 if m <= 32 else 64]
    if block_scaled:
        cfg = dataclasses.replace(cfg, block_k=128)
    tiles = cdiv(n, cfg.block_n)
    split = max(1, min(cfg.split_k, 264 // max(tiles, 1), cdiv(k, cfg.block_k)))
    return dataclasses.replace(cfg, split_k=split)


def weight_key_for(weight_scale: jax.Array, n: int, k: int, prefer_block: bool = False) -> QuantKey:
    """Infer the weight key from the scale's shape; clear error for any other shape.

    A ``(1, 1)`` scale on a weight of one 128x128 block is both per-tensor and block-scaled
    (the same number); ``prefer_block`` picks the block reading (for 1x128-group activations).
    """
    shp = tuple(jnp.shape(weight_scale))
    if prefer_block and shp == (cdiv(n, 128), cdiv(k, 128)):
        return WEIGHT_BLOCK_128
    if shp in ((), (1,), (1, 1)):
        return WEIGHT_PER_TENSOR
    if shp in ((n, 1), (n,)):
        return WEIGHT_PER_CHANNEL
    if shp == (cdiv(n, 128), cdiv(k, 128)):
        return WEIGHT_BLOCK_128
    raise QuantLayoutError(f"weight_scale of shape {shp} fits no weight scheme for weight [{n}, {k}]: expected "
                           f"(1,) per-tensor, ({n}, 1) per-channel or ({cdiv(n, 128)}, {cdiv(k, 128)}) 128x128 blocks")


def _kernel(a_ref, b_ref, sa_ref, sb_ref, *rest, m: int, n: int, k: int, a_mode: str, b_mode: str,
            has_bias: bool, cfg: MatmulConfig):
    bias_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m0, n0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rm = m0 + jnp.arange(bm, dtype=jnp.int32)
    rn = n0 + jnp.arange(bn, dtype=jnp.int32)
    block = a_mode == "group128"
    kg = cdiv(k, 128)

    def body(i, acc):
        k0 = i * bk
        ck = k0 + jnp.arange(bk, dtype=jnp.int32)
        a = plgpu.load(a_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=(rm < m)[:, None] & (ck < k)[None, :],
                       other=jnp.zeros((), a_ref.dtype))
        b = plgpu.load(b_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], mask=(rn < n)[:, None] & (ck < k)[None, :],
                       other=jnp.zeros((), b_ref.dtype))
        part = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        if block:  # one 128-wide scale block per step
            sa = plgpu.load(sa_ref.at[jnp.minimum(rm, m - 1) * kg + i], mask=rm < m, other=0.0)
            sb = plgpu.load(sb_ref.at[jnp.minimum(rn // 128, cdiv(n, 128) - 1) * kg + i], mask=rn < n, other=0.0)
            part = sa[:, None] * (sb[None, :] * part)
        return acc + part

    steps = cdiv(k, bk)
    if cfg.split_k == 1:
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), F32))
    else:  # this program's K slice; partial sums go out unscaled (block scales are in `part`)
        per = cdiv(steps, cfg.split_k)
        s0 = pl.program_id(2) * per
        acc = jax.lax.fori_loop(s0, jnp.minimum(s0 + per, steps), body, jnp.zeros((bm, bn), F32))
        plgpu.store(o_ref.at[pl.program_id(2), pl.ds(m0, bm), pl.ds(n0, bn)], acc,
                    mask=(rm < m)[:, None] & (rn < n)[None, :])
        return
    if not block:
        if a_mode == "tensor":
            sa = plgpu.load(sa_ref.at[pl.ds(0, 1)]).reshape(1, 1)
        else:
            sa = plgpu.load(sa_ref.at[pl.ds(m0, bm)], mask=rm < m, other=0.0)[:, None]
        if b_mode == "tensor":
            sb = plgpu.load(sb_ref.at[pl.ds(0, 1)]).reshape(1, 1)
        else:
            sb = plgpu.load(sb_ref.at[pl.ds(n0, bn)], mask=rn < n, other=0.0)[None, :]
        acc = sa * (sb * acc)
    if has_bias:
        acc = acc + plgpu.load(bias_ref.at[pl.ds(n0, bn)], mask=rn < n, other=0.0).astype(F32)[None, :]
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype),
                mask=(rm < m)[:, None] & (rn < n)[None, :])


def _input_mode(key: QuantKey) -> str:
    gs = key.scale.group_shape
    if key.format != QuantFormat.FP8:
        raise QuantLayoutError(f"{key}: only fp8 activations are supported by this consumer so far")
    if gs.is_per_tensor():
        return "tensor"
    if gs.is_per_token():
        return "token"
    if gs == GroupShape(1, 128) and key.scale.layout == ScaleLayout.ROW_MAJOR and not key.scale.ue8m0:
        return "group128"
    raise QuantLayoutError(f"{key}: this consumer takes per-tensor, per-token or row-major 1x128-group "
                           "fp8 activations")


def _epilogue(acc: jax.Array, sa: jax.Array, sb: jax.Array, bias: jax.Array | None, a_mode: str, b_mode: str,
              out_dtype) -> jax.Array:
    """The split-K epilogue in XLA: the same ``sa * (sb * acc) (+ bias)`` as the kernel's."""
    if a_mode != "group128":
        acc = sa.reshape(-1, 1)[: acc.shape[0]] * (sb.reshape(1, -1) * acc)
    if bias is not None:
        acc = acc + bias.astype(F32)[None, :]
    return acc.astype(out_dtype)


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def scaled_mm(x: QuantizedActivation | jax.Array, weight: jax.Array, weight_scale: jax.Array, *,
              bias: jax.Array | None = None, out_dtype=None, input_quant_key: QuantKey,
              input_scale: Any = None, weight_key: QuantKey | None = None,
              config: (MatmulConfig | mosaic_gemm.MosaicConfig | mosaic_gemm.DecodeConfig
                       | mosaic_block_gemm.MosaicBlockConfig | None) = None,
              backend: str = "auto",
              interpret: bool | None = None, input_global_scale: Any = None,
              weight_global_scale: Any = None) -> jax.Array:
    """``x @ dequant(weight).T`` with vLLM's scaled-GEMM semantics.

    ``x``: a ``QuantizedActivation`` with key ``input_quant_key`` (checked: a mismatch raises
    ``QuantKeyMismatchError``, nothing is re-quantized) or a plain float array, which is then
    quantized with ``input_quant_key`` by the Pallas producer (``input_scale`` for static keys).
    ``weight``: ``[N, K]`` float8_e4m3fn; ``weight_scale``: ``(1,)``, ``(N, 1)`` or
    ``(cdiv(N,128), cdiv(K,128))`` (inferred by :func:`weight_key_for` unless ``weight_key`` is
    given). Output ``[*orig_shape[:-1], N]`` in ``out_dtype`` (default: the activation's
    ``orig_dtype``). ``backend``: ``"auto"``, ``"mosaic"`` or ``"triton"`` (module docstring);
    ``config`` a :class:`MatmulConfig` (Triton), :class:`mosaic_gemm.MosaicConfig` or, for M <= 64,
    :class:`mosaic_gemm.DecodeConfig` (the Mosaic swap-AB decode kernel), for block scales
    :class:`mosaic_block_gemm.MosaicBlockConfig`.
    NVFP4 / MX keys: :func:`quantact_jax.dequant_gemm.scaled_mm` (its weights, scales, global scales
    ``input_global_scale`` / ``weight_global_scale`` and ``DequantGemmConfig``).
    """
    if isinstance(input_quant_key, QuantKey) and input_quant_key.format in dequant_gemm.FORMATS:
        return dequant_gemm.scaled_mm(x, weight, weight_scale, input_quant_key=input_quant_key, bias=bias,
                                      out_dtype=out_dtype, input_scale=input_scale,
                                      input_global_scale=input_global_scale, weight_global_scale=weight_global_scale,
                                      weight_key=weight_key, config=config, backend=backend, interpret=interpret)
    qa = as_quantized_activation(x, input_quant_key)
    if qa is None:
        qa = producers.quantize(jnp.asarray(x), input_quant_key, scale=input_scale, interpret=interpret)
    a_mode = _input_mode(input_quant_key)
    weight = jnp.asarray(weight)
    if weight.ndim != 2 or weight.dtype != FP8:
        raise QuantLayoutError(f"weight must be [N, K] float8_e4m3fn, got {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    if qa.orig_shape[-1] != k:
        raise QuantLayoutError(f"activation K={qa.orig_shape[-1]} does not match weight [N={n}, K={k}]")
    wkey = weight_key or weight_key_for(weight_scale, n, k, prefer_block=a_mode == "group128")
    if wkey not in (WEIGHT_PER_TENSOR, WEIGHT_PER_CHANNEL, WEIGHT_BLOCK_128):
        raise QuantLayoutError(f"weight_key must be WEIGHT_PER_TENSOR, WEIGHT_PER_CHANNEL or WEIGHT_BLOCK_128, got {wkey}")
    b_mode = {WEIGHT_PER_TENSOR: "tensor", WEIGHT_PER_CHANNEL: "channel", WEIGHT_BLOCK_128: "block"}[wkey]
    if (a_mode == "group128") != (b_mode == "block"):
        raise QuantLayoutError("1x128-group activations go with 128x128-block weight scales (DeepSeek style) "
                               f"and only with them; got activation {input_quant_key} and weight scale "
                               f"{tuple(jnp.shape(weight_scale))}")
    if bias is not None and tuple(jnp.shape(bias)) != (n,):
        raise QuantLayoutError(f"bias must have shape ({n},), got {tuple(jnp.shape(bias))}")
    if backend not in ("auto", "mosaic", "triton"):
        raise ValueError(f"backend must be 'auto', 'mosaic' or 'triton', got {backend!r}")
    interpret = producers._default_interpret() if interpret is None else interpret
    m = int(np.prod(qa.orig_shape[:-1], dtype=np.int64))
    out_dtype = jnp.dtype(qa.orig_dtype if out_dtype is None else out_dtype)
    a2 = qa.data.reshape(m, k)
    sa = jnp.asarray(qa.scale, F32).reshape(-1)
    sb = jnp.asarray(weight_scale, F32).reshape(-1)
    bias = None if bias is None else jnp.asarray(bias)

    mosaic_types = (mosaic_gemm.MosaicConfig, mosaic_gemm.DecodeConfig, mosaic_block_gemm.MosaicBlockConfig)
    if config is None and m <= 64:  # the main kernel above MOSAIC_DECODE_MAX_M where it fits (N % 32 == 0 ...)
        decode = m <= MOSAIC_DECODE_MAX_M or not mosaic_gemm.supports(m, n, k, out_dtype)
    else:
        decode = isinstance(config, mosaic_gemm.DecodeConfig)
    if backend == "auto":  # the choice and its measurements: module docstring
        if a_mode == "group128":
            fits = m > 64 and mosaic_block_gemm.supports(m, n, k, out_dtype)
        elif decode:
            fits = m > TRITON_DECODE_MAX_M and mosaic_gemm.decode_supports(m, n, k, out_dtype)
        else:
            fits = mosaic_gemm.supports(m, n, k, out_dtype)
        backend = "mosaic" if not interpret and config is None and _is_hopper() and fits else "triton"
    if backend == "mosaic":
        if isinstance(config, MatmulConfig):
            raise TypeError("a MatmulConfig is the Triton kernel's; backend='mosaic' takes a MosaicConfig, "
                            "a DecodeConfig or a MosaicBlockConfig")
        if a_mode == "group128":
            if config is not None and not isinstance(config, mosaic_block_gemm.MosaicBlockConfig):
                raise TypeError("block-scaled operands on backend='mosaic' take a MosaicBlockConfig")
            out = mosaic_block_gemm.scaled_mm_block(a2, weight, sa.reshape(m, -1), sb.reshape(cdiv(n, 128), -1),
                                                    bias, out_dtype, config)
        elif decode:
            out = mosaic_gemm.scaled_mm_decode(a2, weight, sa, sb, bias, out_dtype, config)
        else:
            out = mosaic_gemm.scaled_mm(a2, weight, sa, sb, bias, out_dtype, config)
        return out.reshape(*qa.orig_shape[:-1], n)
    if isinstance(config, mosaic_types):
        raise TypeError(f"a {type(config).__name__} needs backend='mosaic'")

    cfg = config or heuristic_config(m, n, k, a_mode == "group128")
    if a_mode == "group128" and cfg.block_k != 128:
        raise ValueError("block-scaled GEMM needs block_k == 128 (one scale block per K step)")
    split = cfg.split_k
    inputs = [a2, weight, sa, sb] + ([bias] if bias is not None and split == 1 else [])
    out = pl.pallas_call(
        functools.partial(_kernel, m=m, n=n, k=k, a_mode=a_mode, b_mode=b_mode,
                          has_bias=bias is not None and split == 1, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((split, m, n) if split > 1 else (m, n), F32 if split > 1 else out_dtype),
        grid=(cdiv(m, cfg.block_m), cdiv(n, cfg.block_n)) + ((split,) if split > 1 else ()),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name="quantact_scaled_mm",
    )(*inputs)
    if split > 1:
        acc = out[0]
        for i in range(1, split):  # a fixed summation order: the result does not depend on XLA's reduce
            acc = acc + out[i]
        out = _epilogue(acc, sa, sb, bias, a_mode, b_mode, out_dtype)
    return out.reshape(*qa.orig_shape[:-1], n)


__all__ = ["DECODE_CONFIGS", "WEIGHT_BLOCK_128", "WEIGHT_PER_CHANNEL", "WEIGHT_PER_TENSOR", "MatmulConfig",
           "heuristic_config", "scaled_mm", "weight_key_for"]
