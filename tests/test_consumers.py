"""Pallas scaled_mm consumer vs the reference consumers (jnp and torch).

Tolerance: the kernel accumulates fp8 x fp8 products in f32 in its own K order (per tile,
per 128-block), the references in XLA's / torch's matmul order; the f32 sums differ in the
last bits, which can move a bf16/fp16 output by one ulp. Relative error is checked against
1e-3 of the output's scale (the issue's bound for fp8 GEMMs) and most outputs must be exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import torch

from interop.bridge import to_torch
from interop.errors import QuantKeyMismatchError, QuantLayoutError
from interop.keys import kFp8Dynamic128Sym, kFp8DynamicTensorSym, kFp8DynamicTokenSym, kFp8StaticTensorSym
from quantact_jax import consumers as C
from quantact_jax import producers as P
from quantact_jax import reference as R
from quantact_torch import reference as TR

CPU = jax.devices("cpu")[0]


def _weight(rng, n, k, mode):
    wf = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if mode == "tensor":
        ws, wk = np.array([np.abs(wf).max() / 448], np.float32), C.WEIGHT_PER_TENSOR
    elif mode == "channel":
        ws, wk = (np.abs(wf).max(1, keepdims=True) / 448).astype(np.float32), C.WEIGHT_PER_CHANNEL
    else:
        nb, kb = -(-n // 128), -(-k // 128)
        ws = (np.abs(wf).max() / 448 * rng.uniform(0.8, 1.2, (nb, kb))).astype(np.float32)
        wk = C.WEIGHT_BLOCK_128
    with jax.default_device(CPU):
        wq = R.quantize(jnp.asarray(wf), wk, scale=ws).data
    return np.asarray(wq), ws, wk


CASES = [(kFp8DynamicTokenSym, "channel"), (kFp8DynamicTokenSym, "tensor"), (kFp8DynamicTensorSym, "tensor"),
         (kFp8DynamicTensorSym, "channel"), (kFp8Dynamic128Sym, "block")]


def _expand_scales(s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A per-tensor, per-row, 1x128-group ``[rows, cols/128]`` or 128x128-block scale as a
    broadcastable per-element scale of a ``[rows, cols]`` operand."""
    if s.size == 1 or s.size == rows:
        return s.reshape(-1, 1)
    rb = 1 if s.shape[0] == rows else 128
    return np.repeat(np.repeat(s, rb, axis=0), 128, axis=1)[:rows, :cols]


def _check(got, qa, wq, ws, wk, b, out_dtype, fast_accum: bool = False):
    """``got`` against the jnp and the torch reference consumers (module docstring's tolerance).

    ``fast_accum``: the kernel accumulates in the Hopper tensor core's fp8 accumulator over the
    whole K (the Mosaic GEMM; cuBLASLt's ``use_fast_accum=True``), which keeps about 14 mantissa
    bits (DeepSeek-V3 report, section 3.3.2). Each of the K/32 wgmma accumulation steps then
    loses at most 2^-13 of the running magnitude, bounded by sum_k |a_k b_k|: the elementwise
    bound gets (K/32) * 2^-13 * |a|.|b| on top of the output ulp. The issue's norm-wise 1e-3 holds
    either way.
    """
    got = np.asarray(got, np.float32)
    slack = 0.0
    if fast_accum:  # (the per-128-K promotion of the block-scaled kernel only tightens this)
        k = qa.orig_shape[-1]
        a = np.asarray(qa.data, np.float32).reshape(-1, k)
        a_abs = np.abs(a) * _expand_scales(np.asarray(qa.scale, np.float32), *a.shape)
        b_abs = np.abs(np.asarray(wq, np.float32)) * _expand_scales(np.asarray(ws, np.float32), *wq.shape)
        slack = (k / 32) * 2.0 ** -13 * (a_abs @ b_abs.T)
    with jax.default_device(CPU):
        qa_cpu = jax.device_put(qa, CPU)
        want = np.asarray(R.scaled_mm(qa_cpu, jnp.asarray(wq), jnp.asarray(ws), wk, bias=b, out_dtype=out_dtype),
                          np.float32)
        tqa = to_torch(qa_cpu)
    twant = TR.scaled_mm(tqa, torch.from_dlpack(np.ascontiguousarray(np.asarray(wq).view(np.uint8))).view(
        torch.float8_e4m3fn), torch.from_numpy(ws), wk, bias=None if b is None else torch.from_numpy(np.asarray(b)),
        out_dtype={None: None, jnp.float16: torch.float16, jnp.float32: torch.float32}[out_dtype]).float().numpy()
    scale = np.abs(want).max()
    ulp = 2.0 ** -{None: 7, jnp.float16: 10, jnp.float32: 23}[out_dtype]  # relative spacing of bf16 / fp16 / f32
    # fast accumulation moves the f32 sums by ~2^-14 relative, which flips the rounding of a few
    # percent of bf16/fp16 outputs by one ulp: the norm-wise error of the rounded outputs then
    # reaches ~1.1e-3; the 1e-3 bound is checked on the f32 outputs (out_dtype=float32).
    norm_tol = 2e-3 if fast_accum and np.dtype(out_dtype or jnp.bfloat16).itemsize == 2 else 1e-3
    for ref in (want, twant):
        # one output ulp: the f32 sums agree to a few f32 ulps, so the rounded outputs to one step
        assert (np.abs(got - ref) <= np.maximum(np.abs(ref), np.abs(got)) * ulp + 1e-5 * scale + slack).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < norm_tol
        if not fast_accum:  # with fast accumulation, fp16's finer ulp flips up to ~half the outputs
            assert (got == ref).mean() > 0.9
    assert got.shape == want.shape


