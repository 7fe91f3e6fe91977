"""The torch reference (``quantact_torch.reference``) computes the jnp reference's bits.

For every key in ``ALL_KEYS`` and every scale layout that applies, for bf16 / fp16 / f32
inputs of odd and batched shapes with extreme rows (exact zeros, values near and above
448, tiny normal values), the two references must agree **bit for bit**: data bytes,
scale *storage* bytes (torch's vLLM view is turned back into its storage), residual
outputs, dequantized values. NaN codes may differ in their payload/sign only where the
input held NaN.

Two things are deliberately not bit-exact, each with its reason next to its check:

- SiLU-and-mul producers: ``exp`` is a transcendental function whose last-bit rounding
  differs between XLA:CPU and torch (both are within ~1 ulp, neither is correctly
  rounded), so an element whose SiLU lands next to a rounding boundary may quantize to
  the neighbouring code. Every other op is exact (IEEE +, *, /, correctly rounded
  sqrt, RNE casts), so the difference is bounded: one code step, on a small fraction
  of elements, and scales within 2**-20 relative (or one step of e4m3/e8m0/pow2).
  Measured over every key variant x dtype x shape of this file: 0 of 3.9M codes differ;
  129 of 84k scales (0.15%, all f32) differ, by at most 4 ulps; 392 of 420 calls are
  bit-identical (see ``assert_silu_close``).
- ``scaled_mm``: the f32 matmul's summation order differs (XLA's dot vs torch's BLAS),
  so outputs agree within the accumulation error bound plus one ulp of the output dtype.

Inputs avoid f32 *subnormal* intermediates: XLA:CPU flushes them to zero and torch does
not (a platform difference, not a contract one).
"""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from interop.errors import QuantLayoutError
from interop.keys import (ALL_KEYS, QuantFormat, QuantKey, ScaleDesc, ScaleLayout, kFp8Dynamic128Sym,
                          kFp8Dynamic64Sym, kFp8DynamicTensorSym, kFp8DynamicTokenSym, kFp8Static128BlockSym,
                          kFp8StaticTensorSym, kInt8DynamicTokenSym, kInt8StaticTensorSym, kMxfp4Dynamic,
                          kMxfp8Dynamic, kNvfp4Dynamic, kNvfp4Static)
from interop.layout import cdiv, logical_scale_shape, rows_cols, scale_storage_shape, swizzle_index
from quantact_jax import reference as jr
from quantact_torch import reference as tr
from quantact_torch.activation import scale_from_storage

L = ScaleLayout
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


# ---------------------------------------------------------------- keys and layouts
def _variants() -> list[tuple[str, QuantKey]]:
    out = []
    for name, key in ALL_KEYS.items():
        g = key.group_size
        if key.format == QuantFormat.FP8 and g in (64, 128):
            out.append((name, key))
            for lay in (L.COL_MAJOR, L.COL_MAJOR_TMA, L.PACKED_UE8M0):
                out.append((f"{name}-{lay}", key.with_layout(lay)))
            for lay in (L.ROW_MAJOR, L.COL_MAJOR, L.COL_MAJOR_TMA):
                out.append((f"{name}-{lay}-ue8m0", key.with_layout(lay, ue8m0=True)))
        elif key.format in (QuantFormat.NVFP4, QuantFormat.MXFP8, QuantFormat.MXFP4):
            out.append((name, key))  # swizzled 128x4 (the default)
            out.append((f"{name}-row_major", key.with_layout(L.ROW_MAJOR)))
        else:
            out.append((name, key))
    return out


VARIANTS = _variants()
VAR_IDS = [v[0] for v in VARIANTS]


def _fused_cases(per_test) -> list:
    """(variant id, key, dtype, *extra) for the fused producers: every key x every dtype, the
    key's layout variants rotated over the (dtype, extra) slots. The fused producers end in
    the same ``quantize_f32`` that ``test_quantize_bit_exact`` checks in every layout; this
    keeps the suite fast while still reaching (nearly) every layout through each producer."""
    out = []
    for name in ALL_KEYS:
        vs = [v for v in VARIANTS if v[0] == name or v[0].startswith(name + "-")]
        for di, dt in enumerate(DTYPES):
            for j, extra in enumerate(per_test):
                kid, key = vs[(di * len(per_test) + j) % len(vs)]
                out.append(pytest.param(kid, key, dt, *extra, id=f"{kid}-{DT_ID[dt]}" + (
                    f"-{extra[0]}" if extra else "")))
    return out


DYNAMIC_TWIN = {QuantFormat.NVFP4: kNvfp4Dynamic, QuantFormat.MXFP8: kMxfp8Dynamic, QuantFormat.MXFP4: kMxfp4Dynamic}


def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


SHAPES = [(1, 256), (3, 384), (5, 512), (2, 65, 256)]


