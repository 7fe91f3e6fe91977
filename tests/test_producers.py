"""Pallas producers vs the jnp reference, bit for bit, for every op, key and layout.

On a CPU-only machine the kernels run in Pallas interpret mode; on a GPU they are
compiled (Triton) and the reference still runs on the CPU, so these tests check
the hardware kernels against the CPU specification. Outputs are poisoned
(0xA5 bytes) before each kernel, so an element the kernel misses fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from interop.errors import NoInputQuantKeyError, QuantLayoutError
from interop.keys import (ALL_KEYS, InputQuantScales, QuantKey, ScaleDesc, ScaleDirection,
                          kFp8Dynamic128Sym, kFp8DynamicTensorSym, kFp8DynamicTokenSym, kFp8StaticTensorSym,
                          kNvfp4Dynamic)
from interop.layers import expose_input_quant_key
from interop.layout import scale_storage_shape
from quantact_jax import producers as P
from quantact_jax import reference as R

CPU = jax.devices("cpu")[0]
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def _layouts(key: QuantKey) -> list[QuantKey]:
    if key.group_size in (64, 128):
        return [key.with_layout(lay) for lay in ("row_major", "col_major", "col_major_tma", "packed_ue8m0")] + [
            key.with_layout("col_major_tma", ue8m0=True)]
    if key.group_size in (16, 32):
        return [key.with_layout("swizzled_128x4"), key.with_layout("row_major")]
    return [key]


CASES = []
for _name, _key in ALL_KEYS.items():
    for _k in _layouts(_key):
        _lay = "" if _k is _key else f"-{_k.scale.layout}{'-ue8m0' if _k.scale.ue8m0 else ''}"
        for _op in ("quant", "rms", "rms+res", "silu"):
            if _op != "quant" and _key.scale.static and _key.is_fp4 + (_key.format.value == "mxfp8"):
                continue  # static block scales are a plain-quant feature
            CASES.append(pytest.param(_op, _k, id=f"{_op}-{_name}{_lay}"))

# odd M; M crossing the 128-row swizzle tile; one row whose K spans several column chunks (512 wide)
SHAPES = [(3, 256), (130, 64), (1, 1536)]


def _inputs(rng, shape, dtype, key):
    m, k = shape
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 4.0, (m, 1))).astype(np.float32)
    x[0, : min(k, 3)] = [300.0, -300.0, 1e-3][: min(k, 3)]  # large and small magnitudes
    x2 = (rng.standard_normal((m, 2 * k)) * 2).astype(np.float32)
    res = rng.standard_normal(shape).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    return [jnp.asarray(a, dtype) for a in (x, x2, res, w)]


def _kwargs(rng, key, x, m, k):
    kw = {}
    with jax.default_device(CPU):
        if key.is_fp4 and key.format.value == "nvfp4":
            kw["global_scale"] = np.float32(448 * 6 / float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
        if key.scale.static:
            if key.format.value in ("fp8", "int8"):
                kw["scale"] = rng.uniform(0.005, 0.03, scale_storage_shape(key.scale, m, k)).astype(np.float32)
            else:  # static block scales: take the ones a dynamic quantization produces
                dyn = QuantKey(key.dtype, ScaleDesc(key.scale.dtype, False, key.scale.group_shape, key.scale.layout),
                               key.scale2)
                kw["scale"] = np.asarray(R.quantize(jnp.asarray(x), dyn, **kw).scale)
    return kw


def _run(mod, op, key, x, x2, res, w, kw, **extra):
    if op == "quant":
        return mod.quantize(x, key, **kw, **extra), None
    if op == "rms":
        return mod.rms_norm_quant(x, w, key, **kw, **extra)
    if op == "rms+res":
        return mod.rms_norm_quant(x, w, key, residual=res, **kw, **extra)
    return mod.silu_and_mul_quant(x2, key, **kw, **extra), None


def _bytes(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _assert_same(got, want, *, silu_on_gpu: bool):
    (qa, res), (qr, rr) = got, want
    assert qa.quant_key == qr.quant_key and qa.orig_shape == qr.orig_shape
    assert qa.data.shape == qr.data.shape and qa.scale.shape == qr.scale.shape
    gd, wd, gs, ws = _bytes(qa.data), _bytes(qr.data), _bytes(qa.scale), _bytes(qr.scale)
    if silu_on_gpu:
        # libdevice's expf and XLA:CPU's exp round differently in the last bit, so a SiLU value
        # can land one ulp apart and, near a rounding boundary, move a code by one step or a
        # scale by a few ulps. Everything else in the op is exact, so the bound is tight.
        assert (gd != wd).mean() < 0.01, f"{(gd != wd).sum()} of {gd.size} codes differ"
        sg, sw = (np.asarray(v.scale).astype(np.float32) if v.scale.dtype != jnp.int32 else
                  np.asarray(v.scale).view(np.uint8).astype(np.float32) for v in (qa, qr))
        np.testing.assert_allclose(sg, sw, rtol=2.0**-19, atol=0)
        return
    assert (gd == wd).all(), f"{(gd != wd).sum()} of {gd.size} data bytes differ"
    assert (gs == ws).all(), f"{(gs != ws).sum()} of {gs.size} scale bytes differ"
    if rr is not None:
        assert (_bytes(res) == _bytes(rr)).all(), "residual output differs"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("op,key", CASES)
def test_producer_matches_reference(op, key, dtype, shape):
    m, k = shape
    if key.group_size and k % key.group_size:
        pytest.skip("K must be a multiple of the group")
    rng = np.random.default_rng(abs(hash((op, str(key), shape, str(dtype)))) % 2**32)
    x, x2, res, w = _inputs(rng, shape, dtype, key)
    src = x2[:, :k] if op == "silu" else x
    kw = _kwargs(rng, key, src, m, k)
    with jax.default_device(CPU):
        want = _run(R, op, key, *(jax.device_put(a, CPU) for a in (x, x2, res, w)), kw)
    got = _run(P, op, key, x, x2, res, w, kw, _poison=True)
    _assert_same(got, want, silu_on_gpu=(op == "silu" and ON_GPU))


@pytest.mark.parametrize("dtype", [jnp.float16], ids=["f16"])
@pytest.mark.parametrize("key", [kFp8DynamicTokenSym, kFp8Dynamic128Sym, kNvfp4Dynamic, kFp8StaticTensorSym],
                         ids=str)
def test_fp16_and_batch_dims(key, dtype):
    """fp16 input with leading batch dims (2, 3, K) flattened like vLLM."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)) * 3, dtype)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(256), dtype)
    kw = _kwargs(rng, key, x.reshape(6, 256), 6, 256)
    with jax.default_device(CPU):
        want = R.rms_norm_quant(jax.device_put(x, CPU), jax.device_put(w, CPU), key, **kw)
    got = P.rms_norm_quant(x, w, key, **kw, _poison=True)
    assert got[0].orig_shape == (2, 3, 256) and got[0].data.shape[:2] == (2, 3)
    _assert_same(got, want, silu_on_gpu=False)


