"""The framework-neutral contract: keys, their str(), QuantizedActivation pytrees on both sides,
the consumer-side key check, the layout checks, and key/scale exposure on layers.

Valid activations are built by hand (random bytes, shapes from ``interop.layout``), so these tests
depend on no quantizer.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.utils._pytree as torch_pytree

from interop import keys as K
from interop.errors import NoInputQuantKeyError, QuantKeyMismatchError, QuantLayoutError
from interop.keys import ALL_KEYS, GroupShape, InputQuantScales, QuantKey, ScaleDesc, ScaleLayout
from interop.layers import expose_input_quant_key, get_input_quant_key, get_input_quant_scales
from interop.layout import data_storage, rows_cols, scale_storage_shape
from quantact_jax import activation as jact
from quantact_torch import activation as tact

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, *flags: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# ---- building activations by hand --------------------------------------------------------

RNG = np.random.default_rng(0)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def random_np(shape, dtype_name: str, rng=RNG) -> np.ndarray:
    dt = _np_dtype(dtype_name)
    n = math.prod(shape) * dt.itemsize
    return rng.integers(0, 256, size=n, dtype=np.uint8).view(dt).reshape(shape)


def np_to_torch(x: np.ndarray) -> torch.Tensor:
    """A fresh (64-byte aligned) torch tensor with the bits of ``x`` (any dtype incl. fp8)."""
    td = getattr(torch, x.dtype.name)
    if x.size == 0:
        return torch.empty(x.shape, dtype=td)
    raw = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
    return raw.view(td).reshape(x.shape).clone()


def make_jax_qa(key, orig_shape, orig_dtype="bfloat16", *, data=None, scale=None, rng=RNG):
    """A JAX QuantizedActivation; ``data``/``scale`` override ``(shape, dtype)`` of the storage."""
    m, k = rows_cols(orig_shape)
    ds, dd = data if data is not None else data_storage(key, orig_shape)
    ss, sd = scale if scale is not None else (scale_storage_shape(key.scale, m, k), key.scale.storage_dtype)
    return jact.QuantizedActivation(jnp.asarray(random_np(ds, dd, rng)), jnp.asarray(random_np(ss, sd, rng)),
                                    _np_dtype(orig_dtype), tuple(orig_shape), key)


def make_finite_jax_qa(key, orig_shape, rng=RNG):
    """A per-token fp8 JAX activation with finite values (so sums are meaningful)."""
    m, k = rows_cols(orig_shape)
    data = (rng.standard_normal(orig_shape) * 50).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.1, 1.0, (m, 1)).astype(np.float32)
    return jact.QuantizedActivation(jnp.asarray(data), jnp.asarray(scale), np.float32, orig_shape, key)


def make_torch_qa(key, orig_shape, orig_dtype="bfloat16", *, data=None, scale=None, torch_scale=None, rng=RNG):
    """A torch QuantizedActivation; the scale is vLLM's view of a storage of ``scale`` (or ``torch_scale``)."""
    m, k = rows_cols(orig_shape)
    ds, dd = data if data is not None else data_storage(key, orig_shape)
    ss, sd = scale if scale is not None else (scale_storage_shape(key.scale, m, k), key.scale.storage_dtype)
    if torch_scale is None:
        torch_scale = tact.scale_from_storage(np_to_torch(random_np(ss, sd, rng)), key, orig_shape)
    return tact.QuantizedActivation(np_to_torch(random_np(ds, dd, rng)), torch_scale,
                                    getattr(torch, orig_dtype), torch.Size(orig_shape), key)


# ---- keys --------------------------------------------------------------------------------

DTYPE_SPELLINGS = {
    "str": lambda n: n,
    "torch": lambda n: getattr(torch, n),
    "jnp_scalar_type": lambda n: getattr(jnp, n),
    "jnp_dtype": lambda n: jnp.dtype(getattr(jnp, n)),
    "numpy_ml_dtypes": _np_dtype,
    "ml_dtypes_type": lambda n: getattr(ml_dtypes, n) if hasattr(ml_dtypes, n) else getattr(np, n),
}


def _rebuild(key: QuantKey, conv) -> QuantKey:
    def desc(d: ScaleDesc | None):
        if d is None:
            return None
        return ScaleDesc(conv(d.dtype), d.static, tuple(d.group_shape), d.layout, d.ue8m0)

    return QuantKey(conv(key.dtype), desc(key.scale), desc(key.scale2), key.symmetric)