def _shapes(key: QuantKey) -> list[tuple[int, ...]]:
    """M = 1, 3, 5 (odd) and 130 (crosses the 128-row swizzle tile) as leading batch dims
    (2, 65); K = 384 is 3 groups of 128 (6 of 64) and not a power of two (RMSNorm's tree
    pads it). The same few 2-D shapes everywhere: the eager jnp reference compiles each op
    once per shape, which is most of this file's runtime."""
    return SHAPES


# ---------------------------------------------------------------- conversions
_ML = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
       torch.float8_e8m0fnu: ml_dtypes.float8_e8m0fnu}
_TORCH_OF_NP = {np.dtype(v): k for k, v in _ML.items()}


def t2n(t: torch.Tensor) -> np.ndarray:
    """A torch tensor's bits as a NumPy array of the same dtype (ml_dtypes for bf16/fp8)."""
    t = t.detach().contiguous()
    if t.dtype in _ML:
        return t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().view(_ML[t.dtype])
    return t.numpy()


def n2t(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype in _TORCH_OF_NP:
        td = _TORCH_OF_NP[a.dtype]
        return torch.from_numpy(a.view(np.uint8 if a.dtype.itemsize == 1 else np.int16).copy()).view(td)
    return torch.from_numpy(a.copy())


def t2j(t: torch.Tensor):
    return jnp.asarray(t2n(t))


def j2t(a) -> torch.Tensor:
    return n2t(np.asarray(a))


# ---------------------------------------------------------------- inputs
def make_x(shape, dtype: torch.dtype, rng: np.random.Generator, extremes: bool = True) -> torch.Tensor:
    """Random normal rows with log-uniform row scales; with ``extremes`` (and M >= 3):
    a row of exact zeros, a row with values near/above 448 (up to 2000), a row of tiny
    normal values (2**-60 for f32/bf16; 2**-13 for fp16, whose smallest normal is 2**-14)."""
    m, k = rows_cols(shape)
    x = rng.standard_normal((m, k)) * 2.0 ** rng.uniform(-3, 3, (m, 1))
    if extremes and m >= 3:
        x[0] = 0.0
        idx = rng.choice(k, size=min(k, 12), replace=False)
        x[1, idx] = rng.choice([-1.0, 1.0], idx.size) * np.array(
            [440.0, 448.0, 452.0, 464.0, 470.0, 500.0, 1000.0, 2000.0, 300.0, 447.0, 449.0, 600.0])[:idx.size]
        tiny = 2.0 ** -13 if dtype == torch.float16 else 2.0 ** -60
        x[2] = rng.choice([-1.0, 1.0], k) * rng.uniform(1.0, 2.0, k) * tiny
    if m >= 130:  # a whole row of large values in the second 128-row tile
        x[129] = rng.choice([-1.0, 1.0], k) * rng.uniform(100.0, 900.0, k)
    return torch.from_numpy(x.astype(np.float32)).to(dtype).reshape(shape)


def static_fp_scale(key: QuantKey, m: int, k: int, rng, base: float) -> np.ndarray:
    """Random positive f32 static scale of the key's storage shape (``base`` * U(0.3, 3))."""
    shape = scale_storage_shape(key.scale, m, k)
    return (base * rng.uniform(0.3, 3.0, shape)).astype(np.float32)


def block_static_scale(key: QuantKey, m: int, k: int, rng, gs):
    """NVFP4/MX static block scales: quantize another random tensor dynamically once
    (same layout) and reuse its scale storage (jnp array)."""
    dyn = DYNAMIC_TWIN[key.format].with_layout(key.scale.layout)
    other = make_x((m, k), torch.float32, rng, extremes=False)
    kw = {"global_scale": gs} if key.format == QuantFormat.NVFP4 else {}
    return jr.quantize(t2j(other), dyn, **kw).scale


def quant_kwargs(key: QuantKey, m: int, k: int, rng, amax: float, *, ub: bool = False):
    """(jnp kwargs, torch kwargs) for ``key``: static scales, NVFP4 global scale, scale_ub."""
    kj, kt = {}, {}
    fmt = key.format
    if fmt == QuantFormat.NVFP4:
        gs = np.float32(448.0 * 6.0 / max(amax, 1e-3))
        kj["global_scale"] = kt["global_scale"] = gs
    if key.scale.static:
        if fmt in (QuantFormat.FP8, QuantFormat.INT8):
            qmax = 448.0 if fmt == QuantFormat.FP8 else 127.0
            s = static_fp_scale(key, m, k, rng, max(amax, 1e-3) / qmax)
            kj["scale"], kt["scale"] = s, torch.from_numpy(s.copy())
        else:
            s = block_static_scale(key, m, k, rng, kj.get("global_scale"))
            kj["scale"], kt["scale"] = s, j2t(s)
    if ub:
        u = np.float32(max(amax, 1e-3) * 0.25)
        kj["scale_ub"], kt["scale_ub"] = u, torch.tensor(u)
    return kj, kt


# ---------------------------------------------------------------- comparisons
def _nan_mask(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f" or a.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e8m0fnu),
                                          np.dtype(ml_dtypes.bfloat16)):
        return np.isnan(a.astype(np.float32))
    return np.zeros(a.shape, bool)


def assert_bits_equal(aj, tt: torch.Tensor, what: str, nan_ok: bool = False) -> None:
    """Same dtype, shape and bytes; with ``nan_ok`` two NaNs of any code match."""
    a, b = np.asarray(aj), t2n(tt)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} (jnp) vs {b.dtype} (torch)"
    assert a.shape == b.shape, f"{what}: shape {a.shape} (jnp) vs {b.shape} (torch)"
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    eq = a.view(u) == b.view(u)
    if nan_ok:
        eq |= _nan_mask(a) & _nan_mask(b)
    if not eq.all():
        bad = np.argwhere(~eq)[:5]
        raise AssertionError(f"{what}: {int((~eq).sum())}/{eq.size} differ, e.g. at {bad.tolist()}: "
                             f"jnp {[a[tuple(i)] for i in bad]} vs torch {[b[tuple(i)] for i in bad]}")


