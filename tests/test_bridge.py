"""The DLPack bridge (``interop.bridge``): zero-copy round trips of plain tensors and
``QuantizedActivation`` between PyTorch and JAX, and its errors.

Conventions:
- "zero-copy" is checked as pointer equality (torch ``data_ptr()`` vs JAX ``unsafe_buffer_pointer()``)
  on 64-byte-aligned buffers (fresh torch CPU allocations are; see ``test_unaligned_*`` for the rest).
- 0-size tensors are part of the property tests: they must cross with shape and dtype intact, but they
  own no bytes, so no pointer is compared for them.
- Bits are compared as raw bytes in logical (C) order, so NaN payloads and fp8 NaN/inf patterns count.
- Runs on CPU; on a CUDA machine JAX-born arrays live on the GPU, so the same tests cover CUDA
  there, plus the ``gpu``-marked ones.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interop import bridge
from interop import keys as K
from interop.bridge import BRIDGE_DTYPES, BridgeCopyWarning, is_compact, to_jax, to_torch
from interop.errors import BridgeError, QuantLayoutError
from interop.layout import data_storage, rows_cols, scale_storage_shape
from quantact_jax.activation import QuantizedActivation as JaxQA
from quantact_torch.activation import QuantizedActivation as TorchQA
from quantact_torch.activation import scale_from_storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu")
COL_LAYOUTS = (K.ScaleLayout.COL_MAJOR, K.ScaleLayout.COL_MAJOR_TMA, K.ScaleLayout.PACKED_UE8M0)


# ---- helpers -------------------------------------------------------------------------------


def np_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def torch_from_bytes(raw: bytes, dtype_name: str, shape) -> torch.Tensor:
    """A fresh, 64-byte-aligned torch tensor holding ``raw`` (C order)."""
    td = getattr(torch, dtype_name)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=td)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(td).reshape(shape).clone()
    assert t.data_ptr() % 64 == 0
    return t


def jax_from_bytes(raw: bytes, dtype_name: str, shape) -> jax.Array:
    return jnp.asarray(np.frombuffer(raw, dtype=np.uint8).view(np_dtype(dtype_name)).reshape(shape))


def random_bytes(n: int, rng) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def torch_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def jax_bytes(a: jax.Array) -> bytes:
    return np.asarray(a).tobytes()


def ptr(x) -> int:
    return x.data_ptr() if isinstance(x, torch.Tensor) else x.unsafe_buffer_pointer()


def name(dt) -> str:
    return str(dt).removeprefix("torch.") if isinstance(dt, torch.dtype) else np.dtype(dt).name


def assert_shared(a, b):
    """Same dtype, shape, bits and (for non-empty) buffer."""
    assert name(a.dtype) == name(b.dtype)
    assert tuple(a.shape) == tuple(b.shape)
    ba = torch_bytes(a) if isinstance(a, torch.Tensor) else jax_bytes(a)
    bb = torch_bytes(b) if isinstance(b, torch.Tensor) else jax_bytes(b)
    assert ba == bb
    if math.prod(a.shape):
        assert ptr(a) == ptr(b), "buffer was copied, not shared"


# ---- plain tensors, every dtype ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", BRIDGE_DTYPES)
def test_torch_jax_torch_round_trip(dtype):
    itemsize = np_dtype(dtype).itemsize
    raw = bytes(range(256)) * 4 if itemsize == 1 else random_bytes(1024 * itemsize, np.random.default_rng(1))
    t = torch_from_bytes(raw, dtype, (16, 64) if itemsize == 1 else (32, 32))
    a = to_jax(t)
    assert isinstance(a, jax.Array) and name(a.dtype) == dtype
    assert_shared(t, a)
    t2 = to_torch(a)
    assert isinstance(t2, torch.Tensor) and t2.dtype == t.dtype
    assert_shared(a, t2)
    assert t2.data_ptr() == t.data_ptr() and t2.stride() == t.stride()


@pytest.mark.parametrize("dtype", BRIDGE_DTYPES)
def test_jax_torch_jax_round_trip(dtype):
    itemsize = np_dtype(dtype).itemsize
    raw = bytes(range(256)) * 3 if itemsize == 1 else random_bytes(768 * itemsize, np.random.default_rng(2))
    a = jax_from_bytes(raw, dtype, (3, 256) if itemsize == 1 else (24, 32))
    t = to_torch(a)
    assert isinstance(t, torch.Tensor) and name(t.dtype) == dtype
    assert_shared(a, t)
    a2 = to_jax(t)
    assert a2.dtype == a.dtype
    assert_shared(t, a2)
    assert a2.unsafe_buffer_pointer() == a.unsafe_buffer_pointer()


@pytest.mark.parametrize("dtype", FP8)
def test_all_256_fp8_bit_patterns(dtype):
    codes = np.arange(256, dtype=np.uint8)
    t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(getattr(torch, dtype))
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), codes)
    t2 = to_torch(a)
    assert t2.data_ptr() == t.data_ptr()
    np.testing.assert_array_equal(t2.view(torch.uint8).numpy(), codes)
    # and starting from JAX
    a0 = jnp.asarray(codes.view(np_dtype(dtype)))
    np.testing.assert_array_equal(np.asarray(a0).view(np.uint8), codes)
    t3 = to_torch(a0)
    assert t3.data_ptr() == a0.unsafe_buffer_pointer()
    np.testing.assert_array_equal(t3.view(torch.uint8).cpu().numpy(), codes)
    a3 = to_jax(t3)
    assert a3.unsafe_buffer_pointer() == a0.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(a3).view(np.uint8), codes)
    # special values are the same numbers on both sides (NaN stays NaN, e5m2 inf stays inf)
    vals_j = np.asarray(a3).astype(np.float32)
    vals_t = t3.float().cpu().numpy()
    np.testing.assert_array_equal(vals_j, vals_t)


def test_transposed_tensor_is_zero_copy_and_keeps_strides():
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    t = base.T
    a = to_jax(t)
    assert a.shape == (8, 6) and a.unsafe_buffer_pointer() == base.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    np.testing.assert_array_equal(np.asarray(a + 0), t.numpy())  # usable by XLA
    back = to_torch(a)
    assert back.stride() == t.stride() and back.data_ptr() == base.data_ptr()


def test_requires_grad_tensor_is_shared():
    t = torch.randn(16, 16, requires_grad=True)
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), t.detach().numpy())


def test_same_framework_input_is_returned_unchanged():
    t = torch.ones(3)
    a = jnp.ones(3)
    assert to_torch(t) is t and to_jax(a) is a
    qa = make_torch_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    assert to_torch(qa) is qa
    jqa = make_jax_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    assert to_jax(jqa) is jqa


def test_copy_true_gives_independent_buffers():
    t = torch.arange(64, dtype=torch.float32)
    a = to_jax(t, copy=True)
    assert a.unsafe_buffer_pointer() != t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    t.add_(1)  # allowed: the copy does not see it
    np.testing.assert_array_equal(np.asarray(a), np.arange(64, dtype=np.float32))
    b = jnp.arange(64, dtype=jnp.float32)
    tb = to_torch(b, copy=True)
    assert tb.data_ptr() != b.unsafe_buffer_pointer()
    tb.add_(1)
    np.testing.assert_array_equal(np.asarray(b), np.arange(64, dtype=np.float32))


# ---- property tests: plain arrays -----------------------------------------------------------------


@st.composite
def plain_case(draw):
    dtype = draw(st.sampled_from(BRIDGE_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)))
    n = math.prod(shape) * np_dtype(dtype).itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    perm = tuple(draw(st.permutations(range(len(shape)))))
    return dtype, shape, raw, perm


@HYP
@given(plain_case())
def test_property_plain_torch_to_jax_and_back(case):
    dtype, shape, raw, perm = case
    t = torch_from_bytes(raw, dtype, tuple(shape[p] for p in perm))
    inv = tuple(np.argsort(perm))
    t = t.permute(inv) if shape else t  # compact, possibly not row-major
    assert tuple(t.shape) == shape
    a = to_jax(t)
    assert_shared(t, a)
    back = to_torch(a)
    assert_shared(a, back)
    if math.prod(shape):
        assert back.data_ptr() == t.data_ptr()
        assert [s for s, d in zip(back.stride(), shape) if d > 1] == [s for s, d in zip(t.stride(), shape) if d > 1]


@HYP
@given(plain_case())
def test_property_plain_jax_to_torch_and_back(case):
    dtype, shape, raw, _ = case
    a = jax_from_bytes(raw, dtype, shape)
    t = to_torch(a)
    assert_shared(a, t)
    back = to_jax(t)
    assert_shared(t, back)
    if math.prod(shape):
        assert back.unsafe_buffer_pointer() == a.unsafe_buffer_pointer()


# ---- QuantizedActivation -----------------------------------------------------------------------------

QA_KEYS = [
    K.kFp8StaticTensorSym, K.kFp8DynamicTokenSym, K.kFp8Dynamic128Sym, K.kFp8Dynamic64Sym,
    K.kFp8Dynamic128Sym.with_layout("col_major"), K.kFp8Dynamic128Sym.with_layout("col_major_tma"),
    K.kFp8Dynamic128Sym.with_layout("packed_ue8m0"), K.kFp8Dynamic64Sym.with_layout("col_major_tma"),
    K.kNvfp4Dynamic, K.kNvfp4Dynamic.with_layout("row_major"), K.kMxfp8Dynamic, K.kMxfp4Dynamic,
    K.kInt8DynamicTokenSym, K.kFp8Static128BlockSym,
]


def make_torch_qa(key, orig_shape, orig_dtype, rng):
    m, k = rows_cols(orig_shape)
    ds, dd = data_storage(key, orig_shape)
    ss, sd = scale_storage_shape(key.scale, m, k), key.scale.storage_dtype
    data = torch_from_bytes(random_bytes(math.prod(ds) * np_dtype(dd).itemsize, rng), dd, ds)
    storage = torch_from_bytes(random_bytes(math.prod(ss) * np_dtype(sd).itemsize, rng), sd, ss)
    return TorchQA(data, scale_from_storage(storage, key, orig_shape), getattr(torch, orig_dtype),
                   torch.Size(orig_shape), key).validate()


def make_jax_qa(key, orig_shape, orig_dtype, rng):
    m, k = rows_cols(orig_shape)
    ds, dd = data_storage(key, orig_shape)
    ss, sd = scale_storage_shape(key.scale, m, k), key.scale.storage_dtype
    data = jax_from_bytes(random_bytes(math.prod(ds) * np_dtype(dd).itemsize, rng), dd, ds)
    scale = jax_from_bytes(random_bytes(math.prod(ss) * np_dtype(sd).itemsize, rng), sd, ss)
    return JaxQA(data, scale, np_dtype(orig_dtype), tuple(orig_shape), key).validate()


@st.composite
def qa_case(draw):
    key = draw(st.sampled_from(QA_KEYS))
    lead = draw(st.lists(st.integers(0, 12), min_size=1, max_size=3).filter(lambda v: math.prod(v) <= 160))
    g = key.group_size
    if g is None:
        k = draw(st.integers(1, 300))
    else:
        k = g * draw(st.integers(1, 6))
    orig_dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return key, (*lead, k), orig_dtype, seed


def check_torch_qa_equals_jax_qa(tqa: TorchQA, jqa: JaxQA):
    assert tqa.quant_key == jqa.quant_key
    assert tuple(tqa.orig_shape) == jqa.orig_shape
    assert name(tqa.orig_dtype) == jqa.orig_dtype.name
    assert_shared(tqa.data, jqa.data)
    storage = tqa.scale_storage()
    assert storage.is_contiguous()
    assert_shared(storage, jqa.scale)
    # vLLM's view over that storage
    lay = tqa.quant_key.scale.layout
    if lay in COL_LAYOUTS:
        m, _ = rows_cols(jqa.orig_shape)
        assert tuple(tqa.scale.shape) == (m, jqa.scale.shape[0])
        assert tqa.scale.stride() == (1, jqa.scale.shape[1])
    else:
        assert tuple(tqa.scale.shape) == jqa.scale.shape and tqa.scale.is_contiguous()


@HYP
@given(qa_case())
def test_property_qa_torch_to_jax_and_back(case):
    key, orig_shape, orig_dtype, seed = case
    tqa = make_torch_qa(key, orig_shape, orig_dtype, np.random.default_rng(seed))
    jqa = to_jax(tqa)
    assert isinstance(jqa, JaxQA)
    assert jqa.orig_dtype == np_dtype(orig_dtype) and jqa.orig_shape == tuple(orig_shape)
    check_torch_qa_equals_jax_qa(tqa, jqa)
    back = to_torch(jqa)
    assert isinstance(back, TorchQA)
    check_torch_qa_equals_jax_qa(back, jqa)
    assert back.orig_dtype == tqa.orig_dtype and back.orig_shape == tqa.orig_shape
    assert back.quant_key == tqa.quant_key
    assert tuple(back.scale.shape) == tuple(tqa.scale.shape) and back.scale.stride() == tqa.scale.stride()
    if tqa.data.numel():
        assert back.data.data_ptr() == tqa.data.data_ptr()
    if tqa.scale.numel():
        assert back.scale.data_ptr() == tqa.scale.data_ptr()
    assert torch_bytes(back.scale_storage()) == torch_bytes(tqa.scale_storage())


@HYP
@given(qa_case())
def test_property_qa_jax_to_torch_and_back(case):
    key, orig_shape, orig_dtype, seed = case
    jqa = make_jax_qa(key, orig_shape, orig_dtype, np.random.default_rng(seed))
    tqa = to_torch(jqa)
    assert isinstance(tqa, TorchQA) and tqa.orig_dtype == getattr(torch, orig_dtype)
    assert tqa.orig_shape == torch.Size(orig_shape)
    check_torch_qa_equals_jax_qa(tqa, jqa)
    back = to_jax(tqa)
    assert back.quant_key == jqa.quant_key and back.orig_shape == jqa.orig_shape
    assert back.orig_dtype == jqa.orig_dtype
    for x, y in ((back.data, jqa.data), (back.scale, jqa.scale)):
        assert x.shape == y.shape and x.dtype == y.dtype and jax_bytes(x) == jax_bytes(y)
        if x.size:
            assert x.unsafe_buffer_pointer() == y.unsafe_buffer_pointer()


@pytest.mark.parametrize("key", QA_KEYS, ids=str)
def test_qa_round_trip_each_layout(key):
    """Deterministic companion of the property test: one 3-D activation per key, M not a multiple of 4."""
    g = key.group_size or 128
    orig = (3, 7, 4 * g)
    tqa = make_torch_qa(key, orig, "bfloat16", np.random.default_rng(7))
    jqa = to_jax(tqa)
    check_torch_qa_equals_jax_qa(tqa, jqa)
    assert jqa.data.unsafe_buffer_pointer() == tqa.data.data_ptr()
    assert jqa.scale.unsafe_buffer_pointer() == tqa.scale.data_ptr()
    back = to_torch(jqa)
    assert back.scale.stride() == tqa.scale.stride() and back.scale.data_ptr() == tqa.scale.data_ptr()
    if key.scale.layout == K.ScaleLayout.COL_MAJOR_TMA:
        assert tqa.scale.stride() == (1, 24)  # M=21 padded to 24
    if key.scale.layout == K.ScaleLayout.PACKED_UE8M0:
        assert back.scale.dtype == torch.int32 and tuple(back.scale.shape) == (21, 1)


def test_qa_validation_through_the_bridge():
    key = K.kFp8DynamicTokenSym
    tqa = make_torch_qa(key, (6, 64), "float32", np.random.default_rng(0))
    bad = TorchQA(tqa.data, tqa.scale.reshape(6), tqa.orig_dtype, tqa.orig_shape, key)  # (6,) not (6, 1)
    with pytest.raises(QuantLayoutError, match=r"\(6,\) float32"):
        to_jax(bad)
    j = to_jax(bad, validate=False)  # explicit opt-out: carried as is
    assert j.scale.shape == (6,)
    with pytest.raises(QuantLayoutError):
        to_torch(j)
    col = K.kFp8Dynamic128Sym.with_layout("col_major")
    good = make_torch_qa(col, (6, 256), "float32", np.random.default_rng(0))
    row_major = TorchQA(good.data, good.scale.contiguous(), good.orig_dtype, good.orig_shape, col)
    with pytest.raises(QuantLayoutError, match="strides"):
        to_jax(row_major)


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: torch.arange(32, dtype=torch.float32)[::2],
    lambda: torch.arange(48, dtype=torch.float32).reshape(6, 8)[:, ::2],
    lambda: torch.arange(48, dtype=torch.uint8).reshape(6, 8)[::2],
    lambda: torch.arange(8, dtype=torch.float32).expand(3, 8),
    lambda: torch.zeros(4, 4, dtype=torch.float8_e4m3fn).as_strided((4, 4), (2, 1)),  # overlapping
], ids=["step2", "cols_step2", "rows_step2_uint8", "expand", "overlap"])
def test_non_compact_strides_raise(make):
    t = make()
    with pytest.raises(BridgeError, match="non-compact strides"):
        to_jax(t)
    with pytest.raises(BridgeError, match="non-compact strides"):
        to_jax(t, copy=False)
    c = to_jax(t, copy=True)  # an explicit copy is allowed
    assert c.shape == tuple(t.shape) and jax_bytes(c) == torch_bytes(t)


def test_non_compact_qa_data_raises():
    tqa = make_torch_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    wide = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)[:, ::2]
    bad = TorchQA(wide, tqa.scale, tqa.orig_dtype, tqa.orig_shape, tqa.quant_key)
    with pytest.raises(BridgeError, match="QuantizedActivation.data.*non-compact"):
        to_jax(bad)


def test_is_compact():
    assert is_compact((2, 3), (3, 1)) and is_compact((2, 3), (1, 2)) and is_compact((4, 1), (1, 7))
    assert is_compact((0, 5), (123, 9)) and is_compact((), ())
    assert not is_compact((2, 3), (6, 1)) and not is_compact((2, 3), (0, 1)) and not is_compact((2, 2), (1, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.int64, torch.bool, torch.int16,
                                   torch.float4_e2m1fn_x2])
def test_unsupported_torch_dtype_raises(dtype):
    t = torch.zeros(8, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(8, dtype=dtype)
    with pytest.raises(BridgeError, match="does not cross"):
        to_jax(t)


@pytest.mark.parametrize("dtype", [jnp.float4_e2m1fn, jnp.int16, jnp.bool_, jnp.complex64])
def test_unsupported_jax_dtype_raises(dtype):
    with pytest.raises(BridgeError, match="does not cross"):
        to_torch(jnp.zeros(8, dtype))


@pytest.mark.parametrize("x", [np.zeros(3, np.float32), [1.0, 2.0], 3.0, None, "tensor"])
def test_wrong_input_types_raise(x):
    with pytest.raises(BridgeError, match="to_jax takes"):
        to_jax(x)
    with pytest.raises(BridgeError, match="to_torch takes"):
        to_torch(x)


def test_qa_with_non_tensor_leaves_raises():
    tqa = make_torch_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    with pytest.raises(BridgeError, match="must be a torch.Tensor"):
        to_jax(TorchQA(tqa.data.view(torch.uint8).numpy(), tqa.scale, tqa.orig_dtype, tqa.orig_shape, tqa.quant_key))
    jqa = make_jax_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    with pytest.raises(BridgeError, match="must be a jax.Array"):
        to_torch(JaxQA(np.asarray(jqa.data), jqa.scale, jqa.orig_dtype, jqa.orig_shape, jqa.quant_key))


def test_tracer_raises():
    @jax.jit
    def f(x):
        return to_torch(x)

    with pytest.raises(BridgeError, match="tracer"):
        f(jnp.ones(3))


def test_data_and_scale_on_different_devices_raise_torch():
    # CPU-only stand-in for cuda/cpu: the meta device
    tqa = make_torch_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    bad = TorchQA(tqa.data, tqa.scale.to("meta"), tqa.orig_dtype, tqa.orig_shape, tqa.quant_key)
    with pytest.raises(BridgeError, match="data is on cpu but scale on meta"):
        to_jax(bad)
    with pytest.raises(BridgeError, match="meta"):
        to_jax(torch.zeros(3, device="meta"))


def test_data_and_scale_on_different_devices_raise_jax():
    """Two virtual CPU devices (needs a fresh process: the flag is read when jax starts)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from interop import kFp8DynamicTokenSym
        from interop.bridge import to_torch
        from interop.errors import BridgeError
        from quantact_jax.activation import QuantizedActivation
        d0, d1 = jax.devices()[:2]
        data = jax.device_put(jnp.zeros((4, 64), jnp.float8_e4m3fn), d0)
        scale = jax.device_put(jnp.ones((4, 1), jnp.float32), d1)
        qa = QuantizedActivation(data, scale, np.float32, (4, 64), kFp8DynamicTokenSym)
        try:
            to_torch(qa)
        except BridgeError as e:
            assert 'data is on' in str(e), e
            print('DEVICES-RAISED')
        ok = QuantizedActivation(data, jax.device_put(scale, d0), np.float32, (4, 64), kFp8DynamicTokenSym)
        t = to_torch(ok)
        assert t.data.data_ptr() == data.unsafe_buffer_pointer()
        on_d1 = jax.device_put(jnp.arange(16.0), d1)
        assert to_torch(on_d1).data_ptr() == on_d1.unsafe_buffer_pointer()
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('x',))
        sharded = jax.device_put(jnp.arange(16.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x')))
        try:
            to_torch(sharded)
        except BridgeError as e:
            assert 'spans 2 devices' in str(e), e
            print('SHARDED-RAISED')
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "DEVICES-RAISED" in res.stdout and "SHARDED-RAISED" in res.stdout, res.stdout + res.stderr


def test_dtype_that_does_not_cross_in_some_version_raises(monkeypatch):
    """Simulates a jax/torch pair whose DLPack lacks a dtype: a clear BridgeError, no silent copy."""
    def no_fp8(x, *a, **kw):
        raise BufferError("Unsupported DLPack dtype float8_e8m0fnu")

    t = torch.zeros(64, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    a = jnp.zeros(64, jnp.float8_e8m0fnu)
    monkeypatch.setattr(jax.dlpack, "from_dlpack", no_fp8)
    monkeypatch.setattr(torch, "from_dlpack", no_fp8)
    with pytest.raises(BridgeError, match="could not be imported into JAX.*Unsupported DLPack dtype"):
        to_jax(t)
    with pytest.raises(BridgeError, match="could not be imported into torch.*Unsupported DLPack dtype"):
        to_torch(a)


# ---- alignment (CPU) --------------------------------------------------------------------------------


def test_unaligned_cpu_buffer_is_copied_with_a_warning():
    buf = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert buf.data_ptr() % 64 == 0
    t = buf[1:]  # 1 byte past a 64-byte boundary
    with pytest.warns(BridgeCopyWarning, match="not 64-byte aligned"):
        a = to_jax(t)
    assert a.unsafe_buffer_pointer() != t.data_ptr()  # XLA's CPU client copied it
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    with pytest.raises(BridgeError, match="not 64-byte aligned"):
        to_jax(t, copy=False)
    f = torch.arange(64, dtype=torch.float32)[1:]  # 4 bytes off
    with pytest.warns(BridgeCopyWarning):
        to_jax(f)


def test_aligned_offset_view_is_shared_without_warning():
    buf = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    t = buf[64:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BridgeCopyWarning)
        a = to_jax(t, copy=False)
    assert a.unsafe_buffer_pointer() == t.data_ptr() == buf.data_ptr() + 64
    np.testing.assert_array_equal(np.asarray(a), np.arange(64, 256))


# ---- lifetime --------------------------------------------------------------------------------------


def _churn():
    gc.collect()
    # reuse freed memory of similar sizes, so a dangling buffer would show garbage
    return [torch.full((4096,), 7, dtype=torch.float32) for _ in range(64)] + \
           [jnp.full((4096,), 7.0).block_until_ready() for _ in range(16)]


def test_torch_source_deleted_jax_result_still_valid():
    t = torch.arange(4096, dtype=torch.float32)
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    del t
    junk = _churn()
    np.testing.assert_array_equal(np.asarray(a), np.arange(4096, dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(a * 2), 2 * np.arange(4096, dtype=np.float32))
    del junk


def test_jax_source_deleted_torch_result_still_valid():
    a = jnp.arange(4096, dtype=jnp.float32)
    t = to_torch(a)
    assert t.data_ptr() == a.unsafe_buffer_pointer()
    del a
    junk = _churn()
    np.testing.assert_array_equal(t.cpu().numpy(), np.arange(4096, dtype=np.float32))
    del junk


def test_qa_sources_deleted_results_still_valid():
    key = K.kFp8Dynamic128Sym.with_layout("col_major_tma")
    tqa = make_torch_qa(key, (5, 512), "bfloat16", np.random.default_rng(3))
    want_data, want_scale = torch_bytes(tqa.data), torch_bytes(tqa.scale_storage())
    jqa = to_jax(tqa)
    del tqa
    junk = _churn()
    assert jax_bytes(jqa.data) == want_data and jax_bytes(jqa.scale) == want_scale
    back = to_torch(jqa)
    del jqa
    junk += _churn()
    assert torch_bytes(back.data) == want_data and torch_bytes(back.scale_storage()) == want_scale
    assert back.scale.stride() == (1, 8)
    del junk


# ---- CUDA ------------------------------------------------------------------------------------------


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _jax_has_gpu()), reason="needs CUDA in torch and jax")


@pytest.mark.gpu
@gpu
def test_gpu_data_and_scale_on_different_devices_raise():
    tqa = make_torch_qa(K.kFp8DynamicTokenSym, (4, 64), "bfloat16", np.random.default_rng(0))
    bad = TorchQA(tqa.data.cuda(), tqa.scale, tqa.orig_dtype, tqa.orig_shape, tqa.quant_key)
    with pytest.raises(BridgeError, match="data is on cuda:0 but scale on cpu"):
        to_jax(bad)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", BRIDGE_DTYPES)
def test_gpu_round_trip_zero_copy(dtype):
    t = torch.arange(4096, dtype=torch.int32).to(torch.uint8).view(getattr(torch, dtype)).cuda()
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    assert list(a.devices())[0].platform == "gpu"
    back = to_torch(a)
    assert back.data_ptr() == t.data_ptr() and back.device == t.device
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_bridge_module_documents_the_read_only_rule():
    for f in (bridge, to_jax, to_torch):
        assert "read-only" in f.__doc__.lower().replace("**", "")


# ---- several tensors per call (tensors_to_jax / arrays_to_torch, the lean path) -------------


@pytest.fixture(params=["lean", "public"])
def lean(request):
    prev = bridge.set_lean_dlpack(request.param == "lean")
    yield request.param == "lean"
    bridge.set_lean_dlpack(prev)


@pytest.mark.parametrize("joint", [False, True])
def test_tensors_to_jax_is_to_jax_for_many(lean, joint):
    ts = [torch_from_bytes(np.random.default_rng(i).bytes(4 * 6 * 64), "float32", (6, 64)) for i in range(2)]
    ts += [None, torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128),
           torch.randn(3, 5).bfloat16().t()]  # a transposed (compact) tensor crosses too
    out = bridge.tensors_to_jax(ts, joint=joint)
    assert out[2] is None
    for t, a in zip(ts, out):
        if t is not None:
            assert isinstance(a, jax.Array) and a.shape == tuple(t.shape) and a.dtype == to_jax(t).dtype
            assert a.unsafe_buffer_pointer() == t.data_ptr()
            assert jax_bytes(a) == torch_bytes(t)
    assert bridge.lean_dlpack_status()["devices"]["cpu"] is lean
    back = bridge.arrays_to_torch(out)
    for t, b in zip(ts, back):
        assert (b is None) if t is None else (b.data_ptr() == t.data_ptr() and b.dtype == t.dtype)
    assert bridge.tensors_to_jax([None, None]) == (None, None)


def test_tensors_to_jax_errors_match_to_jax(lean):
    good = torch.zeros(4, 64)
    for bad, match in ((torch.zeros(4, dtype=torch.float64), "float64"), (torch.zeros(8, 64)[:, ::2], "non-compact"),
                       (np.zeros(3, np.float32), "torch.Tensor"), (torch.zeros(4, device="meta"), "meta")):
        with pytest.raises(BridgeError, match=match):
            bridge.tensors_to_jax([good, bad])
    with pytest.raises(BridgeError, match="jax.Array"):
        bridge.arrays_to_torch([jnp.zeros(3), "x"])
    with pytest.raises(BridgeError, match="int16"):
        bridge.arrays_to_torch([jnp.zeros(3), jnp.zeros(2, jnp.int16)])


def test_tensors_to_jax_unaligned_cpu_buffer(lean):
    """An unaligned CPU buffer goes through to_jax: copied with a warning, or an error with copy=False."""
    buf = torch.arange(200, dtype=torch.uint8)
    unaligned, aligned = buf[1:129], torch.arange(64, dtype=torch.uint8)
    with pytest.warns(BridgeCopyWarning):
        a, b = bridge.tensors_to_jax([aligned, unaligned])
    assert a.unsafe_buffer_pointer() == aligned.data_ptr() and b.unsafe_buffer_pointer() != unaligned.data_ptr()
    np.testing.assert_array_equal(np.asarray(b), unaligned.numpy())
    with pytest.raises(BridgeError, match="aligned"):
        bridge.tensors_to_jax([aligned, unaligned], copy=False)


def test_copy_true_many_gives_independent_buffers():
    t = torch.arange(64, dtype=torch.float32)
    (a,) = bridge.tensors_to_jax([t], copy=True)
    assert a.unsafe_buffer_pointer() != t.data_ptr()
    (b,) = bridge.arrays_to_torch([a], copy=True)
    assert b.data_ptr() != a.unsafe_buffer_pointer() and torch.equal(b, t)


def test_lean_path_falls_back_when_the_private_api_breaks(monkeypatch):
    """A jaxlib whose private DLPack calls changed: the probe fails, the status says why, and the
    public path gives the same zero-copy results."""
    def broken(*args, **kw):
        raise TypeError("signature changed")

    prev = bridge.set_lean_dlpack(True)
    try:
        monkeypatch.setitem(bridge._lean_state, "api", (broken, broken, torch.utils.dlpack.to_dlpack,
                                                        torch.utils.dlpack.from_dlpack))
        t = torch.arange(64, dtype=torch.float32)
        (a,) = bridge.tensors_to_jax([t])
        assert a.unsafe_buffer_pointer() == t.data_ptr()
        status = bridge.lean_dlpack_status()
        assert status["devices"]["cpu"] is False and "signature changed" in status["reason"]
        (b,) = bridge.arrays_to_torch([a])
        assert b.data_ptr() == t.data_ptr()
    finally:
        monkeypatch.undo()
        bridge.set_lean_dlpack(prev)
    assert bridge.tensors_to_jax([t])[0].unsafe_buffer_pointer() == t.data_ptr()
    assert bridge.lean_dlpack_status()["devices"]["cpu"] is True


class _MockJaxDevice:
    """A JAX device whose external-ready stream is 1234."""

    def get_stream_for_external_ready_events(self):
        return 1234


def _mock_torch_cuda(monkeypatch) -> type:
    """torch's CUDA stream/event constructors replaced by tagged tuples and the bridge's per-device caches
    emptied, so the lean CUDA path's stream logic runs on a CPU host; returns the mock JAX device class."""

    class Event:
        pass

    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda s, device=None: ("jax stream", s))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda stream_id, device_index, device_type: ("torch stream", stream_id))
    for name in ("_ext_streams", "_cuda_events", "_torch_streams"):
        monkeypatch.setattr(bridge, name, {})
    return _MockJaxDevice