def test_all_keys_has_the_vllm_constants():
    for name in ("kFp8StaticTensorSym", "kFp8DynamicTensorSym", "kFp8DynamicTokenSym", "kFp8Dynamic128Sym",
                 "kFp8Dynamic64Sym", "kFp8StaticChannelSym", "kFp8Static128BlockSym", "kNvfp4Dynamic",
                 "kNvfp4Static", "kMxfp8Dynamic", "kMxfp8Static", "kMxfp4Dynamic", "kInt8DynamicTokenSym",
                 "kInt8StaticChannelSym"):
        assert name in ALL_KEYS, name
        assert ALL_KEYS[name] is getattr(K, name)
    assert len(set(ALL_KEYS.values())) == len(ALL_KEYS)  # all distinct
    assert K.kNvfp4Quant == K.kNvfp4Dynamic  # vLLM's older name


@pytest.mark.parametrize("spelling", sorted(DTYPE_SPELLINGS))
@pytest.mark.parametrize("name", sorted(ALL_KEYS))
def test_key_rebuilt_from_any_framework_dtype_is_the_same_key(name, spelling):
    key = ALL_KEYS[name]
    other = _rebuild(key, DTYPE_SPELLINGS[spelling])
    assert other == key and key == other
    assert hash(other) == hash(key)
    assert str(other) == str(key)
    assert {key: 1}[other] == 1
    assert isinstance(other.dtype, str) and isinstance(other.scale.dtype, str)


def test_key_mixed_spellings_equal():
    a = QuantKey(torch.float8_e4m3fn, ScaleDesc(torch.float32, False, GroupShape.PER_TOKEN))
    b = QuantKey("float8_e4m3fn", ScaleDesc(jnp.float32, False, (1, -1)))
    c = QuantKey(jnp.dtype(jnp.float8_e4m3fn), ScaleDesc(np.dtype("float32"), False, GroupShape(1, -1)))
    assert a == b == c == K.kFp8DynamicTokenSym
    assert len({hash(a), hash(b), hash(c), hash(K.kFp8DynamicTokenSym)}) == 1
    assert len({str(a), str(b), str(c)}) == 1


def _vllm_str(key: QuantKey) -> str:
    """vLLM's QuantKey.__str__ (quant_utils.py), re-implemented with torch.fx's dtype_abbrs."""
    from torch.fx.graph import dtype_abbrs

    def desc(d: ScaleDesc) -> str:
        gs = d.group_shape
        g = "per_tensor" if gs == GroupShape(-1, -1) else ("per_token" if gs == GroupShape(1, -1) else str(gs))
        return f"{dtype_abbrs[getattr(torch, d.dtype)]},{'static' if d.static else 'dynamic'},{g}"

    scale2 = f"scale2({desc(key.scale2)})," if key.scale2 else ""
    return (f"QuantKey({dtype_abbrs[getattr(torch, key.dtype)]},scale({desc(key.scale)}),{scale2}"
            f"{'a' if not key.symmetric else ''}symmetric)")


@pytest.mark.parametrize("name", sorted(ALL_KEYS))
def test_str_matches_vllm_format_for_every_constant(name):
    key = ALL_KEYS[name]
    assert str(key) == _vllm_str(key)


@pytest.mark.parametrize("key,expected", [
    (K.kFp8DynamicTokenSym, "QuantKey(f8e4m3fn,scale(f32,dynamic,per_token),symmetric)"),
    (K.kFp8Dynamic128Sym, "QuantKey(f8e4m3fn,scale(f32,dynamic,GroupShape(row=1, col=128)),symmetric)"),
    (K.kFp8StaticTensorSym, "QuantKey(f8e4m3fn,scale(f32,static,per_tensor),symmetric)"),
    (K.kFp8StaticChannelSym, "QuantKey(f8e4m3fn,scale(f32,static,GroupShape(row=-1, col=1)),symmetric)"),
    (K.kNvfp4Dynamic,
     "QuantKey(u8,scale(f8e4m3fn,dynamic,GroupShape(row=1, col=16)),scale2(f32,static,per_tensor),symmetric)"),
    (K.kMxfp8Dynamic, "QuantKey(f8e4m3fn,scale(f8e8m0fnu,dynamic,GroupShape(row=1, col=32)),symmetric)"),
    (K.kInt8DynamicTokenSym, "QuantKey(i8,scale(f32,dynamic,per_token),symmetric)"),
    (QuantKey("int8", K.kDynamicTokenScale, symmetric=False), "QuantKey(i8,scale(f32,dynamic,per_token),asymmetric)"),
])
def test_str_hand_written(key, expected):
    assert str(key) == expected