def assert_same(qj, qt, what: str = "", nan_ok: bool = False, dequant: bool = True, gs=None) -> None:
    """Bit-identical activations: key, orig shape/dtype, data bytes, scale storage bytes,
    and (exactly) equal dequantized values."""
    qt.validate()
    qj.validate()
    assert qt.quant_key == qj.quant_key
    assert tuple(qt.orig_shape) == qj.orig_shape
    assert str(qt.orig_dtype).removeprefix("torch.") == qj.orig_dtype.name
    assert_bits_equal(qj.data, qt.data, f"{what} data", nan_ok)
    assert_bits_equal(qj.scale, qt.scale_storage(), f"{what} scale", nan_ok)
    if qj.quant_key.scale.layout in (L.COL_MAJOR, L.COL_MAJOR_TMA, L.PACKED_UE8M0):
        m = rows_cols(qj.orig_shape)[0]
        assert qt.scale.shape[0] == m and (m == 1 or qt.scale.stride(0) == 1), "torch scale is not vLLM's view"
    if dequant:
        dj = np.asarray(jr.dequantize(qj, gs))
        dt = tr.dequantize(qt, None if gs is None else torch.tensor(gs)).numpy()
        np.testing.assert_array_equal(dj, dt, err_msg=f"{what} dequantize")


# ---------------------------------------------------------------- plain quantize
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("kid,key", VARIANTS, ids=VAR_IDS)
def test_quantize_bit_exact(kid, key, dtype):
    rng = np.random.default_rng(_seed("quantize", kid, dtype))
    for shape in _shapes(key):
        x = make_x(shape, dtype, rng)
        m, k = rows_cols(shape)
        amax = float(x.float().abs().max())
        for ub in ([False, True] if key.scale.group_shape.is_per_token() and not key.scale.static else [False]):
            kj, kt = quant_kwargs(key, m, k, rng, amax, ub=ub)
            qj = jr.quantize(t2j(x), key, **kj)
            qt = tr.quantize(x, key, **kt)
            # dequantize depends on codes and scales only: check it once per key and shape
            assert_same(qj, qt, f"{kid} {shape} ub={ub}", gs=kj.get("global_scale"),
                        dequant=dtype == torch.bfloat16)


# ---------------------------------------------------------------- fused RMSNorm (+ residual) -> quant
@pytest.mark.parametrize("kid,key,dtype,with_residual", _fused_cases([(False,), (True,)]))
def test_rms_norm_quant_bit_exact(kid, key, dtype, with_residual):
    rng = np.random.default_rng(_seed("rms", kid, dtype, with_residual))
    for shape in [(3, 384)] if with_residual else [(1, 256), (2, 65, 256)]:
        m, k = rows_cols(shape)
        x = make_x(shape, dtype, rng)
        if dtype != torch.float16:  # keep z*z normal in f32 (XLA flushes subnormals)
            x = torch.where(x.abs() < 2.0 ** -50, torch.full_like(x, 2.0 ** -50), x)
        w = torch.from_numpy(rng.uniform(0.5, 1.5, k).astype(np.float32)).to(dtype)
        res = make_x(shape, dtype, rng, extremes=False) if with_residual else None
        kj, kt = quant_kwargs(key, m, k, rng, 4.0, ub=not key.scale.static and m == 3)
        qj, rj = jr.rms_norm_quant(t2j(x), t2j(w), key, eps=1e-6, residual=None if res is None else t2j(res), **kj)
        qt, rt = tr.rms_norm_quant(x, w, key, eps=1e-6, residual=res, **kt)
        assert_same(qj, qt, f"{kid} {shape}", dequant=False)
        if res is None:
            assert rj is None and rt is None
        else:
            assert_bits_equal(rj, rt, f"{kid} {shape} residual")


def test_rms_norm_weight_used_as_given():
    """An f32 weight with a bf16 input is widened, not rounded to bf16, on both sides."""
    rng = np.random.default_rng(_seed("rms-weight"))
    x = make_x((3, 384), torch.bfloat16, rng)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, 384).astype(np.float32))
    nj, _ = jr.rms_norm(t2j(x), t2j(w), 1e-6)
    nt, _ = tr.rms_norm(x, w, 1e-6)
    assert_bits_equal(nj, nt, "rms_norm")