ROW_CONFIGS = [P.ProducerConfig(block_m=2, num_warps=4),  # whole rows in registers
               P.ProducerConfig(block_m=2, num_warps=4, row_chunk=128),  # one program loops over chunks
               P.ProducerConfig(block_m=1, num_warps=4, row_chunk=128, split=True)]  # a program per chunk


@pytest.mark.parametrize("cfg", ROW_CONFIGS, ids=["whole", "loop", "split"])
@pytest.mark.parametrize("op", ["quant", "silu"])
@pytest.mark.parametrize("key,extra", [(kFp8DynamicTokenSym, {}), (kFp8DynamicTokenSym, {"scale_ub": 3.0}),
                                       (kFp8DynamicTensorSym, {}), (ALL_KEYS["kInt8DynamicTokenSym"], {})],
                         ids=["fp8-token", "fp8-token-ub", "fp8-tensor", "int8-token"])
def test_row_chunk_variants_match_reference(cfg, op, key, extra):
    """Per-row scales computed over column chunks (a loop in one program, or a program per chunk
    and a partial-amax pass) give the reference's bits: 5 rows (odd for block_m=2), 640 = 5 chunks
    of 128, rows with a NaN (their scales stay NaN, also under scale_ub; the others are unaffected)."""
    if op == "silu" and key.format.value == "int8":
        pytest.skip("int8 SiLU is not a vLLM producer key here")
    rng = np.random.default_rng(11)
    x2 = (rng.standard_normal((5, 2 * 640)) * rng.uniform(0.5, 4.0, (5, 1))).astype(np.float32)
    x2[0, 3] = 300.0
    x2[3, 700] = np.nan  # SiLU's up half only
    x2[1, 100] = np.nan  # quant and SiLU's gate
    x = jnp.asarray(x2 if op == "silu" else x2[:, :640], jnp.bfloat16)
    run = P.quantize if op == "quant" else P.silu_and_mul_quant
    got = run(x, key, config=cfg, **extra, _poison=True)
    with jax.default_device(CPU):
        want = (R.quantize if op == "quant" else R.silu_and_mul_quant)(jax.device_put(x, CPU), key, **extra)
    _assert_same((got, None), (want, None), silu_on_gpu=(op == "silu" and ON_GPU))
    # on the same device (same exp) every variant gives the whole-row kernel's bits
    _assert_same((got, None), (run(x, key, config=ROW_CONFIGS[0], **extra), None), silu_on_gpu=False)