def test_layout_is_part_of_the_key():
    base = K.kFp8Dynamic128Sym
    variants = [base, base.with_layout("col_major"), base.with_layout(ScaleLayout.COL_MAJOR_TMA),
                base.with_layout("packed_ue8m0"), base.with_layout("row_major", ue8m0=True)]
    for i, a in enumerate(variants):
        for j, b in enumerate(variants):
            assert (a == b) == (i == j), (a, b)
    assert len({str(v) for v in variants}) == len(variants)
    assert len(set(variants)) == len(variants)
    assert str(base.with_layout("col_major")).endswith(
        "GroupShape(row=1, col=128),col_major),symmetric)")
    # NVFP4's default (swizzled) layout is implied, so it is invisible in str() but a row-major one is not
    assert K.kNvfp4Dynamic.scale.layout == ScaleLayout.SWIZZLED_128x4
    assert K.kNvfp4Dynamic.with_layout("row_major") != K.kNvfp4Dynamic
    assert "row_major" in str(K.kNvfp4Dynamic.with_layout("row_major"))


def test_interop_imports_neither_jax_nor_torch():
    res = _run_python("""
        import sys
        import interop, interop.keys, interop.layout, interop.dtypes, interop.errors, interop.layers
        import interop.bridge
        interop.to_jax, interop.to_torch  # lazy attributes
        from interop import QuantKey, kFp8DynamicTokenSym
        str(kFp8DynamicTokenSym); hash(kFp8DynamicTokenSym)
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'torch'))
        print('LOADED', bad)
    """)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout, res.stdout


# ---- JAX pytree ----------------------------------------------------------------------------


def _deq_jax(qa):
    """Dequantize a per-token fp8 activation (enough to make the arrays flow through a transform)."""
    return qa.data.astype(jnp.float32) * qa.scale.astype(jnp.float32)


def test_jax_flatten_unflatten():
    qa = make_jax_qa(K.kFp8DynamicTokenSym, (2, 3, 64))
    leaves, treedef = jax.tree.flatten(qa)
    assert len(leaves) == 2 and leaves[0] is qa.data and leaves[1] is qa.scale
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, jact.QuantizedActivation)
    assert back.quant_key == qa.quant_key and back.orig_shape == (2, 3, 64)
    assert back.orig_dtype == np.dtype(ml_dtypes.bfloat16)
    mapped = jax.tree.map(lambda x: x, qa)
    assert mapped.quant_key is qa.quant_key and mapped.orig_shape == qa.orig_shape
    # metadata lives in the treedef: another key gives another structure
    other = jact.QuantizedActivation(qa.data, qa.scale, qa.orig_dtype, qa.orig_shape, K.kFp8StaticTokenSym)
    assert jax.tree.structure(other) != treedef


def test_jax_jit_specialises_per_key():
    traces = []

    @jax.jit
    def f(qa):
        traces.append(qa.quant_key)
        jact.as_quantized_activation(qa, qa.quant_key)  # trace-time shape check
        return _deq_jax(qa).sum()

    a = make_finite_jax_qa(K.kFp8DynamicTokenSym, (8, 64))
    b = make_finite_jax_qa(K.kFp8DynamicTokenSym, (8, 64))  # new arrays, same key/shapes
    c = jact.QuantizedActivation(a.data, a.scale, a.orig_dtype, a.orig_shape, K.kFp8StaticTokenSym)
    ra = f(a)
    assert len(traces) == 1
    f(b)
    assert len(traces) == 1, "same key and shapes must not retrace"
    rc = f(c)
    assert len(traces) == 2 and traces[-1] == K.kFp8StaticTokenSym, "a different key must retrace"
    f(c)
    assert len(traces) == 2
    assert np.isfinite(np.asarray(ra))
    np.testing.assert_array_equal(np.asarray(ra), np.asarray(rc))
    np.testing.assert_allclose(np.asarray(ra), np.asarray(_deq_jax(a)).astype(np.float64).sum(), rtol=1e-5)