def test_lean_cuda_stream_work_with_mocked_torch_cuda(monkeypatch):
    """The CUDA lean path's per-call stream work, with torch's CUDA entry points mocked (runs on CPU):
    each torch -> JAX wait records one reused event (one per device and thread) on torch's *current*
    stream of the device, then makes JAX's external-ready stream wait for it, in that order; the
    exports get the current raw stream (1 for the legacy default stream, as torch.from_dlpack)."""
    import threading

    calls = []
    current = {"ids": (7, 0, 1), "raw": 0}

    JaxDevice = _mock_torch_cuda(monkeypatch)
    ep = bridge._Endpoint(JaxDevice(), 2, True, 0, lambda i: current["ids"], lambda i: current["raw"],
                          lambda ev, st: calls.append(("record", ev, st)), lambda ev, st: calls.append(("wait", ev, st)))
    assert bridge._wait_for_torch(ep, "cuda:0") == 1234
    current["ids"] = (8, 0, 1)  # the user switched torch's current stream
    assert bridge._wait_for_torch(ep, "cuda:0") == 1234
    assert [c[0] for c in calls] == ["record", "wait", "record", "wait"]
    assert calls[0][1] is calls[1][1] is calls[2][1] is calls[3][1]  # one event, reused
    assert [calls[0][2], calls[2][2]] == [("torch stream", 7), ("torch stream", 8)]
    assert calls[1][2] == calls[3][2] == ("jax stream", 1234)
    other = []
    th = threading.Thread(target=lambda: other.append(bridge._wait_for_torch(ep, "cuda:0")))
    th.start()
    th.join()
    assert other == [1234] and calls[4][1] is not calls[0][1]  # another thread: its own event
    assert bridge._current_stream_ptr(ep) == 1  # legacy default stream
    current["raw"] = 0xABC0
    assert bridge._current_stream_ptr(ep) == 0xABC0


