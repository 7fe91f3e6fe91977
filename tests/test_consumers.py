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


@pytest.mark.parametrize("out_dtype", [None, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("akey,wmode", CASES, ids=[f"{a.scale.group_shape}-{w}" for a, w in CASES])
@pytest.mark.parametrize("m,n,k", [(5, 70, 256), (130, 200, 384), (1, 64, 128)], ids=str)
def test_scaled_mm_matches_references(m, n, k, akey, wmode, bias, out_dtype):
    rng = np.random.default_rng(m * 1000 + n + k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wq, ws, wk = _weight(rng, n, k, wmode)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
    qa = P.quantize(x, akey)
    got = np.asarray(C.scaled_mm(qa, wq, ws, bias=b, out_dtype=out_dtype, input_quant_key=akey), np.float32)
    with jax.default_device(CPU):
        qa_cpu = jax.device_put(qa, CPU)
        want = np.asarray(R.scaled_mm(qa_cpu, jnp.asarray(wq), jnp.asarray(ws), wk, bias=b, out_dtype=out_dtype),
                          np.float32)
        tqa = to_torch(qa_cpu)
    twant = TR.scaled_mm(tqa, torch.from_dlpack(np.ascontiguousarray(np.asarray(wq).view(np.uint8))).view(
        torch.float8_e4m3fn), torch.from_numpy(ws), wk, bias=None if b is None else torch.from_numpy(np.asarray(b)),
        out_dtype=None if out_dtype is None else torch.float16).float().numpy()
    scale = np.abs(want).max()
    ulp = 2.0 ** -(7 if out_dtype is None else 10)  # relative spacing of bf16 / fp16
    for ref in (want, twant):
        # one output ulp: the f32 sums agree to a few f32 ulps, so the rounded outputs to one step
        assert (np.abs(got - ref) <= np.maximum(np.abs(ref), np.abs(got)) * ulp + 1e-5 * scale).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
        assert (got == ref).mean() > 0.9
    assert got.shape == (m, n)


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