def test_jax_key_mismatch_fails_at_trace_time():
    @jax.jit
    def consumer(qa):
        jact.as_quantized_activation(qa, K.kFp8Dynamic128Sym)
        return qa.data

    with pytest.raises(QuantKeyMismatchError):
        consumer(make_jax_qa(K.kFp8DynamicTokenSym, (4, 128)))


def _stack(qas):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *qas)


@pytest.mark.parametrize("spec", ["instance", "zero"])
def test_jax_vmap(spec):
    key, shape = K.kFp8DynamicTokenSym, (8, 64)
    qas = [make_finite_jax_qa(key, shape) for _ in range(3)]
    stacked = _stack(qas)
    assert stacked.data.shape == (3, 8, 64) and stacked.scale.shape == (3, 8, 1)
    in_axes = jact.QuantizedActivation(0, 0, qas[0].orig_dtype, shape, key) if spec == "instance" else 0

    def f(qa):
        assert qa.data.shape == shape  # per-example view inside vmap
        jact.as_quantized_activation(qa, key)
        return _deq_jax(qa)

    out = jax.vmap(f, in_axes=(in_axes,))(stacked)
    for i, qa in enumerate(qas):
        np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(_deq_jax(qa)))
    # a QuantizedActivation as output: metadata is kept
    out_qa = jax.vmap(lambda qa: qa, in_axes=(in_axes,))(stacked)
    assert isinstance(out_qa, jact.QuantizedActivation) and out_qa.quant_key == key


def test_jax_scan_over_stacked_activations():
    key, shape = K.kFp8DynamicTokenSym, (4, 32)
    qas = [make_finite_jax_qa(key, shape) for _ in range(5)]

    def step(carry, qa):
        assert isinstance(qa, jact.QuantizedActivation) and qa.quant_key == key
        assert qa.data.shape == shape and qa.scale.shape == (4, 1)
        y = _deq_jax(qa)
        return carry + jnp.sum(y), y

    total, ys = jax.lax.scan(step, jnp.float32(0), _stack(qas))
    assert ys.shape == (5, *shape)
    expected = [np.asarray(_deq_jax(q)) for q in qas]
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(ys[i]), e)
    exp_total = sum(e.astype(np.float64).sum() for e in expected)
    assert np.isfinite(exp_total)
    np.testing.assert_allclose(np.asarray(total), exp_total, rtol=1e-5)


# ---- torch pytree ----------------------------------------------------------------------------


def test_torch_pytree_flatten_unflatten_and_tree_map():
    key = K.kFp8Dynamic128Sym.with_layout("col_major")
    qa = make_torch_qa(key, (2, 3, 256))
    leaves, spec = torch_pytree.tree_flatten(qa)
    assert len(leaves) == 2 and leaves[0] is qa.data and leaves[1] is qa.scale
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, tact.QuantizedActivation)
    assert back.quant_key == key and back.orig_shape == torch.Size((2, 3, 256)) and back.orig_dtype == torch.bfloat16
    cloned = torch_pytree.tree_map(lambda t: t.clone(), qa)
    assert isinstance(cloned, tact.QuantizedActivation)
    assert cloned.quant_key == key and cloned.orig_shape == qa.orig_shape and cloned.orig_dtype == qa.orig_dtype
    assert cloned.data.data_ptr() != qa.data.data_ptr()
    assert torch.equal(cloned.data.view(torch.uint8), qa.data.view(torch.uint8))
    assert cloned.scale.stride() == qa.scale.stride() == (1, 6)
    assert torch.equal(cloned.scale.view(torch.int32), qa.scale.view(torch.int32))
    cloned.validate()
    # tree_map over a container of activations
    tree = {"a": qa, "b": [qa]}
    out = torch_pytree.tree_map(lambda t: t, tree)
    assert out["b"][0].quant_key == key


# ---- as_quantized_activation ---------------------------------------------------------------------


