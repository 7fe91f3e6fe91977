"""The dequantising NVFP4 / MX GEMM (quantact_jax.dequant_gemm) vs the jnp and torch reference consumers.

Tolerance (module docstring of quantact_jax.dequant_gemm): the kernel's products of decoded operands
are exact (<= 6 significant bits each, exact in bf16, their products exact in f32), so it differs from
the references only in the f32 summation order and, for NVFP4, in where ``1/gs`` is rounded (a few f32
ulps per product). Per output: ``|got - ref| <= ulp_out * max(|got|, |ref|) + 2 K u sum_k |a_k w_k|``
with ``u = 2**-24`` (two recursive f32 sums of K terms; round-to-nearest), ``2**-23`` on a GPU (tensor
cores may truncate while accumulating). Measured against ``sum |a w|`` rather than ``|y|`` so that an
output that cancels does not fail on a one-ulp difference; a code one e2m1 / e4m3 step off moves an
output by ~``sum |a w| / (8 K)``, far above the bound (``test_bound_detects_one_code_step``). For
16-bit outputs most values must also be bit-identical to the references.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from interop.bridge import to_torch
from interop.errors import QuantKeyMismatchError, QuantLayoutError
from interop.keys import (
    ScaleLayout,
    kMxfp4Dynamic,
    kMxfp8Dynamic,
    kNvfp4Dynamic,
)
from interop.weights import WEIGHT_MXFP4, WEIGHT_MXFP8, WEIGHT_NVFP4
from quantact_jax import consumers as C
from quantact_jax import dequant_gemm as D
from quantact_jax import producers as P
from quantact_jax import reference as R
from quantact_jax.layers import QuantLinear
from quantact_torch import reference as TR

CPU = jax.devices("cpu")[0]
ON_GPU = jax.default_backend() == "gpu"
ROW = ScaleLayout.ROW_MAJOR
WEIGHT_KEYS = {"nvfp4": WEIGHT_NVFP4, "mxfp8": WEIGHT_MXFP8, "mxfp4": WEIGHT_MXFP4}
ACT_KEYS = {"nvfp4": kNvfp4Dynamic, "nvfp4-rowmajor": kNvfp4Dynamic.with_layout(ROW), "mxfp8": kMxfp8Dynamic,
            "mxfp4": kMxfp4Dynamic}
#: small tiles, so the CPU shapes below span several partial tiles in M, N and K
SMALL = D.DequantGemmConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
ULP = {jnp.dtype(jnp.bfloat16): 2.0 ** -7, jnp.dtype(jnp.float16): 2.0 ** -10, jnp.dtype(jnp.float32): 2.0 ** -23}
TORCH_DT = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float16): torch.float16,
            jnp.dtype(jnp.float32): torch.float32}


def _fmt(name: str) -> str:
    return name.split("-")[0]


def _amax_gs(v) -> np.float32:
    return np.float32(448.0 * 6.0 / np.abs(np.asarray(v, np.float32)).max())


@functools.cache  # eager NVFP4 reference quantization costs seconds on CPU
def _problem(lead, n, k, act, bias, seed=0):
    """Random activation (quantized by the jnp reference: the same bits as the Pallas producer),
    weight quantized with the format's weight key, optional bias; NVFP4 global scales from amax."""
    rng = np.random.default_rng(seed)
    key, fmt = ACT_KEYS[act], _fmt(act)
    with jax.default_device(CPU):
        x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
        wf = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
        gs = {}
        if fmt == "nvfp4":
            gs = {"input_global_scale": _amax_gs(x), "weight_global_scale": _amax_gs(wf)}
        wkey = WEIGHT_KEYS[fmt]
        dyn = {"nvfp4": kNvfp4Dynamic, "mxfp8": kMxfp8Dynamic, "mxfp4": kMxfp4Dynamic}[fmt].with_layout(ROW)
        w = R.quantize(wf, dyn, global_scale=gs.get("weight_global_scale"))  # same storage as the weight key
        qa = R.quantize(x, key, global_scale=gs.get("input_global_scale"))
        b = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
    return x, qa, w.data, w.scale, wkey, b, gs


def _abs_products(qa, wq, ws, wkey, gs) -> np.ndarray:
    """``sum_k |a_k w_k|`` of the dequantised operands, ``[M, N]``."""
    with jax.default_device(CPU):
        k = qa.orig_shape[-1]
        a = R.dequantize_codes(qa.data, qa.scale, qa.quant_key, qa.orig_shape, gs.get("input_global_scale"))
        w = R.dequantize_codes(wq, ws, wkey, (wq.shape[0], k), gs.get("weight_global_scale"))
    return np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(w, np.float64)).T


