"""Sharding cases on 8 virtual CPU devices; run by tests/test_sharding.py in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (pytest does not collect this file by default,
and it skips itself unless 8 devices are present).

Sharded producers, the sharded consumer and the TP block are compared with the single-device ops
bit for bit, except where a cross-shard reduction changes the summation order (row parallel); there
the bound is derived in ``sharding_bounds.py`` (shared with the multi-GPU bench scripts).

``QUANTACT_SHARDING_DEVICES=<platform>`` (e.g. ``gpu``) builds the mesh from that platform's devices
instead: 8 or more -> the 2x4 mesh, 4 -> 1x4, 2 or 3 -> 1x2 (axes ``("x", "y")``; ``y`` is the TP
axis); fewer than 2 skip. Shapes whose outcome depends on the axis sizes are derived from them (the
2x4 mesh gets the original literals). tests/test_sharding.py runs it that way on a multi-GPU host.
On a GPU the auto backend runs these GEMMs (M <= 64) on the Mosaic kernels when M > 8
(sharding_bounds.fast_accum_k: the fast-accumulation term joins the f32-order bounds there).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sharding_bounds import close_after_cast, fast_accum_k, interleave_halves, single_mlp
from sharding_bounds import mm_bound as _mm_bound
from sharding_bounds import row_parallel_bound as _row_parallel_bound

from interop import keys as K
from interop.errors import QuantShardingError
from interop.layout import rows_cols, scale_storage_shape
from quantact_jax import consumers as C
from quantact_jax import producers as PR
from quantact_jax import reference as R
from quantact_jax import sharding as S

PLATFORM = os.environ.get("QUANTACT_SHARDING_DEVICES", "").strip()


def _mesh() -> tuple[Mesh | None, str]:
    """The test mesh, or ``None`` and why not."""
    if not PLATFORM:
        if jax.device_count() != 8:
            return None, "needs 8 (virtual) devices: run via test_sharding.py"
        return Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y")), ""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (read when NCCL starts)
    try:
        devs = jax.devices(PLATFORM)
    except RuntimeError:
        devs = []
    if len(devs) < 2:
        return None, f"QUANTACT_SHARDING_DEVICES={PLATFORM}: needs at least 2 {PLATFORM} devices, found {len(devs)}"
    shape = (2, 4) if len(devs) >= 8 else (1, 4) if len(devs) >= 4 else (1, 2)
    return Mesh(np.array(devs[:shape[0] * shape[1]]).reshape(shape), ("x", "y")), ""


MESH, _WHY = _mesh()
pytestmark = pytest.mark.skipif(MESH is None, reason=_WHY or "no mesh")
X, Y = (MESH.shape["x"], MESH.shape["y"]) if MESH is not None else (2, 4)  # axis sizes (2x4 on 8 CPU devices)
XK, NXK = ("x", X) if X > 1 else ("y", Y)  # an axis of size > 1 for cases that need a split (y on a 1 x n mesh)
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
    (K.kFp8Static128BlockSym, (64 * Y, 512), P("y", "x"), "cuts its 128-row scale blocks"),
    (G128, (64, 1024), P("x", "y"), P("x", "y")),
    (G128, (64, 64 * Y), P("x", "y"), "not a multiple of the 128-element scale group"),
    (G128.with_layout("col_major"), (64, 1024), P("x", "y"), P("y", "x")),
    (G128.with_layout("col_major_tma"), (24, 256), P("x"), P(None, "x")),
    (G128.with_layout("col_major_tma"), (3 * X * Y, 256), P(("x", "y")), "multiple of 4 rows, not 3"),
    (G128.with_layout("packed_ue8m0"), (64, 1024), P("y", "x"), P("x", "y")),
    (G128.with_layout("packed_ue8m0"), (64, 256 * Y), P("x", "y"), "4 groups per int32 word"),
    (K.kNvfp4Dynamic, (256, 256), P("x"), P("x", None)),
    (K.kNvfp4Dynamic, (64 * Y, 256), P("y"), "multiple of 128 rows, not 64"),
    (K.kNvfp4Dynamic, (256, 256), P(None, XK), "interleave the 4-group column tiles"),
    (K.kNvfp4Dynamic.with_layout("row_major"), (64, 256), P("x", "y"), P("x", "y")),
    (K.kMxfp8Dynamic, (2, 128, 256), P("x", None, None), P("x", None)),
    (K.kFp8DynamicTokenSym, (X, 32, 256), P("x", "y", None), P(("x", "y"), None)),  # B == |x|: rows contiguous
    (K.kFp8DynamicTokenSym, (4, 32, 256), P("x", "y", None), "one contiguous block"),
    (K.kFp8DynamicTokenSym, (4, 32, 256), P(None, "y", None), "one contiguous block"),
    (K.kFp8DynamicTokenSym, (Y + Y // 2, 256), P("y"), "does not split evenly"),
    (K.kNvfp4Dynamic.with_layout("row_major"), (64, 2 * X * Y), P(None, ("x", "y")),
     "2 wide, not a multiple of the 16"),
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
    (K.kInt8DynamicTokenSym, (X, 32, 256), P("x", "y", None)),
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
    if key == K.kFp8DynamicTokenSym:  # no residual, another row split
        got_nores, none = S.sharded_rms_norm_quant(x, w, key, MESH, P("y"), **kw)
        assert none is None
        _same(got_nores, PR.rms_norm_quant(x, w, key, **kw)[0])


@pytest.mark.parametrize("key,spec", [(G128, P("x", "y")), (K.kFp8DynamicTensorSym, P("x", "y")),
                                      (K.kFp8StaticTensorSym, P(None, ("x", "y"))), (K.kNvfp4Dynamic, P("x"))],
                         ids=str)
def test_sharded_silu_and_mul_quant(key, spec):
    x = _x((256, 1024), 6)
    kw = _kw(key, x[:, :512])
    want = PR.silu_and_mul_quant(x, key, **kw)
    parts = S.shard_plan(key, (256, 512), spec, MESH).k_parts
    got = S.sharded_silu_and_mul_quant(interleave_halves(x, parts), key, MESH, spec, **kw)
    _same(got, want)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: S.sharded_rms_norm_quant(x, w, K.kFp8DynamicTokenSym, MESH, P("x", "y")), "needs whole rows"),
    (lambda x, w: S.sharded_quantize(x, K.kFp8DynamicTokenSym, MESH, P("x", "y")), "amax of whole rows"),
    (lambda x, w: S.sharded_silu_and_mul_quant(x, K.kFp8DynamicTokenSym, MESH, P(None, "y")), "amax of whole rows"),
    (lambda x, w: S.sharded_quantize(x[:32 * NXK], K.kNvfp4Dynamic, MESH, P(XK), global_scale=1.0),
     "128 rows, not 32"),
    (lambda x, w: S.sharded_quantize(x[:, :64 * X * Y], G128, MESH, P(None, ("x", "y"))), "128-element scale group"),
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
    if wmode != "channel":
        return
    # a plain array is quantized by the sharded producer first, as scaled_mm does in-kernel
    got2 = S.sharded_scaled_mm(x, w, ws, MESH, P(("x", "y")), input_quant_key=akey)
    assert (_bytes(got2) == _bytes(C.scaled_mm(x, w, ws, input_quant_key=akey))).all()


@pytest.mark.parametrize("akey,wmode", MM, ids=[f"{a.scale.group_shape}-{w}" for a, w in MM])
def test_sharded_scaled_mm_row_parallel(akey, wmode):
    x = _x((64, 512), 10)
    w, ws = _weight(256, 512, wmode, seed=1)
    b = jnp.asarray(np.random.default_rng(3).standard_normal(256), jnp.float32)
    qa = PR.quantize(x, akey)
    want = np.asarray(C.scaled_mm(qa, w, ws, bias=b, out_dtype=jnp.float32, input_quant_key=akey))
    got = S.sharded_scaled_mm(qa, w, ws, MESH, P("x", "y"), bias=b, out_dtype=jnp.float32, input_quant_key=akey)
    assert got.sharding.is_equivalent_to(NamedSharding(MESH, P("x", None)), 2)
    bound = _row_parallel_bound(qa, w, ws, wmode, 4, bias=b, fast_k=fast_accum_k(akey, 64 // X, 512, Y))
    np.testing.assert_array_less(np.abs(np.asarray(got) - want), bound + 1e-30)


def test_sharded_scaled_mm_bad_weight_split():
    qa = PR.quantize(_x((64, 256)), G128)
    w, ws = _weight(64 * Y, 256, "block")  # 64 rows per shard
    with pytest.raises(QuantShardingError, match="multiple of 128"):
        S.sharded_scaled_mm(qa, w, ws, MESH, P("x"), n_axes="y", input_quant_key=G128)


# ------------------------------------------------------------------ tensor parallelism
def _tp():
    from quantact_jax import mlp as M
    from quantact_jax import tp as T

    return M, T


def _close_after_cast(got, want, bound):
    """See :func:`sharding_bounds.close_after_cast`: the bound plus one bf16 step, >95% equal."""
    ok, why = close_after_cast(got, want, bound)
    assert ok, why


TP_KEYS = [G128, K.kFp8StaticTensorSym]  # dynamic per-tensor (the cross-shard amax) runs in the MLP cases


@pytest.mark.parametrize("key", TP_KEYS, ids=str)
def test_column_and_row_parallel_linears(key):
    M, T = _tp()
    block = M.make_block(256, 512, key=key, seed=1)
    x = _x((64, 256), 11)
    gu = block.gate_up
    got = T.column_parallel(gu, x, MESH, P("x"), tp_axis="y")
    assert got.sharding.is_equivalent_to(NamedSharding(MESH, P("x", "y")), 2)
    assert (_bytes(got) == _bytes(gu(x))).all()
    with pytest.raises(QuantShardingError, match="whole K"):
        T.column_parallel(gu, x, MESH, P(None, XK), tp_axis="y")

    down = block.down.__class__.create(block.down.weight, block.down.weight_scale, input_scale=block.down.input_scale,
                                       bias=jnp.asarray(np.random.default_rng(4).standard_normal(256), jnp.float32),
                                       input_quant_key=block.down.input_key)
    h = _x((64, 512), 12)
    y = PR.quantize(h, down.input_key, scale=down.input_scale)
    want = down(y, out_dtype=jnp.float32)
    got = T.row_parallel(down, h, MESH, P("x", "y"), out_dtype=jnp.float32)  # plain input: sharded quantization
    assert got.sharding.is_equivalent_to(NamedSharding(MESH, P("x", None)), 2)
    bound = _mm_bound(y, down, 4, bias=down.bias, fast_k=fast_accum_k(down.input_key, 64 // X, 512, Y))
    np.testing.assert_array_less(np.abs(np.asarray(got) - np.asarray(want)), bound + 1e-30)


def test_interleave_gate_up_pairs_shards():
    M, T = _tp()
    block = M.make_block(256, 512, key=G128, seed=2)
    il = T.interleave_gate_up(block.gate_up, 4)
    w, wi = np.asarray(block.gate_up.weight).view(np.uint8), np.asarray(il.weight).view(np.uint8)
    for i in range(4):  # shard i: rows [gate_i; up_i]
        assert (wi[256 * i:256 * i + 128] == w[128 * i:128 * (i + 1)]).all()
        assert (wi[256 * i + 128:256 * (i + 1)] == w[512 + 128 * i:512 + 128 * (i + 1)]).all()
    with pytest.raises(QuantShardingError, match="multiple of 128"):
        T.interleave_gate_up(block.gate_up, 8)


MLP_CASES = [(K.kFp8DynamicTensorSym, True), (G128, True), (G128, False)]


@pytest.mark.parametrize("key,fused", MLP_CASES, ids=[f"{k}-{'fused' if f else 'plain'}" for k, f in MLP_CASES])
def test_tp_mlp_matches_single_device(key, fused):
    M, T = _tp()
    block = M.make_block(256, 512, key=key, seed=3)
    x, res = _x((64, 256), 13), _x((64, 256), 14)
    # under jit, as a model runs it (outside jit, shard_map runs the plain path's many jnp ops one by one)
    want, want_res, _, y = jax.jit(lambda a, r: single_mlp(block, a, r, fused))(x, res)
    tpb = T.shard_mlp_block(block, MESH, "y")
    got, got_res = jax.jit(lambda b, a, r: T.tp_mlp(b, a, MESH, P("x"), residual=r, fused=fused))(tpb, x, res)
    assert got.sharding.is_equivalent_to(NamedSharding(MESH, P("x", None)), 2)
    assert (_bytes(got_res) == _bytes(want_res)).all()
    _close_after_cast(got, want, _mm_bound(y, block.down, 4, fast_k=fast_accum_k(key, 64 // X, 512, Y)))


def test_tp_mlp_per_token_scales_are_shard_local_or_rejected():
    """vLLM quantizes each shard's slice of the down projection's input per token on its own; that
    is a different quantization than one device's, so it must be asked for."""
    M, T = _tp()
    block = M.make_block(256, 512, key=K.kFp8DynamicTokenSym, seed=4)
    x = _x((64, 256), 15)
    tpb = T.shard_mlp_block(block, MESH, "y")
    with pytest.raises(QuantShardingError, match="shard_local_scales=True"):
        T.tp_mlp(tpb, x, MESH, P("x"))
    got, _ = T.tp_mlp(tpb, x, MESH, P("x"), shard_local_scales=True)
    # the same computation composed shard by shard on one device: per-token quantization of each
    # [gate_i | up_i] slice, each shard's partial down GEMM in f32, summed in shard order
    h = jax.jit(lambda a: single_mlp(block, a, None, True)[2])(x)
    w = 512 // Y  # each of the Y shards' slice of the intermediate
    parts, bound = [], 0.0
    for i in range(Y):
        hi = jnp.concatenate([h[:, w * i:w * (i + 1)], h[:, 512 + w * i:512 + w * (i + 1)]], axis=1)
        yi = PR.silu_and_mul_quant(hi, layer=block.down)
        di = dataclasses.replace(block.down, weight=block.down.weight[:, w * i:w * (i + 1)])
        parts.append(np.asarray(di(yi, out_dtype=jnp.float32)))
        bound = bound + _mm_bound(yi, di, w // 128)
    want = sum(parts).astype(jnp.bfloat16)
    _close_after_cast(got, want, bound)