def test_as_quantized_activation_jax_three_outcomes():
    key = K.kFp8Dynamic128Sym
    plain = jnp.zeros((4, 256), jnp.bfloat16)
    assert jact.as_quantized_activation(plain, key) is None
    assert jact.as_quantized_activation(np.zeros((4, 256), np.float32), key) is None
    qa = make_jax_qa(key, (4, 256))
    assert jact.as_quantized_activation(qa, key) is qa
    with pytest.raises(QuantKeyMismatchError) as e:
        jact.as_quantized_activation(qa, K.kFp8Dynamic128Sym.with_layout("col_major"))
    assert str(key) in str(e.value) and "col_major" in str(e.value)
    with pytest.raises(TypeError):
        jact.as_quantized_activation([1, 2], key)


def test_as_quantized_activation_torch_three_outcomes():
    key = K.kFp8DynamicTokenSym
    assert tact.as_quantized_activation(torch.zeros(4, 64), key) is None
    qa = make_torch_qa(key, (4, 64))
    assert tact.as_quantized_activation(qa, key) is qa
    with pytest.raises(QuantKeyMismatchError) as e:
        tact.as_quantized_activation(qa, K.kFp8DynamicTensorSym)
    assert str(key) in str(e.value) and str(K.kFp8DynamicTensorSym) in str(e.value)
    with pytest.raises(TypeError):
        tact.as_quantized_activation(np.zeros(3), key)


@pytest.mark.parametrize("side", ["jax", "torch"])
def test_key_mismatch_raises_under_python_O(side):
    res = _run_python(f"""
        import sys
        if sys.flags.optimize < 1:
            raise SystemExit('not running under -O')
        assert False  # vanishes under -O
        from interop import kFp8DynamicTokenSym, kFp8Dynamic128Sym, QuantKeyMismatchError
        if {side!r} == 'jax':
            import jax.numpy as jnp, numpy as np
            from quantact_jax.activation import QuantizedActivation, as_quantized_activation
            qa = QuantizedActivation(jnp.zeros((4, 128), jnp.float8_e4m3fn), jnp.ones((4, 1), jnp.float32),
                                     np.float32, (4, 128), kFp8DynamicTokenSym)
        else:
            import torch
            from quantact_torch.activation import QuantizedActivation, as_quantized_activation
            qa = QuantizedActivation(torch.zeros(4, 128).to(torch.float8_e4m3fn), torch.ones(4, 1),
                                     torch.float32, (4, 128), kFp8DynamicTokenSym)
        assert as_quantized_activation(qa, kFp8DynamicTokenSym) is qa
        try:
            as_quantized_activation(qa, kFp8Dynamic128Sym)
        except QuantKeyMismatchError as e:
            print('RAISED', type(e).__name__)
        else:
            print('NOT RAISED')
    """, "-O")
    assert res.returncode == 0, res.stderr
    assert "RAISED QuantKeyMismatchError" in res.stdout, res.stdout + res.stderr


# ---- layout checks: a table of bad inputs -------------------------------------------------------

K128 = K.kFp8Dynamic128Sym
COL = K128.with_layout("col_major")
TMA = K128.with_layout("col_major_tma")
PACKED = K128.with_layout("packed_ue8m0")
FP4_G1 = QuantKey("uint8", ScaleDesc("float8_e4m3fn", False, (1, 1)))  # a group of 1: odd K passes the group check


def _torch_view(storage_shape, strides, dtype="float32"):
    n = sum(s * (d - 1) for s, d in zip(strides, storage_shape)) + 1
    return np_to_torch(random_np((n,), dtype)).as_strided(storage_shape, strides)