# ---------------------------------------------------------------- SiLU-and-mul -> quant
SILU_STATS = {"codes": 0, "code_diffs": 0, "scales": 0, "scale_diffs": 0, "cases": 0, "exact_cases": 0}
MAX_CODE_DIFF_FRACTION = 0.01  # per call; the measured rate is far lower (see SILU_STATS)


def _code_steps(a: np.ndarray, key: QuantKey) -> np.ndarray:
    """Signed code index: adjacent codes of one sign differ by one."""
    if key.format == QuantFormat.INT8:
        return a.view(np.int8).astype(np.int64)
    b = a.view(np.uint8).astype(np.int64)
    if key.is_fp4:
        b = np.stack([b & 0xF, b >> 4], -1).reshape(*b.shape[:-1], -1)
        return np.where(b & 8, -(b & 7), b & 7)
    return np.where(b & 0x80, -(b & 0x7F), b & 0x7F)


def _logical_scales_f32(storage: np.ndarray, key: QuantKey, m: int, k: int) -> np.ndarray:
    if key.scale.group_shape.is_per_tensor():
        return storage.astype(np.float32).reshape(1, 1)
    mg, kg = logical_scale_shape(key.scale, m, k)
    s = np.asarray(jr.unlayout_scales(jnp.asarray(storage), key.scale.layout, mg, kg))
    return s.astype(np.float32)


def assert_silu_close(qj, qt, key: QuantKey, what: str) -> None:
    """SiLU uses exp, whose last-bit rounding differs between XLA:CPU and torch (different
    vectorised implementations, neither correctly rounded: ~9% of f32 exp results differ by
    one ulp). Every other op is exact, so the error only propagates: 1 + exp(-g), the
    division and the multiply by ``up`` each add at most one rounding, so an f32
    SiLU(g) * up differs by at most a few ulps (measured: ~4% of elements, <= 4 ulps; after
    rounding to bf16/fp16 almost never). Hence: f32 scales (amax / 448) within 2**-20
    relative (8 ulps), e4m3 / e8m0 / UE8M0 scales within one step of their format, codes
    equal except a small fraction (<= 1%; measured 0) that differs by exactly one code
    step, with the same sign."""
    qt.validate()
    assert qt.quant_key == qj.quant_key and tuple(qt.orig_shape) == qj.orig_shape
    m, k = rows_cols(qj.orig_shape)
    sj = _logical_scales_f32(np.asarray(qj.scale), key, m, k)
    st = _logical_scales_f32(t2n(qt.scale_storage()), key, m, k)
    pow2 = key.scale.ue8m0 or key.scale.dtype == "float8_e8m0fnu"
    # non-finite scales (an fp16 SiLU*up that overflowed to inf) must match exactly
    same = (sj == st) | (np.isnan(sj) & np.isnan(st))
    assert (np.isfinite(sj) == np.isfinite(st)).all() and same[~np.isfinite(sj)].all(), f"{what}: non-finite scales"
    if key.scale.static:
        ok_s = sj == st
    elif pow2:
        ok_s = (sj == st) | (np.maximum(sj, st) == 2 * np.minimum(sj, st))
    elif key.scale.dtype == "float8_e4m3fn":  # adjacent e4m3 values (same sign: scales are >= 0)
        bj = sj.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(int)
        bt = st.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(int)
        ok_s = np.abs(bj - bt) <= 1
    else:
        with np.errstate(invalid="ignore"):
            ok_s = same | (np.abs(sj - st) <= 2.0 ** -20 * np.maximum(np.abs(sj), np.abs(st)))
    ok_s = ok_s | same
    assert ok_s.all(), f"{what}: scales differ by more than one step: jnp {sj[~ok_s][:4]} torch {st[~ok_s][:4]}"
    cj = _code_steps(np.asarray(qj.data), key)
    ct = _code_steps(t2n(qt.data), key)
    if key.format in (QuantFormat.FP8, QuantFormat.MXFP8):  # two NaN codes match (only from inf inputs)
        nan = (np.abs(cj) == 0x7F) & (np.abs(ct) == 0x7F)
        cj, ct = np.where(nan, 0, cj), np.where(nan, 0, ct)
    d = np.abs(cj - ct)
    assert d.max(initial=0) <= 1, f"{what}: codes differ by {d.max()} steps"
    assert ((cj == 0) | (ct == 0) | (np.sign(cj) == np.sign(ct))).all(), f"{what}: code signs differ"
    frac = (d != 0).mean()
    assert frac <= MAX_CODE_DIFF_FRACTION, f"{what}: {frac:.2%} of codes differ"
    SILU_STATS["codes"] += d.size
    SILU_STATS["code_diffs"] += int((d != 0).sum())
    SILU_STATS["scales"] += sj.size
    SILU_STATS["scale_diffs"] += int((~same).sum())
    SILU_STATS["cases"] += 1
    SILU_STATS["exact_cases"] += int(frac == 0 and same.all())