def _references(qa, wq, ws, wkey, b, gs, out_dtype):
    with jax.default_device(CPU):
        qa_cpu = jax.device_put(qa, CPU)
        want = R.scaled_mm(qa_cpu, jnp.asarray(wq), jnp.asarray(ws), wkey, bias=b, out_dtype=out_dtype,
                           global_scale_a=gs.get("input_global_scale"), global_scale_w=gs.get("weight_global_scale"))
        tqa = to_torch(qa_cpu)
    wq_np, ws_np = np.asarray(jax.device_get(wq)), np.asarray(jax.device_get(ws))
    tw = torch.from_numpy(wq_np.view(np.uint8).copy())
    if wq_np.dtype != np.uint8:
        tw = tw.view(torch.float8_e4m3fn)
    tws = torch.from_numpy(ws_np.view(np.uint8).copy())
    if wkey.format.value == "nvfp4":
        tws = tws.view(torch.float8_e4m3fn)  # e8m0 scales go as their bytes
    tgs = {k: torch.tensor(float(v)) for k, v in gs.items()}
    twant = TR.scaled_mm(tqa, tw, tws, wkey, bias=None if b is None else torch.from_numpy(np.array(b)),
                         out_dtype=TORCH_DT[jnp.dtype(out_dtype)], global_scale_a=tgs.get("input_global_scale"),
                         global_scale_w=tgs.get("weight_global_scale"))
    return np.asarray(want, np.float32), twant.float().numpy()


def _within_bound(got, ref, abs_prod, k, out_dtype, u) -> np.ndarray:
    return np.abs(got - ref) <= np.maximum(np.abs(got), np.abs(ref)) * ULP[jnp.dtype(out_dtype)] + \
        2 * k * u * abs_prod.reshape(got.shape)


def _check(got, qa, wq, ws, wkey, b, gs, out_dtype):
    """``got`` against both references (module docstring's bound); returns nothing, asserts."""
    out_dtype = jnp.dtype(out_dtype)
    got = np.asarray(jax.device_get(got))
    assert got.dtype == out_dtype
    got = got.astype(np.float32)
    assert np.isfinite(got).all()
    k = qa.orig_shape[-1]
    abs_prod = _abs_products(qa, wq, ws, wkey, gs)
    u = 2.0 ** -23 if ON_GPU else 2.0 ** -24
    for ref in _references(qa, wq, ws, wkey, b, gs, out_dtype):
        assert got.shape == ref.shape
        ok = _within_bound(got, ref, abs_prod, k, out_dtype, u)
        assert ok.all(), (f"{(~ok).sum()} outputs out of bound; worst |err| {np.abs(got - ref).max():.3g}")
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
        if out_dtype.itemsize == 2:  # the f32 sums agree to a few ulps: rounded outputs mostly identical
            assert (got == ref).mean() > 0.9


# ------------------------------------------------------------------ CPU (interpret mode)
CASES = [("nvfp4", False, jnp.bfloat16), ("nvfp4", True, jnp.float16), ("nvfp4", True, jnp.float32),
         ("nvfp4-rowmajor", True, jnp.bfloat16), ("mxfp8", False, jnp.bfloat16), ("mxfp8", True, jnp.float16),
         ("mxfp8", True, jnp.float32), ("mxfp4", True, jnp.bfloat16)]


@pytest.mark.parametrize("act,bias,out_dtype", CASES,
                         ids=[f"{a}-{'bias' if b else 'nobias'}-{jnp.dtype(d).name}" for a, b, d in CASES])
def test_matches_references(act, bias, out_dtype):
    # M=37, N=70, K=160: partial tiles in every dimension (K: 2.5 steps of 64); poisoned output
    _, qa, wq, ws, wkey, b, gs = _problem((37,), 70, 160, act, bias)
    got = D.scaled_mm(qa, wq, ws, input_quant_key=ACT_KEYS[act], bias=b, out_dtype=out_dtype, config=SMALL,
                      _poison=True, **gs)
    _check(got, qa, wq, ws, wkey, b, gs, out_dtype)


@pytest.mark.parametrize("act", ["nvfp4", "mxfp8"])
def test_split_k_and_leading_dims(act):
    # 5 K steps over 3 slices (uneven), leading dims kept, default out dtype (the activation's bf16)
    _, qa, wq, ws, wkey, b, gs = _problem((2, 3), 40, 320, act, True, seed=1)
    cfg = D.DequantGemmConfig(16, 32, 64, num_warps=4, num_stages=2, split_k=3)
    got = D.scaled_mm(qa, wq, ws, input_quant_key=ACT_KEYS[act], bias=b, config=cfg, _poison=True, **gs)
    assert got.shape == (2, 3, 40)
    _check(got, qa, wq, ws, wkey, b, gs, jnp.bfloat16)