@pytest.mark.parametrize("op", ["quant", "silu"])
@pytest.mark.parametrize("key", [kFp8Dynamic128Sym, kFp8DynamicTokenSym], ids=str)
def test_zero_and_tiny_groups_take_the_keys_scale_floor(op, key):
    """All-zero and tiny groups / rows hit the scale floor, which differs by op and key (vLLM: plain
    per-group quant floors the amax at GROUP_EPS, SiLU and per-token floor the scale at FP8_MIN_SCALE)."""
    x2 = np.random.default_rng(13).standard_normal((3, 2 * 384)).astype(np.float32)
    x2[0] = 0.0
    x2[1, :128] = 1e-30
    x2[1, 384:512] = 1e-30
    x = jnp.asarray(x2 if op == "silu" else x2[:, :384], jnp.float32)
    run = P.quantize if op == "quant" else P.silu_and_mul_quant
    got = run(x, key, _poison=True)
    with jax.default_device(CPU):
        want = (R.quantize if op == "quant" else R.silu_and_mul_quant)(jax.device_put(x, CPU), key)
    _assert_same((got, None), (want, None), silu_on_gpu=(op == "silu" and ON_GPU))


@pytest.mark.parametrize("key", [kFp8DynamicTokenSym, ALL_KEYS["kInt8DynamicTokenSym"]], ids=str)
@pytest.mark.parametrize("m,k,width", [(37, 1536, 64), (5, 14336, 64), (130, 768, 256)], ids=str)
def test_quantize_given_row_amax_matches_quantize(key, m, k, width):
    # chunk maxima as a GEMM epilogue emits them (64-wide tiles here; merged to <= 2048-wide chunks,
    # 14336 = 7 x 2048): one pass, the same bits as quantize's own amax; poisoned outputs
    rng = np.random.default_rng(m + k)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 8.0, (m, 1)), jnp.float32)
    parts = jnp.max(jnp.abs(x).reshape(m, k // width, width), axis=-1)
    got = P.quantize_given_row_amax(x, parts, key, orig_dtype=jnp.bfloat16, _poison=True)
    want = P.quantize(x, key)
    assert got.orig_dtype == jnp.bfloat16 and got.orig_shape == (m, k) and got.quant_key == key
    assert (np.asarray(got.data).view(np.uint8) == np.asarray(want.data).view(np.uint8)).all()
    assert (np.asarray(got.scale) == np.asarray(want.scale)).all()


def test_quantize_given_row_amax_rejects_bad_input():
    x = jnp.ones((4, 256), jnp.float32)
    with pytest.raises(QuantLayoutError, match="dynamic per-token"):
        P.quantize_given_row_amax(x, jnp.ones((4, 2)), kFp8DynamicTensorSym)
    with pytest.raises(QuantLayoutError, match="P dividing K"):
        P.quantize_given_row_amax(x, jnp.ones((4, 3)), kFp8DynamicTokenSym)
    with pytest.raises(QuantLayoutError, match="P dividing K"):
        P.quantize_given_row_amax(x, jnp.ones((3, 2)), kFp8DynamicTokenSym)


def test_row_chunk_must_divide_the_row():
    with pytest.raises(QuantLayoutError, match="does not divide"):
        P.quantize(jnp.ones((2, 640), jnp.bfloat16), kFp8DynamicTokenSym, config=P.ProducerConfig(row_chunk=256))
    with pytest.raises(ValueError, match="split needs a row_chunk"):
        P.ProducerConfig(split=True)


def test_nvfp4_swizzle_padding_is_zero():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 48)) * 2, jnp.bfloat16)  # 3 groups -> padded to 4
    qa = P.quantize(x, kNvfp4Dynamic, global_scale=100.0, _poison=True)
    logical = np.asarray(R.unlayout_scales(qa.scale, qa.quant_key.scale.layout, 128, 4)).view(np.uint8)
    assert logical.shape == (128, 4)
    assert (logical[5:] == 0).all() and (logical[:, 3] == 0).all()
    assert (logical[:5, :3] != 0).all()