@pytest.mark.parametrize("kid,key,dtype", _fused_cases([()]))
def test_silu_and_mul_quant_close(kid, key, dtype):
    rng = np.random.default_rng(_seed("silu", kid, dtype))
    for shape in [(3, 384), (2, 65, 256)]:
        m, d = rows_cols(shape)
        x = make_x((*shape[:-1], 2 * d), dtype, rng)
        kj, kt = quant_kwargs(key, m, d, rng, 8.0, ub=not key.scale.static and m == 3)
        qj = jr.silu_and_mul_quant(t2j(x), key, **kj)
        qt = tr.silu_and_mul_quant(x, key, **kt)
        assert_silu_close(qj, qt, key, f"{kid} {shape}")


def test_silu_only_exp_differs():
    """With the *same* exp values fed to both, SiLU-and-mul is bit-exact: the only
    difference is the transcendental itself."""
    rng = np.random.default_rng(_seed("silu-exp"))
    g = rng.standard_normal((64, 256)).astype(np.float32) * 4
    e = np.exp(-g.astype(np.float64)).astype(np.float32)  # one set of exp values for both
    yj = np.asarray(jr.exact.div(jnp.asarray(g), 1.0 + jnp.asarray(e)))
    yt = tr.true_div(torch.from_numpy(g), 1.0 + torch.from_numpy(e)).numpy()
    np.testing.assert_array_equal(yj.view(np.uint32), yt.view(np.uint32))


# ---------------------------------------------------------------- static scales in every form
@pytest.mark.parametrize("layout", [L.ROW_MAJOR, L.COL_MAJOR, L.COL_MAJOR_TMA, L.PACKED_UE8M0, L.SWIZZLED_128x4])
def test_static_group_scale_forms(layout):
    """A static per-group fp8 key (not a vLLM constant) in every f32 layout: torch accepts
    the storage (the JAX shape), vLLM's strided view, or plain [M, G] logical values."""
    key = QuantKey("float8_e4m3fn", ScaleDesc("float32", True, (1, 128), layout))
    rng = np.random.default_rng(_seed("static-forms", layout))
    for shape in [(5, 512), (4, 512), (130, 256)]:  # (4, 512): storage and view shapes coincide
        x = make_x(shape, torch.bfloat16, rng)
        m, k = rows_cols(shape)
        dyn = jr.quantize(t2j(make_x(shape, torch.float32, rng, extremes=False)), kFp8Dynamic128Sym.with_layout(layout))
        storage = dyn.scale
        qj = jr.quantize(t2j(x), key, scale=storage)
        st = j2t(storage)
        forms = {"storage": st}
        if layout in (L.COL_MAJOR, L.COL_MAJOR_TMA, L.PACKED_UE8M0):
            view = scale_from_storage(st, key, shape)
            forms["view"] = view
            if tuple(view.shape) != tuple(st.shape):  # else a contiguous tensor reads as storage (documented)
                forms["logical"] = view.contiguous()
        for form, s in forms.items():
            qt = tr.quantize(x, key, scale=s)
            assert_same(qj, qt, f"{layout} {shape} {form}")


# ---------------------------------------------------------------- NaN / Inf policy
def _logical(q, key, m, k):
    return _logical_scales_f32(np.asarray(q.scale), key, m, k)


def _both(fn_name, x: torch.Tensor, key, **kw):
    kj = {a: (t2n(b) if isinstance(b, torch.Tensor) else b) for a, b in kw.items()}
    qj = getattr(jr, fn_name)(t2j(x), key, **kj)
    qt = getattr(tr, fn_name)(x, key, **kw)
    assert_same(qj, qt, f"{key} nan", nan_ok=True, gs=kw.get("global_scale"))
    return qj


@pytest.mark.parametrize("kid,key", [v for v in VARIANTS if v[1].format == QuantFormat.FP8
                                     and v[1].group_size in (64, 128)], ids=lambda v: str(v))
def test_nan_in_dynamic_group(kid, key):
    """A NaN poisons its own group's scale (and codes) only."""
    rng = np.random.default_rng(_seed("nan-group", kid))
    shape = (5, 512)
    g = key.group_size
    x = make_x(shape, torch.bfloat16, rng)
    xn = x.clone()
    xn[3, g + 7] = float("nan")
    clean = _both("quantize", x, key)
    q = _both("quantize", xn, key)
    sc, sn = _logical(clean, key, 5, 512), _logical(q, key, 5, 512)
    assert np.isnan(sn[3, 1]) or (key.scale.layout == L.PACKED_UE8M0 and np.isinf(sn[3, 1]))
    mask = np.ones_like(sn, bool)
    mask[3, 1] = False
    np.testing.assert_array_equal(sn[mask], sc[mask])
    dc = np.asarray(clean.data).view(np.uint8)
    dn = np.asarray(q.data).view(np.uint8)
    grp = np.zeros(dn.shape, bool)
    grp[3, g:2 * g] = True
    assert ((dn[grp] & 0x7F) == 0x7F).all(), "codes of the NaN group are NaN"
    np.testing.assert_array_equal(dn[~grp], dc[~grp])