BAD = [
    # id, key, orig_shape, overrides, expected substrings (both sides), frameworks
    ("data_dtype", K.kFp8DynamicTokenSym, (6, 256), dict(data=((6, 256), "int8")),
     ["(6, 256) int8", "(6, 256) float8_e4m3fn"], ("jax", "torch")),
    ("data_shape", K.kFp8DynamicTokenSym, (6, 256), dict(data=((6, 128), "float8_e4m3fn")),
     ["(6, 128) float8_e4m3fn", "(6, 256) float8_e4m3fn"], ("jax", "torch")),
    ("data_lead_dims", K.kFp8DynamicTokenSym, (2, 3, 256), dict(data=((6, 256), "float8_e4m3fn")),
     ["(6, 256) float8_e4m3fn", "(2, 3, 256) float8_e4m3fn"], ("jax", "torch")),
    ("per_tensor_scale_shape", K.kFp8StaticTensorSym, (6, 256), dict(scale=((1, 1), "float32")),
     ["(1, 1) float32", "(1,) float32"], ("jax", "torch")),
    ("per_token_scale_shape", K.kFp8DynamicTokenSym, (6, 256), dict(scale=((6,), "float32")),
     ["(6,) float32", "(6, 1) float32"], ("jax", "torch")),
    ("per_group_scale_shape", K128, (6, 256), dict(scale=((6, 1), "float32")),
     ["(6, 1) float32", "(6, 2) float32"], ("jax", "torch")),
    ("scale_dtype", K.kFp8DynamicTokenSym, (6, 256), dict(scale=((6, 1), "bfloat16")),
     ["(6, 1) bfloat16", "(6, 1) float32"], ("jax", "torch")),
    ("swizzled_unpadded", K.kNvfp4Dynamic, (6, 64), dict(scale=((6, 4), "float8_e4m3fn")),
     ["(6, 4) float8_e4m3fn", "(128, 4) float8_e4m3fn", "swizzled_128x4"], ("jax", "torch")),
    ("swizzled_mx_scale_dtype", K.kMxfp8Dynamic, (6, 64), dict(scale=((128, 4), "float32")),
     ["(128, 4) float32", "(128, 4) float8_e8m0fnu"], ("jax", "torch")),
    ("col_major_storage_row_major_shape", COL, (6, 256), dict(scale=((6, 2), "float32")),
     ["(6, 2) float32", "(2, 6) float32", "col_major"], ("jax",)),
    ("tma_unpadded", TMA, (6, 256), dict(scale=((2, 6), "float32")),
     ["(2, 6) float32", "(2, 8) float32"], ("jax",)),
    ("packed_ue8m0_dtype", PACKED, (6, 1024), dict(scale=((2, 8), "float32")),
     ["(2, 8) float32", "(2, 8) int32"], ("jax", "torch")),
    ("torch_col_major_given_row_major", COL, (6, 256),
     dict(torch_scale=lambda: np_to_torch(random_np((6, 2), "float32"))),
     ["(6, 2)", "strides (2, 1)", "strides (1, 6)"], ("torch",)),
    ("torch_tma_given_unpadded_view", TMA, (6, 256),
     dict(torch_scale=lambda: _torch_view((6, 2), (1, 6))),
     ["strides (1, 6)", "strides (1, 8)"], ("torch",)),
    ("torch_tma_single_group_unpadded", TMA, (6, 128),
     dict(torch_scale=lambda: np_to_torch(random_np((6, 1), "float32"))),
     ["(6, 1) tensor", "(1, 8)"], ("torch",)),
    ("fp4_odd_k", FP4_G1, (6, 33), dict(data=((6, 16), "uint8"), scale=((6, 33), "float8_e4m3fn")),
     ["even", "(6, 33)"], ("jax", "torch")),
    ("k_not_multiple_of_group", K128, (6, 200), dict(data=((6, 200), "float8_e4m3fn"), scale=((6, 2), "float32")),
     ["K=200", "128"], ("jax", "torch")),
    ("nvfp4_k_not_multiple_of_16", K.kNvfp4Dynamic, (6, 40), dict(data=((6, 20), "uint8"),
                                                                 scale=((128, 4), "float8_e4m3fn")),
     ["K=40", "16"], ("jax", "torch")),
    ("non_float_orig_dtype", K.kFp8DynamicTokenSym, (6, 256), dict(orig_dtype="int8"),
     ["int8", "float32", "bfloat16"], ("jax", "torch")),
]


BAD_PARAMS = [pytest.param(case, side, id=f"{case[0]}-{side}") for case in BAD for side in case[5]]


@pytest.mark.parametrize("case,side", BAD_PARAMS)
def test_bad_activation_raises_layout_error_naming_both_sides(case, side):
    _, key, orig_shape, over, expected, _ = case
    over = dict(over)
    if "torch_scale" in over:
        over["torch_scale"] = over["torch_scale"]()
    qa = make_jax_qa(key, orig_shape, **over) if side == "jax" else make_torch_qa(key, orig_shape, **over)
    mod = jact if side == "jax" else tact
    with pytest.raises(QuantLayoutError) as e:
        mod.as_quantized_activation(qa, key)
    msg = str(e.value)
    for s in expected:
        assert s in msg, f"{s!r} not in {msg!r}"
    with pytest.raises(QuantLayoutError):
        qa.validate()