def _problem(m, n, k, akey, wmode, bias):
    rng = np.random.default_rng(m * 1000 + n + k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wq, ws, wk = _weight(rng, n, k, wmode)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
    return P.quantize(x, akey), wq, ws, wk, b


@pytest.mark.parametrize("out_dtype", [None, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("akey,wmode", CASES, ids=[f"{a.scale.group_shape}-{w}" for a, w in CASES])
@pytest.mark.parametrize("m,n,k", [(5, 70, 256), (130, 200, 384), (1, 64, 128)], ids=str)
def test_scaled_mm_matches_references(m, n, k, akey, wmode, bias, out_dtype):
    qa, wq, ws, wk, b = _problem(m, n, k, akey, wmode, bias)
    _check(C.scaled_mm(qa, wq, ws, bias=b, out_dtype=out_dtype, input_quant_key=akey), qa, wq, ws, wk, b, out_dtype)


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("akey,wmode", [CASES[0], CASES[2], CASES[4]], ids=["token", "tensor", "block"])
def test_split_k_decode_path(akey, wmode, split):
    # 5 K steps of 128 over 2-4 slices: uneven slices, and with split 4 an empty last slice
    qa, wq, ws, wk, b = _problem(5, 70, 640, akey, wmode, True)
    cfg = C.MatmulConfig(16, 64, 128, num_warps=4, num_stages=3, split_k=split)
    _check(C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey, config=cfg, backend="triton"), qa, wq, ws, wk, b,
           None)


def test_decode_heuristic_splits_k_and_autoselects_triton():
    cfg = C.heuristic_config(16, 8192, 8192, False)
    assert cfg.split_k > 1 and cfg.block_m == 16
    assert C.heuristic_config(4096, 4096, 4096, False).split_k == 1


HOPPER = jax.default_backend() == "gpu" and C._is_hopper()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic GEMM needs a Hopper GPU")
@pytest.mark.parametrize("out_dtype", [None, jnp.float16, jnp.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("akey,wmode", CASES[:4], ids=[f"{a.scale.group_shape}-{w}" for a, w in CASES[:4]])
@pytest.mark.parametrize("m,n,k", [(304, 640, 384), (300, 512, 320), (256, 512, 256), (1031, 1536, 1024)], ids=str)
def test_mosaic_matches_references(m, n, k, akey, wmode, bias, out_dtype):
    # tiles 128 x 256 x 128: partial M and N tiles, K=320 takes the K-step-64 config, M=300/1031 the row padding
    qa, wq, ws, wk, b = _problem(m, n, k, akey, wmode, bias)
    assert C.mosaic_gemm.supports(m, n, k, jnp.bfloat16)
    got = C.scaled_mm(qa, wq, ws, bias=b, out_dtype=out_dtype, input_quant_key=akey, backend="mosaic")
    _check(got, qa, wq, ws, wk, b, out_dtype, fast_accum=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic decode GEMM needs a Hopper GPU")
@pytest.mark.parametrize("out_dtype", [None, jnp.float16, jnp.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("akey,wmode", CASES[:4], ids=[f"{a.scale.group_shape}-{w}" for a, w in CASES[:4]])
@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 1032, 768, None), (5, 520, 1024, None), (16, 4104, 512, None), (33, 1024, 2048, None), (64, 776, 1280, None),
    (7, 1040, 1024, C.mosaic_gemm.DecodeConfig(split_k=4)), (24, 1024, 512, C.mosaic_gemm.DecodeConfig(num_wgs=2)),
    (40, 1096, 768, C.mosaic_gemm.DecodeConfig(tile_n=128, stages=4)),
    (9, 512, 1024, C.mosaic_gemm.DecodeConfig(tile_k=256, stages=4, split_k=2)),
    (1, 1032, 768, C.mosaic_gemm.DecodeConfig(promote=True)),
    (5, 520, 1024, C.mosaic_gemm.DecodeConfig(promote=True, tile_k=64, stages=12, split_k=2)),
    (48, 1040, 512, C.mosaic_gemm.DecodeConfig(promote=True, tile_k=64, stages=8, num_wgs=2)),
    (13, 1024, 768, C.mosaic_gemm.DecodeConfig(promote=True, tile_k=256, stages=3))], ids=str)
def test_mosaic_decode_matches_references(m, n, k, cfg, akey, wmode, bias, out_dtype):
    # swap-AB: N (the wgmma M side) not a multiple of the 64/128-row tiles, M padded to 16, split K
    qa, wq, ws, wk, b = _problem(m, n, k, akey, wmode, bias)
    assert C.mosaic_gemm.decode_supports(m, n, k, jnp.bfloat16, cfg)
    got = C.scaled_mm(qa, wq, ws, bias=b, out_dtype=out_dtype, input_quant_key=akey, backend="mosaic", config=cfg)
    _check(got, qa, wq, ws, wk, b, out_dtype, fast_accum=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic decode GEMM needs a Hopper GPU")
@pytest.mark.parametrize("m,want", [(5, "triton"), (8, "triton"), (9, "mosaic"), (64, "mosaic")], ids=str)
def test_decode_auto_dispatch(m, want):
    # auto: M <= 8 on split-K Triton, 8 < M <= 64 on the Mosaic decode kernel (promoted accumulation)
    akey, wmode = CASES[1]
    qa, wq, ws, wk, b = _problem(m, 1024, 1024, akey, wmode, True)
    got = C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey)
    ref = C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey, backend=want)
    assert (np.asarray(got, np.float32) == np.asarray(ref, np.float32)).all()
    _check(got, qa, wq, ws, wk, b, None, fast_accum=want == "mosaic")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic block GEMM needs a Hopper GPU")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,n,k", [(300, 640, 384), (1031, 1536, 1024)], ids=str)
def test_block_scaled_auto_dispatches_to_mosaic(m, n, k, bias):
    # the consumer's reshaping of the 1x128 / 128x128 scales for mosaic_block_gemm (its own tests cover the kernel)
    akey, wmode = CASES[4]
    qa, wq, ws, wk, b = _problem(m, n, k, akey, wmode, bias)
    assert C.mosaic_block_gemm.supports(m, n, k, jnp.bfloat16)
    got = C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey)
    assert (np.asarray(got, np.float32) == np.asarray(C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey,
                                                                  backend="mosaic"), np.float32)).all()
    _check(got, qa, wq, ws, wk, b, None, fast_accum=True)