def test_nan_inf_per_token_and_tensor():
    rng = np.random.default_rng(_seed("nan-token"))
    x = make_x((5, 512), torch.float16, rng)
    xn = x.clone()
    xn[2, 5] = float("nan")
    xn[4, 9] = float("inf")
    for key in (kFp8DynamicTokenSym, kInt8DynamicTokenSym):
        q = _both("quantize", xn, key)
        qc = _both("quantize", x, key)
        s = np.asarray(q.scale)[:, 0]
        assert np.isnan(s[2]) and np.isinf(s[4])
        np.testing.assert_array_equal(s[[0, 1, 3]], np.asarray(qc.scale)[[0, 1, 3], 0])
        d = np.asarray(q.data)
        if key.format == QuantFormat.INT8:
            assert (d[2] == 0).all(), "int8 codes of NaN are 0"
        else:
            assert np.isnan(d[2].astype(np.float32)).all()
        _both("quantize", xn, key, scale_ub=torch.tensor(3.0))
    q = _both("quantize", xn, kFp8DynamicTensorSym)
    assert np.isnan(np.asarray(q.scale)).all()


def test_static_saturates_inf_and_nan_codes():
    x = torch.tensor([[1.0, float("inf"), -float("inf"), float("nan"), 1e4, -1e4, 0.5, -0.0]], dtype=torch.bfloat16)
    x = x.repeat(3, 4)
    q = _both("quantize", x, kFp8StaticTensorSym, scale=torch.tensor([0.5]))
    b = np.asarray(q.data).view(np.uint8)[0]
    assert b[1] == 0x7E and b[2] == 0xFE and (b[3] & 0x7F) == 0x7F and b[4] == 0x7E and b[5] == 0xFE
    q = _both("quantize", x, kInt8StaticTensorSym, scale=torch.tensor([0.5]))
    d = np.asarray(q.data)[0]
    assert d[1] == 127 and d[2] == -128 and d[3] == 0 and d[0] == 2


@pytest.mark.parametrize("layout", [L.SWIZZLED_128x4, L.ROW_MAJOR])
def test_nan_fp4_and_mx(layout):
    rng = np.random.default_rng(_seed("nan-fp4", layout))
    x = make_x((3, 384), torch.float32, rng, extremes=False)
    xn = x.clone()
    xn[1, 20] = float("nan")  # block 1 of 16, block 0 of 32
    gs = np.float32(448 * 6 / float(x.abs().max()))
    q = _both("quantize", xn, kNvfp4Dynamic.with_layout(layout), global_scale=gs)
    qc = _both("quantize", x, kNvfp4Dynamic.with_layout(layout), global_scale=gs)
    sn = np.asarray(jr.unlayout_scales(q.scale, layout, 3, 24)).astype(np.float32)
    sc = np.asarray(jr.unlayout_scales(qc.scale, layout, 3, 24)).astype(np.float32)
    assert np.isnan(sn[1, 1]) and not np.isnan(np.delete(sn.reshape(-1), 25)).any()
    codes = np.asarray(jr.unpack_fp4(q.data))
    assert (codes[1, 16:32] == 7).all(), "fp4 NaN -> code 7"
    np.testing.assert_array_equal(np.delete(sn.reshape(-1), 25), np.delete(sc.reshape(-1), 25))
    # static NVFP4: only the NaN element's code is 7, its block's scale is the static one
    qs = _both("quantize", xn, kNvfp4Static.with_layout(layout), scale=j2t(qc.scale), global_scale=gs)
    cs = np.array(jr.unpack_fp4(qs.data))
    cc = np.array(jr.unpack_fp4(qc.data))
    assert cs[1, 20] == 7
    cs[1, 20] = cc[1, 20]
    np.testing.assert_array_equal(cs, cc)
    for mk in (kMxfp8Dynamic, kMxfp4Dynamic):
        q = _both("quantize", xn, mk.with_layout(layout))
        b = np.asarray(jr.unlayout_scales(q.scale, layout, 3, 12)).view(np.uint8)
        assert b[1, 0] == 0xFF and (np.delete(b.reshape(-1), 12) != 0xFF).all()
        if mk.is_fp4:
            assert (np.asarray(jr.unpack_fp4(q.data))[1, :32] == 7).all()
        else:
            assert np.isnan(np.asarray(q.data)[1, :32].astype(np.float32)).all()
    for fn in ("rms_norm_quant", "silu_and_mul_quant"):  # NaN through the fused producers too
        args = (torch.ones(384),) if fn == "rms_norm_quant" else ()
        qj = getattr(jr, fn)(t2j(xn), *(t2j(a) for a in args), kFp8Dynamic64Sym)
        qt = getattr(tr, fn)(xn, *args, kFp8Dynamic64Sym)
        qj, qt = (qj[0], qt[0]) if fn == "rms_norm_quant" else (qj, qt)
        assert_bits_equal(qj.scale, qt.scale_storage(), fn, nan_ok=True)