@pytest.mark.parametrize("key", [K.kFp8StaticTensorSym, K.kFp8DynamicTokenSym, K128, COL, TMA, PACKED,
                                 K.kNvfp4Dynamic, K.kMxfp8Dynamic, K.kMxfp4Dynamic, K.kInt8DynamicTokenSym,
                                 K.kFp8StaticChannelSym, K.kFp8Static128BlockSym],
                         ids=str)
@pytest.mark.parametrize("orig_shape", [(1, 1024), (5, 1024), (2, 65, 1024), (0, 1024)])
def test_valid_hand_built_activations_pass(key, orig_shape):
    for qa, mod in ((make_jax_qa(key, orig_shape), jact), (make_torch_qa(key, orig_shape), tact)):
        assert mod.as_quantized_activation(qa, key) is qa


def test_torch_scale_view_is_vllm_col_major():
    qa = make_torch_qa(TMA, (2, 5, 256))
    m = 10
    assert tuple(qa.scale.shape) == (m, 2) and qa.scale.stride() == (1, 12)
    st = qa.scale_storage()
    assert tuple(st.shape) == (2, 12) and st.is_contiguous() and st.data_ptr() == qa.scale.data_ptr()


def test_data_storage_odd_k_fp4():
    with pytest.raises(QuantLayoutError, match="even"):
        data_storage(K.kNvfp4Dynamic, (4, 33))
    assert data_storage(K.kNvfp4Dynamic, (2, 4, 64)) == ((2, 4, 32), "uint8")


# ---- key and scales on layers -------------------------------------------------------------------


class KernelWithKey:
    input_quant_key = K.kFp8StaticTensorSym

    def __init__(self, scale):
        self.scale = scale

    def input_quant_scales(self, layer):
        return InputQuantScales(input_scale=self.scale)


class Nvfp4Kernel:
    input_quant_key = K.kNvfp4Dynamic

    def input_quant_scales(self, layer):
        return InputQuantScales(global_scale=layer.weight_global)


class KernelWithoutKey:
    pass


class Layer:
    weight_global = 2.5


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_expose_input_quant_key(framework):
    mod = jact if framework == "jax" else tact
    s = jnp.full((1,), 0.5, jnp.float32) if framework == "jax" else torch.full((1,), 0.5)
    layer = Layer()
    assert mod.get_input_quant_key(layer) is None
    with pytest.raises(NoInputQuantKeyError):
        mod.get_input_quant_key(layer, required=True)
    with pytest.raises(NoInputQuantKeyError):
        mod.get_input_quant_scales(layer)

    assert mod.expose_input_quant_key(layer, KernelWithKey(s)) == K.kFp8StaticTensorSym
    assert mod.get_input_quant_key(layer, required=True) == K.kFp8StaticTensorSym
    scales = mod.get_input_quant_scales(layer)
    assert scales.input_scale is s and scales.global_scale is None

    other = Layer()
    assert mod.expose_input_quant_key(other, Nvfp4Kernel()) == K.kNvfp4Dynamic
    assert mod.get_input_quant_scales(other).global_scale == 2.5

    plain = Layer()
    assert mod.expose_input_quant_key(plain, KernelWithoutKey()) is None
    assert mod.get_input_quant_key(plain) is None
    with pytest.raises(NoInputQuantKeyError, match="exposes no input quantization key"):
        mod.get_input_quant_key(plain, required=True)
    with pytest.raises(NoInputQuantKeyError):
        mod.get_input_quant_scales(plain)


def test_expose_input_quant_key_on_frozen_dataclass_and_errors():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        n: int = 1

    layer = Frozen()
    expose_input_quant_key(layer, KernelWithKey(0.5))
    assert get_input_quant_key(layer) == K.kFp8StaticTensorSym
    assert get_input_quant_scales(layer).input_scale == 0.5

    class StaticNoScale:
        input_quant_key = K.kFp8StaticTensorSym

    with pytest.raises(ValueError, match="no input_scale"):
        expose_input_quant_key(Layer(), StaticNoScale())

    class BadKey:
        input_quant_key = "fp8"

    with pytest.raises(TypeError):
        expose_input_quant_key(Layer(), BadKey())
