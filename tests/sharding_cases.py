"""Sharding cases on 8 virtual CPU devices; run by tests/test_sharding.py in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (pytest does not collect this file by default,
and it skips itself unless 8 devices are present).

Sharded producers, the sharded consumer and the TP block are compared with the single-device ops
bit for bit, except where a cross-shard reduction changes the summation order (row parallel); there
the bound is derived below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from interop import keys as K
from interop.errors import QuantShardingError
from interop.layout import rows_cols, scale_storage_shape
from quantact_jax import consumers as C
from quantact_jax import producers as PR
from quantact_jax import reference as R
from quantact_jax import sharding as S

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (virtual) devices: run via test_sharding.py")

MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y")) if jax.device_count() == 8 else None
G128 = K.kFp8Dynamic128Sym


def _bytes(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _same(got, want):
    assert got.quant_key == want.quant_key and got.orig_shape == want.orig_shape
    assert got.orig_dtype == want.orig_dtype
    for name in ("data", "scale"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert (_bytes(g) == _bytes(w)).all(), f"{name}: {(_bytes(g) != _bytes(w)).sum()} bytes differ"


def _x(shape, seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 4.0, (*shape[:-1], 1))
    return jnp.asarray(x, dtype)


# ------------------------------------------------------------------ rules (no kernels)
RULES = [  # key, orig_shape, data spec, expected scale spec (or an error substring)
    (K.kFp8StaticTensorSym, (64, 256), P("x", "y"), P(None)),
    (K.kFp8DynamicTokenSym, (64, 256), P(("x", "y")), P(("x", "y"), None)),
    (K.kFp8DynamicTokenSym, (64, 256), P("x", "y"), P("x", None)),  # scale replicated along K
    (K.kFp8StaticChannelSym, (64, 256), P("x", "y"), P(None, "y")),
    (K.kFp8Static128BlockSym, (256, 512), P("x", "y"), P("x", "y")),
    (K.kFp8Static128BlockSym, (256, 512), P("y", "x"), "cuts its 128-row scale blocks"),
    (G128, (64, 1024), P("x", "y"), P("x", "y")),
    (G128, (64, 256), P("x", "y"), "not a multiple of the 128-element scale group"),
    (G128.with_layout("col_major"), (64, 1024), P("x", "y"), P("y", "x")),
    (G128.with_layout("col_major_tma"), (24, 256), P("x"), P(None, "x")),
    (G128.with_layout("col_major_tma"), (24, 256), P(("x", "y")), "multiple of 4 rows, not 3"),
    (G128.with_layout("packed_ue8m0"), (64, 1024), P("y", "x"), P("x", "y")),
    (G128.with_layout("packed_ue8m0"), (64, 1024), P("x", "y"), "4 groups per int32 word"),
    (K.kNvfp4Dynamic, (256, 256), P("x"), P("x", None)),
    (K.kNvfp4Dynamic, (256, 256), P("y"), "multiple of 128 rows, not 64"),
    (K.kNvfp4Dynamic, (256, 256), P(None, "x"), "interleave the 4-group column tiles"),
    (K.kNvfp4Dynamic.with_layout("row_major"), (64, 256), P("x", "y"), P("x", "y")),
    (K.kMxfp8Dynamic, (2, 128, 256), P("x", None, None), P("x", None)),
    (K.kFp8DynamicTokenSym, (2, 32, 256), P("x", "y", None), P(("x", "y"), None)),  # B == |x|: rows contiguous
    (K.kFp8DynamicTokenSym, (4, 32, 256), P("x", "y", None), "one contiguous block"),
    (K.kFp8DynamicTokenSym, (4, 32, 256), P(None, "y", None), "one contiguous block"),
    (K.kFp8DynamicTokenSym, (6, 256), P("y"), "does not split evenly"),
    (K.kNvfp4Dynamic.with_layout("row_major"), (64, 16), P(None, ("x", "y")), "2 wide, not a multiple of the 16"),
    (K.kFp8DynamicTokenSym, (64, 256), P("x", "x"), "uses a mesh axis twice"),
    (K.kFp8DynamicTokenSym, (64, 256), P("tp"), "not in the mesh"),
    (K.kFp8DynamicTokenSym, (64, 256), P(None, None, None), "more entries"),
]


@pytest.mark.parametrize("key,shape,spec,want", RULES, ids=[f"{i}-{r[0].scale.layout}" for i, r in enumerate(RULES)])
def test_scale_spec_rules(key, shape, spec, want):
    if isinstance(want, str):
        with pytest.raises(QuantShardingError, match=want):
            S.scale_spec(key, shape, spec, MESH)
    else:
        assert S.scale_spec(key, shape, spec, MESH) == want


def test_activation_sharding_pytree_matches_and_places():
    x = _x((64, 1024))
    qa = PR.quantize(x, G128)
    ns = S.activation_sharding(NamedSharding(MESH, P("x", "y")), G128, qa.orig_shape, qa.orig_dtype)
    assert jax.tree.structure(ns) == jax.tree.structure(qa)
    assert ns.data.spec == P("x", "y") and ns.scale.spec == P("x", "y")
    specs = S.activation_sharding(P("x", "y"), G128, qa.orig_shape, qa.orig_dtype, mesh=MESH)
    assert specs.data == P("x", "y") and specs.scale == P("x", "y")
    placed = jax.device_put(qa, ns)  # the whole activation moves as one pytree
    assert placed.scale.sharding.is_equivalent_to(ns.scale, 2)
    _same(placed, qa)
    with pytest.raises(TypeError, match="pass mesh"):
        S.activation_sharding(P("x"), G128, qa.orig_shape, qa.orig_dtype)


# ------------------------------------------------------------------ producers
def _kw(key, x):
    kw = {}
    if key.format == K.QuantFormat.NVFP4:
        kw["global_scale"] = np.float32(448 * 6 / float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
    if key.scale.static:
        m, k = rows_cols(x.shape)
        if key.scale.group_shape.is_per_group():  # block formats: the scales a dynamic quantization produces
            d = key.scale
            dyn = K.QuantKey(key.dtype, K.ScaleDesc(d.dtype, False, d.group_shape, d.layout), key.scale2)
            kw["scale"] = R.quantize(x, dyn, **kw).scale
        else:
            shape = scale_storage_shape(key.scale, m, k)
            kw["scale"] = jnp.asarray(np.random.default_rng(1).uniform(0.005, 0.03, shape), jnp.float32)
    return kw


QUANT = [  # key, shape, spec
    (K.kFp8DynamicTokenSym, (64, 256), P(("x", "y"))),
    (K.kFp8DynamicTensorSym, (64, 256), P("x", "y")),  # needs the cross-shard pmax
    (G128, (64, 1024), P("x", "y")),
    (G128.with_layout("col_major_tma", ue8m0=True), (64, 1024), P("x", "y")),
    (G128.with_layout("packed_ue8m0"), (64, 1024), P("y", "x")),
    (K.kNvfp4Dynamic, (256, 128), P("x")),
    (K.kNvfp4Dynamic.with_layout("row_major"), (64, 256), P("x", "y")),
    (K.kMxfp8Dynamic, (2, 128, 256), P("x", None, None)),
    (K.kFp8StaticTensorSym, (64, 256), P("x", "y")),
    (K.kFp8StaticTokenSym, (64, 256), P("y", "x")),
    (K.kFp8Static128BlockSym, (256, 512), P("x", "y")),
    (K.kNvfp4Static, (256, 128), P("x")),
    (K.kInt8DynamicTokenSym, (2, 32, 256), P("x", "y", None)),
]


@pytest.mark.parametrize("key,shape,spec", QUANT, ids=[f"{k}-{sp}" for k, _, sp in QUANT])
def test_sharded_quantize_bit_exact(key, shape, spec):
    x = _x(shape, seed=len(str(key)))
    kw = _kw(key, x)
    want = PR.quantize(x, key, **kw)
    got = S.sharded_quantize(x, key, MESH, spec, **kw)
    _same(got, want)
    plan = S.shard_plan(key, shape, spec, MESH)
    assert got.data.sharding.is_equivalent_to(NamedSharding(MESH, plan.data_spec), got.data.ndim)
    assert got.scale.sharding.is_equivalent_to(NamedSharding(MESH, plan.scale_spec), got.scale.ndim)


def test_per_tensor_amax_is_global():
    """Without the pmax each shard would scale by its own amax: one shard holds the global max."""
    x = _x((64, 256)).at[0, 0].set(1000.0)
    got = S.sharded_quantize(x, K.kFp8DynamicTensorSym, MESH, P("x", "y"))
    assert got.scale[0] == np.float32(1000.0) / np.float32(448.0)
    local = jax.shard_map(lambda a: PR.quantize(a, K.kFp8DynamicTensorSym).scale, mesh=MESH,
                          in_specs=P("x", "y"), out_specs=P(("x", "y")), check_vma=False)(x)
    assert len(set(np.asarray(local).tolist())) > 1  # the local scales do differ


@pytest.mark.parametrize("key", [K.kFp8DynamicTokenSym, K.kFp8DynamicTensorSym, K.kFp8StaticTensorSym, G128],
                         ids=str)
def test_sharded_rms_norm_quant_rows(key):
    x, res = _x((64, 512), 3), _x((64, 512), 4)
    w = _x((512,), 5)
    kw = _kw(key, x)
    want = PR.rms_norm_quant(x, w, key, residual=res, **kw)
    got = S.sharded_rms_norm_quant(x, w, key, MESH, P(("x", "y")), residual=res, **kw)
    _same(got[0], want[0])
    assert (_bytes(got[1]) == _bytes(want[1])).all()
    got_nores, none = S.sharded_rms_norm_quant(x, w, key, MESH, P("y"), **kw)
    assert none is None
    _same(got_nores, PR.rms_norm_quant(x, w, key, **kw)[0])


def _interleave(x, parts):
    """[..., 2d] = [gate | up] -> shard i of the last dim holds [gate_i | up_i]."""
    d = x.shape[-1] // 2
    g, u = (a.reshape(*x.shape[:-1], parts, d // parts) for a in (x[..., :d], x[..., d:]))
    return jnp.concatenate([g, u], axis=-1).reshape(x.shape)


@pytest.mark.parametrize("key,spec", [(G128, P("x", "y")), (K.kFp8DynamicTensorSym, P("x", "y")),
                                      (K.kFp8StaticTensorSym, P(None, ("x", "y"))), (K.kNvfp4Dynamic, P("x"))],
                         ids=str)
def test_sharded_silu_and_mul_quant(key, spec):
    x = _x((256, 1024), 6)
    kw = _kw(key, x[:, :512])
    want = PR.silu_and_mul_quant(x, key, **kw)
    parts = S.shard_plan(key, (256, 512), spec, MESH).k_parts
    got = S.sharded_silu_and_mul_quant(_interleave(x, parts), key, MESH, spec, **kw)
    _same(got, want)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: S.sharded_rms_norm_quant(x, w, K.kFp8DynamicTokenSym, MESH, P("x", "y")), "needs whole rows"),
    (lambda x, w: S.sharded_quantize(x, K.kFp8DynamicTokenSym, MESH, P("x", "y")), "amax of whole rows"),
    (lambda x, w: S.sharded_silu_and_mul_quant(x, K.kFp8DynamicTokenSym, MESH, P(None, "y")), "amax of whole rows"),
    (lambda x, w: S.sharded_quantize(x, K.kNvfp4Dynamic, MESH, P("x"), global_scale=1.0), "128 rows, not 32"),
    (lambda x, w: S.sharded_quantize(x, G128, MESH, P(None, ("x", "y"))), "128-element scale group"),
])
def test_bad_shardings_fail_clearly(call, match):
    with pytest.raises(QuantShardingError, match=match):
        call(_x((64, 512)), _x((512,)))


def test_under_jit_with_sharded_inputs_and_out_shardings():
    x = _x((64, 1024), 8)
    want = PR.quantize(x, G128)
    xs = jax.device_put(x, NamedSharding(MESH, P("x", "y")))
    out_sh = S.activation_sharding(NamedSharding(MESH, P("x", "y")), G128, want.orig_shape, want.orig_dtype)
    f = jax.jit(lambda a: S.sharded_quantize(a, G128, MESH, P("x", "y")), out_shardings=out_sh)
    got = f(xs)
    _same(got, want)
    assert got.scale.sharding.is_equivalent_to(out_sh.scale, 2)
    # an input with another sharding is resharded to the requested spec
    _same(jax.jit(lambda a: S.sharded_quantize(a, G128, MESH, P("x", "y")))(
        jax.device_put(x, NamedSharding(MESH, P("y")))), want)


# ------------------------------------------------------------------ consumer
def _weight(n, k, mode, seed=0):
    rng = np.random.default_rng(seed)
    wf = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
    if mode == "tensor":
        ws, wk = jnp.max(jnp.abs(wf)).reshape(1) / 448, C.WEIGHT_PER_TENSOR
    elif mode == "channel":
        ws, wk = jnp.max(jnp.abs(wf), axis=1, keepdims=True) / 448, C.WEIGHT_PER_CHANNEL
    else:
        ws = jnp.asarray(float(jnp.max(jnp.abs(wf))) / 448 * rng.uniform(0.8, 1.2, (n // 128, k // 128)), jnp.float32)
        wk = C.WEIGHT_BLOCK_128
    return R.quantize(wf, wk, scale=ws).data, ws


MM = [(K.kFp8DynamicTokenSym, "channel"), (K.kFp8DynamicTensorSym, "tensor"), (G128, "block")]


@pytest.mark.parametrize("akey,wmode", MM, ids=[f"{a.scale.group_shape}-{w}" for a, w in MM])
def test_sharded_scaled_mm_data_and_column_parallel_bit_exact(akey, wmode):
    x = _x((64, 256), 9)
    w, ws = _weight(512, 256, wmode)
    b = jnp.asarray(np.random.default_rng(2).standard_normal(512), jnp.float32)
    qa = PR.quantize(x, akey)
    want = C.scaled_mm(qa, w, ws, bias=b, input_quant_key=akey)
    got = S.sharded_scaled_mm(qa, w, ws, MESH, P("x"), n_axes="y", bias=b, input_quant_key=akey)
    assert got.sharding.is_equivalent_to(NamedSharding(MESH, P("x", "y")), 2)
    assert (_bytes(got) == _bytes(want)).all()
    # a plain array is quantized by the sharded producer first, as scaled_mm does in-kernel
    got2 = S.sharded_scaled_mm(x, w, ws, MESH, P(("x", "y")), input_quant_key=akey)
    assert (_bytes(got2) == _bytes(C.scaled_mm(x, w, ws, input_quant_key=akey))).all()


def _row_parallel_bound(qa, w, ws, wmode, n_blocks):
    """Row parallel sums the per-shard partials (scales applied) in another order than the
    single-device kernel's sequential K loop over 128-wide blocks; the products inside each block
    are the same. Both orders are sums of ``n_blocks`` f32 terms, each scaled by two roundings, so
    each is within ``(n_blocks + 2) * u * sum|terms|`` of the exact value (u = 2**-24); their
    difference within twice that, with ``sum|terms|`` = the GEMM of the dequantized magnitudes."""
    wk = {"tensor": C.WEIGHT_PER_TENSOR, "channel": C.WEIGHT_PER_CHANNEL, "block": C.WEIGHT_BLOCK_128}[wmode]
    a = jnp.abs(R.dequantize(qa)).reshape(-1, qa.orig_shape[-1])
    wv = jnp.abs(R.dequantize_codes(w, ws, wk, w.shape))
    mag = np.asarray(jnp.matmul(a, wv.T, precision=jax.lax.Precision.HIGHEST))
    return 2 * (n_blocks + 2) * 2.0**-24 * mag


@pytest.mark.parametrize("akey,wmode", MM, ids=[f"{a.scale.group_shape}-{w}" for a, w in MM])
def test_sharded_scaled_mm_row_parallel(akey, wmode):
    x = _x((64, 512), 10)
    w, ws = _weight(256, 512, wmode, seed=1)
    b = jnp.asarray(np.random.default_rng(3).standard_normal(256), jnp.float32)
    qa = PR.quantize(x, akey)
    want = np.asarray(C.scaled_mm(qa, w, ws, bias=b, out_dtype=jnp.float32, input_quant_key=akey))
    got = S.sharded_scaled_mm(qa, w, ws, MESH, P("x", "y"), bias=b, out_dtype=jnp.float32, input_quant_key=akey)
    assert got.sharding.is_equivalent_to(NamedSharding(MESH, P("x", None)), 2)
    np.testing.assert_array_less(np.abs(np.asarray(got) - want), _row_parallel_bound(qa, w, ws, wmode, 4) + 1e-30)


def test_sharded_scaled_mm_bad_weight_split():
    qa = PR.quantize(_x((64, 256)), G128)
    w, ws = _weight(256, 256, "block")
    with pytest.raises(QuantShardingError, match="multiple of 128"):
        S.sharded_scaled_mm(qa, w, ws, MESH, P("x"), n_axes="y", input_quant_key=G128)