# ---------------------------------------------------------------- padding and rounding ties
def _padding_mask(key: QuantKey, m: int, k: int) -> np.ndarray:
    """Bytes of the scale storage that hold no logical scale."""
    desc = key.scale
    _, g = logical_scale_shape(desc, m, k)
    shape = scale_storage_shape(desc, m, k)
    item = 4 if desc.storage_dtype in ("float32", "int32") else 1
    pad = np.zeros((*shape, item), bool)
    if desc.layout == L.COL_MAJOR_TMA:
        pad[:, m:] = True
    elif desc.layout == L.PACKED_UE8M0:
        pad[:, m:] = True
        for j in range(shape[0]):
            for byte in range(4):
                if 4 * j + byte >= g:
                    pad[j, :, byte] = True
    elif desc.layout == L.SWIZZLED_128x4:
        mp, gp = shape
        perm = swizzle_index(mp, gp).reshape(mp, gp)
        pad[(perm // gp >= m) | (perm % gp >= g)] = True
    return pad.reshape(*shape[:-1], -1)


@pytest.mark.parametrize("kid,key", [v for v in VARIANTS if v[1].scale.layout in
                                     (L.COL_MAJOR_TMA, L.PACKED_UE8M0, L.SWIZZLED_128x4)], ids=lambda v: str(v))
def test_padding_bytes_zero(kid, key):
    rng = np.random.default_rng(_seed("pad", kid))
    for shape in [(5, 512), (130, 256)]:
        m, k = rows_cols(shape)
        x = make_x(shape, torch.bfloat16, rng)
        kj, kt = quant_kwargs(key, m, k, rng, float(x.float().abs().max()))
        qj, qt = jr.quantize(t2j(x), key, **kj), tr.quantize(x, key, **kt)
        pad = _padding_mask(key, m, k)
        assert pad.any()
        bj = np.asarray(qj.scale).view(np.uint8).reshape(pad.shape)
        bt = t2n(qt.scale_storage()).view(np.uint8).reshape(pad.shape)
        assert (bj[pad] == 0).all() and (bt[pad] == 0).all()


def test_rounding_ties():
    """e4m3 midpoints and the e2m1 thresholds round half to even on both sides."""
    e4m3_mid = np.array([1.0625, 1.1875, 0.5 + 1 / 32, 240.0 + 8, 416.0, 432.0, 2 ** -7 + 2 ** -10, 2 ** -9 * 1.5],
                        np.float32)
    x = torch.from_numpy(np.concatenate([e4m3_mid, -e4m3_mid])[None].repeat(2, 0))
    _both("quantize", x, kFp8StaticTensorSym, scale=torch.tensor([1.0]))
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 6.5, 0.2, 0.3, 2.9, 3.1, 4.9, 100., 0.0], np.float32)
    x = torch.from_numpy(np.stack([ties, -ties]))
    gs = np.float32(1.5)  # sf = 1.5 (exact in e4m3): ratio gs / sf = 1, codes see the values themselves
    sf = jr.layout_scales(jnp.full((2, 1), 1.5, jnp.float8_e4m3fn), L.SWIZZLED_128x4)
    q = _both("quantize", x, kNvfp4Static, scale=j2t(sf), global_scale=gs)
    codes = np.asarray(jr.unpack_fp4(q.data))
    np.testing.assert_array_equal(codes[0], [0, 2, 2, 4, 4, 6, 6, 7, 7, 0, 1, 5, 5, 6, 7, 0])
    np.testing.assert_array_equal(codes[1], [8, 10, 10, 12, 12, 14, 14, 15, 15, 8, 9, 13, 13, 14, 15, 8])  # -0 -> 8


# ---------------------------------------------------------------- errors
def _raises_both(fn_name, x, *args, **kw):
    kj = {a: (t2j(b) if isinstance(b, torch.Tensor) else b) for a, b in kw.items()}
    argsj = [t2j(a) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(QuantLayoutError):
        getattr(jr, fn_name)(t2j(x) if x.dtype != torch.int32 else jnp.asarray(x.numpy()), *argsj, **kj)
    with pytest.raises(QuantLayoutError):
        getattr(tr, fn_name)(x, *args, **kw)


def test_same_errors():
    x = torch.ones(4, 200)
    _raises_both("quantize", x, kFp8Dynamic128Sym)  # K not a multiple of the group
    _raises_both("quantize", torch.ones(4, 256), kFp8StaticTensorSym)  # static without scale
    _raises_both("quantize", torch.ones(4, 256), kFp8Static128BlockSym, scale=torch.ones(1, 1))  # wrong shape
    _raises_both("quantize", torch.ones(4, 256), kNvfp4Dynamic)  # no global scale
    _raises_both("quantize", torch.ones(4, 256), kNvfp4Dynamic, global_scale=torch.ones(2))
    _raises_both("quantize", torch.ones(4, 256, dtype=torch.int32), kFp8DynamicTensorSym)
    _raises_both("quantize", torch.ones(4, 256), kFp8DynamicTokenSym, scale_ub=torch.ones(2))
    _raises_both("rms_norm_quant", torch.ones(4, 256), torch.ones(128), kFp8DynamicTokenSym)
    _raises_both("rms_norm_quant", torch.ones(4, 256), torch.ones(256), kFp8DynamicTokenSym,
                 residual=torch.ones(4, 256, dtype=torch.bfloat16))
    _raises_both("silu_and_mul_quant", torch.ones(4, 255), kFp8DynamicTokenSym)
    _raises_both("silu_and_mul_quant", torch.ones(4, 40), kNvfp4Dynamic, global_scale=1.0)  # d=20 not /16


# ---------------------------------------------------------------- the consumer
def _ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    mant, emin = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}[dtype]
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** emin)))
    return 2.0 ** (e - mant)