def test_plain_array_is_quantized_with_the_key_and_matches_prequantized():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)  # leading dims kept
    wq, ws, _ = _weight(rng, 96, 256, "channel")
    a = C.scaled_mm(x, wq, ws, input_quant_key=kFp8DynamicTokenSym)
    b = C.scaled_mm(P.quantize(x, kFp8DynamicTokenSym), wq, ws, input_quant_key=kFp8DynamicTokenSym)
    assert a.shape == (2, 3, 96) and a.dtype == jnp.bfloat16
    assert (np.asarray(a, np.float32) == np.asarray(b, np.float32)).all()
    s = C.scaled_mm(x, wq, ws, input_quant_key=kFp8StaticTensorSym, input_scale=np.float32(0.01))
    assert s.shape == (2, 3, 96)


def test_key_mismatch_fails_loudly():
    x = jnp.ones((4, 256), jnp.bfloat16)
    wq, ws, _ = _weight(np.random.default_rng(2), 64, 256, "channel")
    with pytest.raises(QuantKeyMismatchError, match="expects"):
        C.scaled_mm(P.quantize(x, kFp8DynamicTensorSym), wq, ws, input_quant_key=kFp8DynamicTokenSym)


@pytest.mark.parametrize("call,match", [
    (lambda x, w, s: C.scaled_mm(x, w, np.ones((3, 3), np.float32), input_quant_key=kFp8DynamicTokenSym),
     "fits no weight scheme"),
    (lambda x, w, s: C.scaled_mm(x, w.astype(jnp.bfloat16), s, input_quant_key=kFp8DynamicTokenSym), "float8"),
    (lambda x, w, s: C.scaled_mm(x[:, :128], w, s, input_quant_key=kFp8DynamicTokenSym), "does not match"),
    (lambda x, w, s: C.scaled_mm(x, w, s, input_quant_key=kFp8Dynamic128Sym), "go with 128x128"),
    (lambda x, w, s: C.scaled_mm(x, w, s, bias=jnp.ones(3), input_quant_key=kFp8DynamicTokenSym), "bias"),
], ids=["scale-shape", "weight-dtype", "k-mismatch", "group-without-blocks", "bias-shape"])
def test_bad_input(call, match):
    x = jnp.ones((4, 256), jnp.bfloat16)
    wq, ws, _ = _weight(np.random.default_rng(3), 64, 256, "channel")
    with pytest.raises(QuantLayoutError, match=match):
        call(x, jnp.asarray(wq), ws)