def test_nan_inf_policy_matches_reference():
    x = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 200] = np.inf
    for key in (kFp8DynamicTokenSym, kFp8Dynamic128Sym, kNvfp4Dynamic):
        kw = {"global_scale": 50.0} if key.is_fp4 else {}
        got = P.quantize(jnp.asarray(x), key, **kw, _poison=True)
        with jax.default_device(CPU):
            want = R.quantize(jnp.asarray(x), key, **kw)
        s_got, s_want = np.asarray(got.scale, np.float32), np.asarray(want.scale, np.float32)
        np.testing.assert_array_equal(np.isnan(s_got), np.isnan(s_want))
        if key == kFp8DynamicTokenSym:  # the NaN row's scale is NaN; the others are finite
            assert np.isnan(s_got[1, 0]) and np.isfinite(s_got[[0, 3], 0]).all()
    qs = P.quantize(jnp.asarray(x), kFp8StaticTensorSym, scale=np.float32(0.01), _poison=True)
    assert float(jnp.asarray(qs.data, jnp.float32)[2, 200]) == 448.0  # static: +inf saturates


def test_poison_detects_unwritten_scales(monkeypatch):
    """The poisoning can fail: a kernel that skips its scale stores leaves 0xA5 bytes."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 256)), jnp.bfloat16)
    key = kFp8Dynamic128Sym
    real = P._scale_offsets
    monkeypatch.setattr(P, "_scale_offsets", lambda *a: (real(*a)[0], real(*a)[1] & False))
    got = P.quantize(x, key, _poison=True, interpret=True)
    assert (_bytes(got.scale) == 0xA5).all()


# ---- bad input fails before any kernel runs
class _Kernel:
    def __init__(self, key, scales=None):
        self.input_quant_key = key
        self._scales = scales

    def input_quant_scales(self, layer):
        return self._scales or InputQuantScales()


class _Layer:
    pass


@pytest.mark.parametrize("call,err,match", [
    (lambda x: P.quantize(x[:, :100], kFp8Dynamic128Sym), QuantLayoutError, "multiple of the group"),
    (lambda x: P.quantize(x.astype(jnp.int32), kFp8DynamicTokenSym), QuantLayoutError, "dtype"),
    (lambda x: P.quantize(x, kFp8StaticTensorSym, scale=np.ones((2, 2), np.float32)), QuantLayoutError, "one value|shape"),
    (lambda x: P.quantize(x, kFp8StaticTensorSym), QuantLayoutError, "static"),
    (lambda x: P.quantize(x, kNvfp4Dynamic), QuantLayoutError, "global_scale"),
    (lambda x: P.rms_norm_quant(x, jnp.ones(3), kFp8DynamicTokenSym), QuantLayoutError, "weight"),
    (lambda x: P.silu_and_mul_quant(x[:, :255], kFp8DynamicTokenSym), QuantLayoutError, "even"),
    (lambda x: P.quantize(x, layer=_Layer()), NoInputQuantKeyError, "exposes no input quantization key"),
    (lambda x: P.quantize(x), TypeError, "QuantKey or a layer"),
], ids=["k-not-group-multiple", "int-input", "static-scale-shape", "static-no-scale", "nvfp4-no-gs",
        "weight-shape", "silu-odd", "layer-without-key", "no-key"])
def test_bad_input_raises_before_kernel(call, err, match):
    x = jnp.ones((4, 256), jnp.bfloat16)
    with pytest.raises(err, match=match):
        call(x)


def test_producer_from_layer_exposed_key_and_scales():
    """A producer driven by the consumer layer's exposed key and scales (both directions of gs)."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 64)), jnp.bfloat16)
    layer = _Layer()
    expose_input_quant_key(layer, _Kernel(kFp8StaticTensorSym, InputQuantScales(input_scale=np.float32(0.02))))
    got = P.quantize(x, layer=layer, _poison=True)
    want = R.quantize(x, kFp8StaticTensorSym, scale=np.float32(0.02))
    assert (_bytes(got.data) == _bytes(want.data)).all()
    gs = np.float32(123.0)
    layer2 = _Layer()
    expose_input_quant_key(layer2, _Kernel(kNvfp4Dynamic, InputQuantScales(
        global_scale=np.float32(1.0) / gs, global_scale_direction=ScaleDirection.DEQUANT)))
    got2 = P.quantize(x, layer=layer2, _poison=True)
    want2 = R.quantize(x, kNvfp4Dynamic, global_scale=np.float32(1.0) / (np.float32(1.0) / gs))
    assert (_bytes(got2.data) == _bytes(want2.data)).all() and (_bytes(got2.scale) == _bytes(want2.scale)).all()