def test_lean_import_skips_the_stream_wait_only_when_torch_is_idle(monkeypatch):
    """The per-call import stream, with torch's CUDA entry points mocked (runs on CPU): with work
    pending on torch's current stream (cudaStreamQuery false) JAX's stream waits for it and the first
    tensor carries the ready event (``joint=True``; every tensor with ``joint=False``); once the
    stream has finished everything, the tensors are imported as ready and no event is recorded or
    waited for. ``idle_skip`` off, or an endpoint without the query, always waits."""
    calls, busy, imports = [], {"v": True}, []

    JaxDevice = _mock_torch_cuda(monkeypatch)

    def query(st):
        calls.append(("query", st))
        return not busy["v"]

    ep = bridge._Endpoint(JaxDevice(), 2, True, 0, lambda i: (7, 0, 1), lambda i: 0,
                          lambda ev, st: calls.append(("record", st)), lambda ev, st: calls.append(("wait", st)), query)
    monkeypatch.setitem(bridge._lean_state, "api", (
        lambda cap, dev, stream, copy, dl: imports.append(stream) or ("array", stream), None, lambda t: t, None))
    monkeypatch.setitem(bridge._lean_state, "idle_skip", True)
    ts = (torch.zeros(4), None, torch.zeros(2))

    def run(endpoint=ep, joint=True):
        calls.clear()
        imports.clear()
        bridge._lean_import(endpoint, "cuda:0", ts, 0, joint, False)
        return [c[0] for c in calls], list(imports)

    assert run() == (["query", "record", "wait"], [1234, None])
    assert calls[0][1] == calls[1][1] == ("torch stream", 7) and calls[2][1] == ("jax stream", 1234)
    assert run(joint=False) == (["query", "record", "wait"], [1234, 1234])
    busy["v"] = False
    assert run() == (["query"], [None, None])
    assert run(joint=False) == (["query"], [None, None])
    assert run(ep._replace(query=None)) == (["record", "wait"], [1234, None])
    monkeypatch.setitem(bridge._lean_state, "idle_skip", False)
    assert run() == (["record", "wait"], [1234, None])