MM_CASES = {
    "per_tensor": (kFp8DynamicTensorSym, kFp8DynamicTensorSym),
    "per_token_x_per_channel": (kFp8DynamicTokenSym, kFp8DynamicTokenSym),
    "block128": (kFp8Dynamic128Sym, kFp8Static128BlockSym),
    "block128_colmajor": (kFp8Dynamic128Sym.with_layout(L.COL_MAJOR_TMA), kFp8Static128BlockSym),
    "nvfp4": (kNvfp4Dynamic, kNvfp4Dynamic),
}


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("case", list(MM_CASES))
def test_scaled_mm_close(case, out_dtype):
    """Same dequantized operands (checked bit-exact above), but the f32 matmul's summation
    order is XLA's on one side and torch's BLAS on the other. Each side's f32 result is
    within gamma_K * sum_k |a_k w_k| (gamma_K ~ K * 2**-24) of the exact sum, so they
    differ by at most twice that; the final cast to bf16/fp16 may then round the two to
    neighbouring values: one ulp of the output dtype more. Without and with bias."""
    akey, wkey = MM_CASES[case]
    rng = np.random.default_rng(_seed("mm", case, out_dtype))
    shape, n = (2, 65, 256), 130  # M = 130; n = 130: a partial 128-row weight block
    m, k = rows_cols(shape)
    x = make_x(shape, out_dtype, rng, extremes=False)
    w = torch.from_numpy((rng.standard_normal((n, k)) * 0.05).astype(np.float32))
    gsa = np.float32(448 * 6 / float(x.float().abs().max()))
    gsw = np.float32(448 * 6 / float(w.abs().max()))
    ka = {"global_scale": gsa} if akey.format == QuantFormat.NVFP4 else {}
    kw = {"global_scale": gsw} if wkey.format == QuantFormat.NVFP4 else {}
    if wkey.scale.static:
        kw["scale"] = (0.05 * 4 / 448 * rng.uniform(0.5, 2.0, (cdiv(n, 128), cdiv(k, 128)))).astype(np.float32)
    qaj, qat = jr.quantize(t2j(x), akey, **ka), tr.quantize(x, akey, **ka)
    qwj = jr.quantize(jnp.asarray(w.numpy()), wkey, **kw)
    qwt = tr.quantize(w, wkey, **{a: (torch.from_numpy(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()})
    assert_same(qaj, qat, "a", gs=ka.get("global_scale"))
    assert_same(qwj, qwt, "w", gs=kw.get("global_scale"))
    av = np.abs(np.asarray(jr.dequantize(qaj, ka.get("global_scale"))).astype(np.float64)).reshape(m, k)
    wv = np.abs(np.asarray(jr.dequantize_codes(qwj.data, qwj.scale, wkey, (n, k), kw.get("global_scale"))))
    acc_bound = 2 * k * 2.0 ** -24 * (av @ wv.astype(np.float64).T)
    for bias in (None, torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(out_dtype)):
        oj = jr.scaled_mm(qaj, qwj.data, qwj.scale, wkey, bias=None if bias is None else t2j(bias),
                          out_dtype=jnp.dtype(ml_dtypes.bfloat16 if out_dtype == torch.bfloat16 else np.float16),
                          global_scale_a=ka.get("global_scale"), global_scale_w=kw.get("global_scale"))
        ot = tr.scaled_mm(qat, qwt.data, qwt.scale, wkey, bias=bias, out_dtype=out_dtype,
                          global_scale_a=ka.get("global_scale"), global_scale_w=kw.get("global_scale"))
        assert ot.dtype == out_dtype and tuple(ot.shape) == (*shape[:-1], n) == tuple(oj.shape)
        oj = np.asarray(oj).astype(np.float64).reshape(m, n)
        otn = ot.float().numpy().astype(np.float64).reshape(m, n)
        bound = acc_bound + _ulp(np.maximum(np.abs(oj), np.abs(otn)), out_dtype)
        assert (np.abs(oj - otn) <= bound).all(), f"bias={bias is not None}: max excess {np.max(np.abs(oj - otn) - bound)}"
        assert (oj == otn).mean() > 0.9  # almost all outputs are identical after the cast
