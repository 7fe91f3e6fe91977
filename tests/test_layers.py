"""QuantLinear in JAX and PyTorch: key/scale exposure, pre-quantized vs plain input, key mismatches,
pytree behaviour, and state-dict loading (the same checks on both sides).

Equality notes: a layer quantizing a plain array runs the same quantizer a producer would, so plain
and pre-quantized inputs give the same bits. The JAX and torch reference consumers both compute
``dequant(a) @ dequant(w).T`` in f32 but sum in XLA's vs BLAS's order; their f32 results agree to a
few f32 ulps, so the rounded bf16 outputs agree to one bf16 ulp (2**-7 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interop.bridge import to_torch
from interop.errors import NoInputQuantKeyError, QuantKeyMismatchError, QuantLayoutError
from interop.keys import (
    kFp8Dynamic128Sym,
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8StaticTensorSym,
    kNvfp4Dynamic,
)
from interop.layers import get_input_quant_key, get_input_quant_scales
from interop.weights import (
    WEIGHT_BLOCK_128,
    WEIGHT_NVFP4,
    WEIGHT_PER_CHANNEL,
    WEIGHT_PER_TENSOR,
    plan_linear,
)
from quantact_jax import producers as P
from quantact_jax.layers import QuantLinear
from quantact_jax.mlp import GATE_UP, make_block
from quantact_torch import reference as TR
from quantact_torch.layers import QuantLinear as TorchQuantLinear
from quantact_torch.layers import to_torch_tensor

BF16_ULP = 2.0 ** -7
KEYS = {"token": kFp8DynamicTokenSym, "static": kFp8StaticTensorSym, "block": kFp8Dynamic128Sym,
        "nvfp4": kNvfp4Dynamic}


def layer_sd(key, hidden=256, intermediate=192, seed=0) -> dict[str, np.ndarray]:
    """The gate/up layer ([2I, H]) of a seeded block, as a vLLM-named state dict without prefix."""
    sd = make_block(hidden, intermediate, key=key, seed=seed).state_dict()
    return {k[len(GATE_UP):]: v for k, v in sd.items() if k.startswith(GATE_UP)}


@pytest.fixture(scope="module", params=list(KEYS), ids=list(KEYS))
def case(request):
    key = KEYS[request.param]
    sd = layer_sd(key)
    sd["bias"] = np.random.default_rng(1).standard_normal(sd["weight"].shape[0]).astype(ml_dtypes.bfloat16)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 256)), jnp.bfloat16)  # leading dims kept
    return key, sd, x


def test_exposes_key_and_scales(case):
    key, sd, _ = case
    layer = QuantLinear.from_state_dict(sd)
    assert layer.input_key == key and get_input_quant_key(layer) == key
    scales = get_input_quant_scales(layer)
    assert (scales.input_scale is not None) == key.scale.static
    assert (scales.global_scale is not None) == key.is_fp4
    assert layer.backend == "pallas"  # NVFP4 too: quantact_jax.dequant_gemm
    assert layer.weight_key == {"token": WEIGHT_PER_CHANNEL, "static": WEIGHT_PER_TENSOR,
                                "block": WEIGHT_BLOCK_128, "nvfp4": WEIGHT_NVFP4}[
        next(n for n, k in KEYS.items() if k == key)]


def test_prequantized_equals_plain_and_torch(case):
    key, sd, x = case
    layer = QuantLinear.from_state_dict(sd)
    qa = P.quantize(x, layer=layer)  # a producer reading the layer's exposed key and scales
    call = jax.jit(lambda layer, a: layer(a))  # the layer is a pytree argument
    y_pre = call(layer, qa)
    y_plain = call(layer, x)  # the layer quantizes the plain array itself
    assert y_pre.shape == (2, 3, sd["weight"].shape[0]) and y_pre.dtype == jnp.bfloat16
    got = np.asarray(y_pre, np.float32)
    assert (got == np.asarray(y_plain, np.float32)).all()
    # torch mirror from the same state dict, fed the same activation through the bridge
    tl = TorchQuantLinear.from_state_dict(sd)
    assert get_input_quant_key(tl) == key
    ty = tl(to_torch(jax.device_put(qa, jax.devices("cpu")[0]))).float().numpy()  # the reference, on CPU
    assert (np.abs(got - ty) <= np.abs(ty) * BF16_ULP + 1e-6).all()  # one bf16 ulp: f32 sum order
    assert (got == ty).mean() > 0.9


def test_backends_agree():
    """The Pallas producer first, bit for bit against the jnp reference run on the CPU (the
    reference's definition: on a GPU XLA compiles the same jnp differently and was seen to put
    codes of this activation one fp8 step apart, H100 2026-11-24); then every backend's GEMM on
    that one activation, each summing in its own f32 order. Bound per output: one bf16 ulp of the
    larger value, plus the f32 sum-order error, absolute and relative to ``sum_k |a_k w_k|`` (not
    to ``|y|``): recursive summation errs by at most ``K * 2**-24 * sum|a w|``, twice that between
    two orders. Without that term an output that cancels (``|y| << sum|a w|``) fails on a
    one-f32-ulp difference (seen on an H100: 2**-22 of ``sum|a w|`` sufficed for one output). A
    code one fp8 step off moves an output by about ``sum|a w| / (16 K)``, 2**-12 here, far above
    the 2**-15 term: the check still sees it. XLA's fp8 dot on a GPU is cuBLASLt with the tensor
    core's ~14-bit accumulator: its bound is tests/test_consumers.py `_check`'s
    ``(K/32) * 2**-13 * sum|a w|``."""
    sd = layer_sd(kFp8DynamicTokenSym)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 256)), jnp.bfloat16)
    layer = QuantLinear.from_state_dict(sd)
    cpu = jax.devices("cpu")[0]
    qa = layer.with_backend("pallas").quantize_input(x)
    with jax.default_device(cpu):
        want = layer.with_backend("reference").quantize_input(jax.device_put(x, cpu))
    for part in ("data", "scale"):
        got_b, want_b = (np.asarray(getattr(q, part)).view(np.uint8) for q in (qa, want))
        assert (got_b == want_b).all(), f"the Pallas producer differs from the reference in {part}"
    call = jax.jit(lambda layer, a: layer(a))
    outs = {b: np.asarray(call(layer.with_backend(b), qa), np.float32) for b in ("pallas", "xla", "reference")}
    k = x.shape[-1]
    a_abs = np.abs(np.asarray(want.data, np.float32)) * np.asarray(want.scale, np.float32).reshape(-1, 1)
    w_abs = np.abs(np.asarray(layer.weight, np.float32)) * np.asarray(layer.weight_scale, np.float32).reshape(-1, 1)
    sum_order = 2 * k * 2.0 ** -24 * (a_abs @ w_abs.T)
    fast = (k / 32) * 2.0 ** -13 * (a_abs @ w_abs.T)
    gpu = jax.default_backend() == "gpu"
    for b in ("xla", "reference"):
        vendor = gpu and b == "xla"
        err = np.abs(outs[b] - outs["pallas"])
        bound = np.maximum(np.abs(outs[b]), np.abs(outs["pallas"])) * BF16_ULP + (fast if vendor else sum_order)
        assert (err <= bound).all(), (b, float((err / bound).max()))
        if not vendor:
            assert (outs[b] == outs["pallas"]).mean() > 0.9, b  # as the consumer tests: most outputs identical


def test_key_mismatch_and_no_key_fail_loudly():
    layer = QuantLinear.from_state_dict(layer_sd(kFp8DynamicTokenSym))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 256)), jnp.bfloat16)
    with pytest.raises(QuantKeyMismatchError, match="expects"):
        layer(P.quantize(x, kFp8DynamicTensorSym))
    with pytest.raises(QuantKeyMismatchError):  # at trace time under jit too
        jax.jit(lambda a: layer(a))(P.quantize(x, kFp8DynamicTensorSym))
    plain = QuantLinear.from_state_dict(layer_sd(kFp8DynamicTokenSym), accepts_quantized=False)
    assert get_input_quant_key(plain) is None
    with pytest.raises(NoInputQuantKeyError):
        P.quantize(x, layer=plain)  # a producer cannot route from a layer that exposes nothing
    with pytest.raises(NoInputQuantKeyError, match="accepts_quantized=False"):
        plain(P.quantize(x, kFp8DynamicTokenSym))
    assert (np.asarray(plain(x), np.float32) == np.asarray(layer(x), np.float32)).all()
    with pytest.raises(QuantLayoutError, match="K=128"):
        layer(x[:, :128])
    with pytest.raises(TypeError):
        layer(to_torch(x))  # a torch tensor is not a JAX input: no silent conversion


def test_pytree_roundtrip_keeps_exposure():
    layer = QuantLinear.from_state_dict(layer_sd(kFp8StaticTensorSym))
    leaves, tree = jax.tree.flatten(layer)
    assert len(leaves) == 3  # weight, weight_scale, input_scale (no bias, no global scales)
    again = jax.tree.unflatten(tree, leaves)
    assert get_input_quant_key(again) == kFp8StaticTensorSym
    assert get_input_quant_scales(again).input_scale is again.input_scale


def test_backend_must_fit_the_scheme():
    sd = layer_sd(kNvfp4Dynamic)
    with pytest.raises(QuantLayoutError, match="Pallas consumer"):  # it reads row-major / swizzled scales only
        QuantLinear.from_state_dict(sd, input_quant_key=kNvfp4Dynamic.with_layout("col_major"), backend="pallas")
    assert QuantLinear.from_state_dict(sd, input_quant_key=kNvfp4Dynamic.with_layout("col_major")).backend == \
        "reference"
    with pytest.raises(QuantLayoutError, match="XLA fp8 dot"):
        QuantLinear.from_state_dict(sd).with_backend("xla")
    with pytest.raises(ValueError, match="backend"):
        QuantLinear.from_state_dict(layer_sd(kFp8DynamicTokenSym), backend="cuda")


def test_torch_tensors_load_through_the_bridge():
    sd = layer_sd(kFp8DynamicTokenSym)
    tsd = {k: to_torch_tensor(v) for k, v in sd.items()}
    tsd["weight_scale"] = tsd["weight_scale"].to(torch.bfloat16)  # llm-compressor stores bf16 scales
    from_np, from_torch = QuantLinear.from_state_dict(sd), QuantLinear.from_state_dict(tsd)
    assert from_torch.weight_scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(from_np.weight).view(np.uint8), np.asarray(from_torch.weight).view(np.uint8))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 256)), jnp.bfloat16)
    bf16_scales = np.asarray(jnp.asarray(sd["weight_scale"], jnp.bfloat16).astype(jnp.float32))
    want = QuantLinear.create(sd["weight"], bf16_scales)(x)
    assert (np.asarray(from_torch(x), np.float32) == np.asarray(want, np.float32)).all()


def test_torch_layer_semantics():
    sd = layer_sd(kFp8StaticTensorSym)
    tl = TorchQuantLinear.from_state_dict({"proj." + k: v for k, v in sd.items()}, prefix="proj.")
    assert set(tl.state_dict()) == set(sd)  # buffers carry vLLM's names
    x = torch.randn(4, 256).to(torch.bfloat16)
    qa = TR.quantize(x, kFp8StaticTensorSym, scale=tl.input_scale)
    assert torch.equal(tl(x), tl(qa))  # plain input is quantized with the exposed static scale
    with pytest.raises(QuantKeyMismatchError):
        tl(TR.quantize(x, kFp8DynamicTokenSym))
    meta = tl.to("meta")  # moving the buffers re-exposes the new ones
    assert get_input_quant_scales(meta).input_scale is meta.input_scale
    plain = TorchQuantLinear.from_state_dict(sd, accepts_quantized=False)
    with pytest.raises(NoInputQuantKeyError):
        plain(qa)


def test_torch_scaled_mm_path_matches_reference():
    """The cuBLASLt path (``torch._scaled_mm``) runs on CPU too in recent torch: check its math."""
    for key in (kFp8DynamicTokenSym, kFp8StaticTensorSym):
        tl = TorchQuantLinear.from_state_dict(layer_sd(key))
        qa = tl.quantize_input(torch.randn(8, 256).to(torch.bfloat16))
        try:
            got = tl._scaled_mm(qa, None, torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:  # torch without a CPU _scaled_mm
            pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
        want = TR.scaled_mm(qa, tl.weight, tl.weight_scale, tl.weight_key).float()
        assert got is not None and got.shape == want.shape
        err = (got.float() - want).abs()
        assert (err <= want.abs() * BF16_ULP + 1e-6).all()


# ---- state-dict checks (the same for both loaders) --------------------------------------------

_RNG = np.random.default_rng(6)


def _fp8(shape):
    return (_RNG.standard_normal(shape) * 10).astype(ml_dtypes.float8_e4m3fn)


def _f32(*shape):
    return np.full(shape, 0.01, np.float32)


GOOD = {"weight": _fp8((64, 256)), "weight_scale": _f32(64, 1)}
BAD = [
    ({"weight": _fp8((64, 256)).astype(np.float32), "weight_scale": _f32(64, 1)}, "expected float8_e4m3fn"),
    ({"weight": _fp8((64,)), "weight_scale": _f32(1)}, r"\[N, K\]"),
    ({"weight": _fp8((64, 256)), "weight_scale": _f32(3, 3)}, "fits no fp8 weight scheme"),
    ({"weight": _fp8((64, 256)), "weight_scale": np.ones((64, 1), np.int32)}, "weight_scale has dtype int32"),
    ({**GOOD, "bias": _f32(63)}, r"bias has shape \(63,\)"),
    ({**GOOD, "input_scale": _f32(2)}, "must hold one value"),
    ({**GOOD, "weight_global_scale": _f32(1)}, "NVFP4 entry"),
    ({**GOOD, "weight_zero_point": _f32(1)}, "unexpected state-dict entries"),
    ({"weight_scale": _f32(64, 1)}, "weight is missing"),
    ({"weight": np.zeros((64, 128), np.uint8), "weight_scale": _f32(64, 16), "weight_global_scale": _f32(1),
      "input_global_scale": _f32(1)}, "float8_e4m3fn \\(64, 16\\) row-major"),
    ({"weight": np.zeros((64, 128), np.uint8), "weight_scale": _fp8((64, 16)), "weight_global_scale": _f32(1)},
     "input_global_scale is missing"),
    ({"weight": np.zeros((64, 4), np.uint8), "weight_scale": _fp8((64, 0)), "weight_global_scale": _f32(1),
      "input_global_scale": _f32(1)}, "multiple of 16"),
]


@pytest.mark.parametrize("loader", ["jax", "torch"])
@pytest.mark.parametrize("sd,match", BAD, ids=[m[:24] for _, m in BAD])
def test_state_dict_rejects(loader, sd, match):
    load = QuantLinear.from_state_dict if loader == "jax" else TorchQuantLinear.from_state_dict
    with pytest.raises(QuantLayoutError, match=match):
        load({"layer." + k: v for k, v in sd.items()}, prefix="layer.")


@pytest.mark.parametrize("key,extra,match", [
    (kFp8StaticTensorSym, {}, "input_scale is missing"),
    (kFp8DynamicTokenSym, {"input_scale": _f32(1)}, "is dynamic"),
    (kFp8Dynamic128Sym, {}, "1x128-group activations go with 128x128-block"),
    (kNvfp4Dynamic, {}, "does not fit fp8 weights"),
])
def test_state_dict_rejects_key_conflicts(key, extra, match):
    with pytest.raises(QuantLayoutError, match=match):
        plan_linear({**GOOD, **extra}, input_quant_key=key)


def test_error_names_the_prefixed_entry():
    with pytest.raises(QuantLayoutError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_scale"):
        QuantLinear.from_state_dict({"model.layers.0.mlp.down_proj.weight": _fp8((64, 256)),
                                     "model.layers.0.mlp.down_proj.weight_scale": _f32(5)},
                                    prefix="model.layers.0.mlp.down_proj.")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), rows=st.integers(0, 4), cols=st.integers(0, 4),
       ndim=st.integers(0, 3))
def test_weight_scale_shapes_property(n, k, rows, cols, ndim):
    """Any weight-scale shape is either one of the three fp8 schemes for ``[N, K]`` (and then the
    plan reshapes it to that scheme's storage) or rejected with QuantLayoutError."""
    shape = ((), (rows * n // 2 + cols,), (rows * n // 2 + cols, cols), (1, rows, cols))[ndim]
    # where shapes coincide (N = 1, a single block) the first reading wins: per-tensor, per-channel, blocks
    valid = {(-(-n // 128), -(-k // 128)): WEIGHT_BLOCK_128, (n,): WEIGHT_PER_CHANNEL, (n, 1): WEIGHT_PER_CHANNEL,
             (): WEIGHT_PER_TENSOR, (1,): WEIGHT_PER_TENSOR, (1, 1): WEIGHT_PER_TENSOR}
    entries = {"weight": np.zeros((n, k), ml_dtypes.float8_e4m3fn), "weight_scale": np.zeros(shape, np.float32)}
    if shape in valid:
        plan = plan_linear(entries)
        assert plan.weight_key == valid[shape] and (plan.n, plan.k) == (n, k)
        assert plan.shapes["weight_scale"] == {WEIGHT_PER_TENSOR: (1,), WEIGHT_PER_CHANNEL: (n, 1)}.get(
            plan.weight_key, (-(-n // 128), -(-k // 128)))
    else:
        with pytest.raises(QuantLayoutError, match="fits no fp8 weight scheme"):
            plan_linear(entries)