def test_bound_detects_one_code_step():
    """The check can fail: one weight code moved to a neighbouring e2m1 value (1 <-> 1.5) breaks it."""
    _, qa, wq, ws, wkey, _, gs = _problem((37,), 70, 160, "nvfp4", False)
    good = np.asarray(R.scaled_mm(qa, wq, ws, wkey, out_dtype=jnp.float32, global_scale_a=gs["input_global_scale"],
                                  global_scale_w=gs["weight_global_scale"]))
    bad_w = np.asarray(wq).copy()
    bad_w[3, 5] = (bad_w[3, 5] & 0xF0) | 0x3  # low nibble: code 3 (1.5)
    if (np.asarray(wq)[3, 5] & 0xF) == 0x3:
        bad_w[3, 5] = (bad_w[3, 5] & 0xF0) | 0x2
    bad = np.asarray(R.scaled_mm(qa, jnp.asarray(bad_w), ws, wkey, out_dtype=jnp.float32,
                                 global_scale_a=gs["input_global_scale"], global_scale_w=gs["weight_global_scale"]))
    abs_prod = _abs_products(qa, wq, ws, wkey, gs)
    assert _within_bound(good, good, abs_prod, 160, jnp.float32, 2.0 ** -23).all()
    assert not _within_bound(bad, good, abs_prod, 160, jnp.float32, 2.0 ** -23).all()


def test_consumer_dispatch_and_plain_input():
    """consumers.scaled_mm routes NVFP4 keys here; a plain array is quantized by the Pallas producer
    with the input global scale and gives the same bits as the pre-quantized activation."""
    x, qa, wq, ws, wkey, b, gs = _problem((2, 5), 48, 96, "nvfp4", True, seed=2)
    pre = C.scaled_mm(P.quantize(x, kNvfp4Dynamic, global_scale=gs["input_global_scale"]), wq, ws, bias=b,
                      input_quant_key=kNvfp4Dynamic, **gs)
    plain = C.scaled_mm(x, wq, ws, bias=b, input_quant_key=kNvfp4Dynamic, **gs)
    assert plain.shape == (2, 5, 48) and plain.dtype == jnp.bfloat16
    assert (np.asarray(pre, np.float32) == np.asarray(plain, np.float32)).all()
    _check(plain, qa, wq, ws, wkey, b, gs, jnp.bfloat16)


def test_quant_linear_mx_pallas_backend():
    """An MXFP8 QuantLinear (raw constructor: the loader takes fp8 / NVFP4 dicts) runs this kernel as
    its 'pallas' backend, under jit, and agrees with its 'reference' backend."""
    x, qa, wq, ws, wkey, b, _ = _problem((6,), 64, 128, "mxfp8", True, seed=3)
    layer = QuantLinear(weight=wq, weight_scale=ws, bias=b, input_scale=None, weight_global_scale=None,
                        input_global_scale=None, input_key=kMxfp8Dynamic, weight_key=WEIGHT_MXFP8)
    call = jax.jit(lambda layer, a: layer(a))
    got = call(layer, x)
    assert (np.asarray(got, np.float32) == np.asarray(call(layer, qa), np.float32)).all()
    _check(got, qa, wq, ws, wkey, b, {}, jnp.bfloat16)
    with pytest.raises(QuantLayoutError, match="XLA fp8 dot"):
        layer.with_backend("xla")


def test_key_mismatch_fails_loudly():
    x, qa, wq, ws, _, _, gs = _problem((4,), 32, 64, "nvfp4", False)
    with pytest.raises(QuantKeyMismatchError, match="expects"):  # swizzled activation, row-major consumer
        D.scaled_mm(qa, wq, ws, input_quant_key=kNvfp4Dynamic.with_layout(ROW), **gs)
    with pytest.raises(QuantKeyMismatchError):  # through the consumer dispatch too, and at trace time
        jax.jit(lambda a: C.scaled_mm(a, wq, ws, input_quant_key=kNvfp4Dynamic.with_layout(ROW), **gs))(qa)
    mx = R.quantize(x, kMxfp4Dynamic)
    with pytest.raises(QuantKeyMismatchError):  # an MXFP4 activation to an NVFP4 consumer
        C.scaled_mm(mx, wq, ws, input_quant_key=kNvfp4Dynamic, **gs)