@pytest.mark.parametrize("m,inter", [(37, 256), (5, 1024)], ids=str)
def test_silu_epilogue_composition_matches_the_silu_producer(m, inter):
    # what mosaic_gate_up's epilogue computes, in jnp (h = silu(g) * u in f32 from the gate/up layer's
    # bf16 output, row maxima per 64-wide tile), then quantize_given_row_amax: the per-token SiLU
    # producer's bits on the same output (interpret mode: the same exp on both sides)
    rng = np.random.default_rng(m + inter)
    y = jnp.asarray(rng.standard_normal((m, 2 * inter)) * 3, jnp.bfloat16)
    g, u = y[:, :inter].astype(jnp.float32), y[:, inter:].astype(jnp.float32)
    h = R.silu_f32(g) * u
    maxima = jnp.max(jnp.abs(h).reshape(m, inter // 64, 64), axis=-1)
    got = P.quantize_given_row_amax(h, maxima, kFp8DynamicTokenSym, orig_dtype=jnp.bfloat16)
    want = P.silu_and_mul_quant(y, kFp8DynamicTokenSym)
    assert (got.orig_dtype, got.orig_shape, got.quant_key) == (want.orig_dtype, want.orig_shape, want.quant_key)
    _assert_same((got, None), (want, None), silu_on_gpu=ON_GPU)