def _nv():
    _, qa, wq, ws, _, _, gs = _problem((4,), 32, 64, "nvfp4", False)
    return qa, wq, ws, gs


def _mx():
    _, qa, wq, ws, _, _, _ = _problem((4,), 32, 64, "mxfp8", False)
    return qa, wq, ws


def _nv_call(qa, wq, ws, gs, **kw):
    return D.scaled_mm(qa, wq, ws, **{"input_quant_key": kNvfp4Dynamic, **gs, **kw})


BAD = {
    "weight-dtype": (lambda qa, wq, ws, gs: _nv_call(qa, _mx()[1], ws, gs), r"uint8"),
    "weight-rank": (lambda qa, wq, ws, gs: _nv_call(qa, wq.reshape(-1), ws, gs), r"\[N, K/2\]"),
    "scale-shape": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws[:, :2], gs), r"weight_scale is \(32, 2\)"),
    "scale-dtype": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws.astype(jnp.float32), gs), "float8_e4m3fn"),
    "k-mismatch": (lambda qa, wq, ws, gs: _nv_call(qa, wq[:, :16], ws[:, :2], gs), "does not match"),
    "k-not-group": (lambda qa, wq, ws, gs: _nv_call(qa, wq[:, :4], ws[:, :1], gs), "multiple of the group"),
    "no-weight-gs": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws, {"input_global_scale": gs["input_global_scale"]}),
                     "weight_global_scale"),
    "bias-shape": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws, gs, bias=jnp.ones(3)), r"bias must have shape \(32,\)"),
    "weight-key": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws, gs, weight_key=WEIGHT_MXFP4), "does not pair"),
    "mx-global": (lambda *_: D.scaled_mm(*_mx(), input_quant_key=kMxfp8Dynamic, weight_global_scale=1.0),
                  "no global scales"),
    "act-layout": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws, gs, input_quant_key=kNvfp4Dynamic.with_layout("col_major")),
                   "row-major or swizzled"),
    "out-dtype": (lambda qa, wq, ws, gs: _nv_call(qa, wq, ws, gs, out_dtype=jnp.int8), "out_dtype"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_error(name):
    call, match = BAD[name]
    with pytest.raises(QuantLayoutError, match=match):
        call(*_nv())


def test_backend_and_config_checks():
    _, qa, wq, ws, _, _, gs = _problem((4,), 32, 64, "nvfp4", False)
    with pytest.raises(ValueError, match="Triton kernel only"):
        C.scaled_mm(qa, wq, ws, input_quant_key=kNvfp4Dynamic, backend="mosaic", **gs)
    with pytest.raises(TypeError, match="DequantGemmConfig"):
        C.scaled_mm(qa, wq, ws, input_quant_key=kNvfp4Dynamic, config=C.MatmulConfig(), **gs)
    with pytest.raises(ValueError, match="power of two"):
        D.DequantGemmConfig(block_k=16)
    assert D.heuristic_config(16, 8192, 8192, kNvfp4Dynamic.format).split_k > 1
    assert D.heuristic_config(4096, 4096, 4096, kMxfp8Dynamic.format).split_k == 1


def test_e2m1_decode_matches_reference():
    codes = jnp.arange(16, dtype=jnp.uint8)
    got = np.asarray(D.e2m1_to_f32(codes)).view(np.uint32)
    assert (got == np.asarray(R.e2m1_decode(codes)).view(np.uint32)).all()  # -0.0 included


# ------------------------------------------------------------------ GPU (realistic shapes)
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [256, 16], ids=["m256", "m16-splitk"])
@pytest.mark.parametrize("act", ["nvfp4", "mxfp8"])
def test_gpu_realistic_shape(act, m):
    """256 x 4096 x 4096 (prefill tile path) and 16 x 4096 x 4096 (split-K decode path), compiled."""
    _, qa, wq, ws, wkey, b, gs = _problem((m,), 4096, 4096, act, True, seed=4)
    dev = jax.devices()[0]
    qa_d, wq_d, ws_d, b_d = jax.device_put((qa, wq, ws, b), dev)
    fn = jax.jit(lambda a, w, s, bb: D.scaled_mm(a, w, s, input_quant_key=ACT_KEYS[act], bias=bb, _poison=True, **gs))
    got = jax.block_until_ready(fn(qa_d, wq_d, ws_d, b_d))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(qa_d, wq_d, ws_d, b_d))
    print(f"{act} {m}x4096x4096: {(time.perf_counter() - t0) * 1e3:.3f} ms")
    _check(got, qa, wq, ws, wkey, b, gs, jnp.bfloat16)
