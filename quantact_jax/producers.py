"""Fused Pallas producers: (residual add +) RMSNorm -> quant, SiLU-and-mul -> quant, plain quant.

One Triton-lowered kernel family (``pl.pallas_call`` with explicit
``plgpu.CompilerParams``) covers every key: each program owns ``block_m`` rows
and holds a row tile in registers: the whole row (padded to a power of two), or,
for group-local scales, a column chunk of it, so the input is read once and
codes + scales are written once. Per-row scales (per-token / per-tensor dynamic)
of wide rows go over column chunks instead (``ProducerConfig.row_chunk``): a
loop in one program (amax, then codes; the second read mostly from L2) or, for
few rows, a program per chunk and a partial-amax pass. The arithmetic is the jnp
reference's (``quantact_jax.reference``), element by element:

- the elementwise pieces (``sat_fp8``, ``e2m1_encode``, ``pow2_ceil``, e8m0
  encoding) are *the same functions*;
- RMSNorm's sum of squares uses the same pairwise tree (adjacent pairs via a
  ``[.., W/2, 2]`` reshape and a size-2 reduction);
- on GPU, division, square root and the squares feeding the tree are inline PTX
  ``div.rn`` / ``sqrt.rn`` / ``mul.rn`` (Triton's default ``/`` is approximate and
  ``a*a + b*b`` may be contracted into an FMA); in interpret mode they are the
  plain jnp ops the reference uses.

``exp`` (SiLU) is the one transcendental: XLA:CPU, torch and libdevice round it
differently in the last bit, so SiLU producers agree with the references to the
bit only where the exp implementation is the same (interpret mode vs the jnp
reference); see the tests for the bound used elsewhere.

Per-tensor *dynamic* scales need a global amax: a first pass writes one amax
per row (or per row chunk), XLA takes their max, and a second pass forms the
scale (exact division, in-kernel) and quantizes with it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from interop.errors import QuantLayoutError
from interop.keys import QuantFormat, QuantKey, ScaleLayout
from interop.layers import resolve_input_quant
from interop.layout import cdiv, check_k_divisible, round_up, scale_storage_shape
from quantact_jax import exact, reference as ref
from quantact_jax.activation import QuantizedActivation

F32 = jnp.float32
U32 = jnp.uint32
MAX_BLOCK_ELEMS = 1 << 15  # one program's row tile, elements (registers)
SPLIT_ROWS = 128  # per-row scales: below this many rows, the row is split over programs (ProducerConfig.split)


# ------------------------------------------------------------------ config + heuristic
@dataclasses.dataclass(frozen=True)
class ProducerConfig:
    """Launch configuration: rows per program and warps per program.

    ``row_chunk`` applies to per-row scales (dynamic per-token and per-tensor fp8/int8 keys of
    ``quantize`` and ``silu_and_mul_quant``), whose amax needs the whole row: instead of holding
    the row in registers (which spills for wide rows), a program loops over ``row_chunk``-wide
    column chunks twice (the amax, then the codes; the second read mostly hits L2). With
    ``split`` each chunk gets its own program in two kernels (partial amaxes, then the codes with
    their max): more programs for few rows. The amax is a max, exact in any order, so every
    variant gives the same bits. ``row_chunk`` must divide K; other keys ignore it.
    (A persistent variant of the loop, fewer programs each taking every P-th row so that the
    second read hits L2, was measured and removed: H100, SiLU 4096 x 14336, 244-1029 us against
    the loop's 189.)
    """

    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 1
    row_chunk: int = 0
    split: bool = False

    def __post_init__(self):
        if self.block_m < 1 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two, got {self.block_m}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two <= 32, got {self.num_warps}")
        if self.row_chunk and (self.row_chunk < 16 or self.row_chunk & (self.row_chunk - 1)):
            raise ValueError(f"row_chunk must be 0 or a power of two >= 16, got {self.row_chunk}")
        if self.split and not self.row_chunk:
            raise ValueError("split needs a row_chunk (the columns each program takes)")


def _pow2_divisor(k: int, most: int, least: int) -> int:
    """The largest power of two in [least, most] dividing k, or 0."""
    w = most
    while w >= least and k % w:
        w //= 2
    return w if w >= least else 0


def heuristic_config(m: int, width: int, op: str = "quant", chunked: bool = False,
                     per_row: bool = False) -> ProducerConfig:
    """Rows per program and warps for a row tile ``width`` wide (a K chunk or a whole row).

    From the H100 sweeps (bench/producers.py --configs, results in bench/results/):
    whole-row RMSNorm is fastest with 2 rows per program (8 warps at K=4096, 16 at 8192);
    whole-row quantization with one row and K/512 warps; K chunks with one row, 4 warps.
    ``per_row`` (per-token / per-tensor dynamic scales of quant and SiLU): rows wider than 8192
    loop over 2048-wide chunks, 16 warps (H100, SiLU 4096 x 14336: 189 us vs 317 whole-row, which spills);
    fewer than 128 rows wider than 4096 split the row over programs in 1024-wide chunks (SiLU
    16 x 14336: 3.6 us vs 10.2); rows up to 4096 (8192 when many) stay whole (fastest there).
    """
    bk = pl.next_power_of_2(width)
    mp = pl.next_power_of_2(max(m, 1))
    if per_row and op != "rms" and bk > 4096:
        few = m < SPLIT_ROWS
        chunk = _pow2_divisor(width, 1024 if few else 2048, 256)
        if chunk and (few or bk > 8192):
            return ProducerConfig(block_m=1, num_warps=8 if few else 16, row_chunk=chunk, split=few)
    if chunked:
        return ProducerConfig(block_m=min(mp, max(1, 2048 // bk)), num_warps=4)
    if op == "rms":
        if m < SPLIT_ROWS:  # few rows: one per program, more programs (H100, 16x4096: 3.1 us vs 4.0 with 2)
            return ProducerConfig(block_m=1, num_warps=min(16, max(4, bk // 256)))
        block_m = min(mp, 2 if bk >= 4096 else 8192 // bk)
        elems = block_m * bk
        return ProducerConfig(block_m=block_m, num_warps=16 if elems >= 16384 else 8 if elems >= 4096 else 4)
    block_m = min(mp, max(1, 4096 // bk))
    return ProducerConfig(block_m=block_m, num_warps=min(16, max(4, block_m * bk // 512)))


# ------------------------------------------------------------------ exact arithmetic
class _Math:
    """Correctly rounded div/sqrt/mul: plain jnp when interpreting, inline PTX on GPU."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def _asm(self, op: str, *args):
        args = [jnp.broadcast_to(a, jnp.broadcast_shapes(*(jnp.shape(b) for b in args))).astype(F32)
                for a in args]
        regs = ", ".join(f"${i + 1}" for i in range(len(args)))
        [out] = plgpu.elementwise_inline_asm(
            f"{op}.rn.f32 $0, {regs};", args=args, constraints="=r," + ",".join("r" * len(args)),
            pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, F32)])
        return out

    def div(self, a, b):
        return exact.div(a, b) if self.interpret else self._asm("div", a, b)

    def sqrt(self, a):
        return exact.sqrt(a) if self.interpret else self._asm("sqrt", a)

    def mul(self, a, b):
        return exact.mul(a, b) if self.interpret else self._asm("mul", a, b)

    def square(self, a):
        """``a * a`` kept out of FMA contraction with the tree's adds."""
        return exact.square(a) if self.interpret else self._asm("mul", a, a)

    def tree_sum(self, v):
        """``reference.tree_sum`` over the last axis (a power of two wide)."""
        return ref.tree_sum(v) if self.interpret else _tree_sum_pairs(v)

    def round_to(self, v, dtype):
        """f32 -> dtype (RNE) -> f32; real converts on GPU, integer arithmetic when interpreting."""
        if self.interpret:
            return exact.round_to(v, dtype)
        return v.astype(dtype).astype(F32)

    def rint(self, a):
        """Round half to even to an integral f32."""
        if self.interpret:
            return jnp.round(a)
        [out] = plgpu.elementwise_inline_asm(
            "cvt.rni.f32.f32 $0, $1;", args=[a.astype(F32)], constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, F32)])
        return out


# ------------------------------------------------------------------ kernel spec
@dataclasses.dataclass(frozen=True)
class _Spec:
    op: str  # "quant" | "rms" | "silu"
    key: QuantKey
    m: int
    k: int  # width of the quantized output row
    in_dtype: Any
    block_m: int
    rows_cover: int  # rows the grid covers (scale padding rows included)
    has_residual: bool = False
    add_in_f32: bool = True
    eps: float = 1e-6
    has_ub: bool = False
    amax_only: bool = False  # pass 1 of a dynamic per-tensor quant
    tensor_scale_given: bool = False  # pass 2 of a dynamic per-tensor quant
    interpret: bool = False
    n_poison: int = 0  # aliased, pre-filled output buffers appended to the inputs (tests)
    bc: int = 0  # column chunk per program (a power of two dividing k); 0: the whole row
    loop: bool = False  # per-row scales: one program loops over the row's bc-wide chunks
    row_amax_given: bool = False  # split per-token pass 2: s_in holds [m, k // bc] partial amaxes

    @property
    def bk(self) -> int:
        return self.bc or pl.next_power_of_2(self.k)


def _tree_sum_pairs(v: jax.Array) -> jax.Array:
    """``reference.tree_sum``'s adjacent-pair order for Triton, which has no strided value
    slices: size-2 reductions of a ``[.., W/2, 2]`` reshape. (Interpret mode uses the
    reference itself: XLA would merge these chained reductions into one of its own order.)"""
    while v.shape[-1] > 1:
        v = jnp.sum(v.reshape(*v.shape[:-1], v.shape[-1] // 2, 2), axis=-1)
    return v.reshape(v.shape[:-1])


def _sat_int8(v: jax.Array, mth: _Math) -> jax.Array:
    # reference.sat_int8 (Triton has no round_p lowering: PTX cvt.rni on GPU)
    r = mth.rint(jnp.clip(v, -128.0, 127.0))
    return jnp.where(jnp.isnan(v), 0.0, r).astype(jnp.int8)  # test v: Triton's clip drops NaN


def _oob(off, mask, size: int):
    """Masked lanes point past the end: the GPU never touches them, and interpret
    mode's scatter drops them instead of racing live lanes on a shared offset."""
    return jnp.where(mask, off, size)


def _amax(a: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """``max(|v|)`` that propagates NaN: Triton's max reduction drops NaN (maxnum), so a
    NaN in the group is detected separately (the reference's ``jnp.max`` propagates)."""
    mx = jnp.max(a, axis=axis, keepdims=keepdims)
    has_nan = jnp.max(jnp.isnan(a).astype(jnp.int32), axis=axis, keepdims=keepdims) > 0
    return jnp.where(has_nan, jnp.nan, mx)


def _max_nan(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise max that propagates NaN (the running amax of the chunk loop)."""
    return jnp.where(jnp.isnan(a) | jnp.isnan(b), jnp.nan, jnp.maximum(a, b))


def _scale_offsets(layout: ScaleLayout, r, g, m: int, n_groups: int):
    """Flat storage offsets and in-bounds mask of logical scale (row r, group g)."""
    if layout == ScaleLayout.ROW_MAJOR:
        return r * n_groups + g, (r < m) & (g < n_groups)
    if layout == ScaleLayout.COL_MAJOR:
        return g * m + r, (r < m) & (g < n_groups)
    if layout == ScaleLayout.COL_MAJOR_TMA:
        mp = round_up(m, 4)
        return g * mp + r, (r < mp) & (g < n_groups)
    if layout == ScaleLayout.SWIZZLED_128x4:
        mp, gp = round_up(m, 128), round_up(n_groups, 4)
        off = ((r // 128) * (gp // 4) * 512 + (g // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + g % 4)
        return off, (r < mp) & (g < gp)
    raise AssertionError(layout)


def _kernel(*refs, spec: _Spec, cfg: ProducerConfig):
    key, fmt, desc = spec.key, spec.key.format, spec.key.scale
    mth = _Math(spec.interpret)
    refs = list(refs)
    x_ref = refs.pop(0)
    res_ref = refs.pop(0) if spec.has_residual else None
    w_ref = refs.pop(0) if spec.op == "rms" else None
    s_in_ref = refs.pop(0) if (desc.static or spec.tensor_scale_given or spec.row_amax_given) else None
    gs_ref = refs.pop(0) if fmt == QuantFormat.NVFP4 else None
    ub_ref = refs.pop(0) if spec.has_ub else None
    del refs[:spec.n_poison]  # the aliased poison inputs; their outputs follow
    res_out_ref = None
    if spec.amax_only:
        amax_ref, = refs
    else:
        data_ref, scale_ref, *rest = refs
        res_out_ref = rest[0] if spec.has_residual else None

    bm, bk, m, k = spec.block_m, spec.bk, spec.m, spec.k

    # grid indices read once, outside any loop (interpret mode substitutes them only at the top level)
    pid0, pid1, n_prog1 = pl.program_id(0), pl.program_id(1), pl.num_programs(1)

    row0 = pid0 * bm  # the program's first row (block_m of them)
    col0 = pid1 * bk if spec.bc and not spec.loop else 0
    last_chunk = (pid1 == n_prog1 - 1) if spec.bc and not spec.loop else True
    r = row0 + jnp.arange(bm, dtype=jnp.int32)[:, None]
    rmask = r < m
    t = spec.in_dtype

    def window(start):  # column indices and mask of the bk-wide window at `start`
        c_ = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
        return c_, rmask & (c_ < k)

    c, mask = window(col0)

    def load(ref_, off=0, start=col0, mask_=mask, c_=c):
        if spec.bc or off + bk <= ref_.shape[1]:
            return plgpu.load(ref_.at[pl.ds(row0, bm), pl.ds(off + start, bk)], mask=mask_, other=0)
        # a window past the row end: element indexing (masked lanes are never read)
        return plgpu.load(ref_.at[jnp.minimum(r, m - 1), jnp.minimum(off + c_, ref_.shape[1] - 1)],
                          mask=mask_, other=0)

    def store_data(val, width=bk, start=None):
        cols = jnp.arange(width, dtype=jnp.int32)[None, :] + (col0 if start is None else start)
        plgpu.store(data_ref.at[pl.ds(row0, bm), pl.ds(col0 if start is None else start, width)], val,
                    mask=rmask & (cols < data_ref.shape[1]))

    def elementwise(start=col0, mask_=mask, c_=c):  # quant / silu: the pre-quant value v (f32, 0 outside)
        if spec.op == "quant":
            return load(x_ref, 0, start, mask_, c_).astype(F32)
        g, u = load(x_ref, 0, start, mask_, c_).astype(F32), load(x_ref, k, start, mask_, c_).astype(F32)
        silu = mth.div(g, 1.0 + jnp.exp(-g))
        if fmt == QuantFormat.FP8 and desc.static:
            return mth.round_to(mth.round_to(silu, t) * u, t)
        if fmt == QuantFormat.FP8:
            return silu * u
        return mth.round_to(silu * u, t)

    qmax = ref.INT8_MAX if fmt == QuantFormat.INT8 else ref.FP8_MAX
    sat = functools.partial(_sat_int8, mth=mth) if fmt == QuantFormat.INT8 else ref.sat_fp8

    def dynamic_scale(amax):  # vLLM's dynamic fp8/int8 scale of an amax (per row or per group)
        nan = jnp.isnan(amax)  # before the upper bound: Triton's min drops NaN, the policy keeps it
        if fmt == QuantFormat.INT8 or (spec.op == "quant" and desc.group_shape.is_per_group()):
            s_ = mth.div(jnp.maximum(amax, ref.GROUP_EPS), qmax)
        else:
            if spec.has_ub:
                amax = jnp.minimum(amax, plgpu.load(ub_ref.at[pl.ds(0, 1)]).reshape(1, 1))
            s_ = jnp.maximum(mth.div(amax, qmax), ref.FP8_MIN_SCALE)
        s_ = jnp.where(nan, jnp.nan, s_)
        return ref.pow2_ceil(s_) if desc.ue8m0 else s_

    def row_scale(amax):  # per-row scales: dynamic per-token, or per-tensor pass 2 (amax unused)
        if spec.tensor_scale_given:  # s_in holds the global amax
            amax_t = plgpu.load(s_in_ref.at[pl.ds(0, 1)]).reshape(1, 1)
            return jnp.where(jnp.isnan(amax_t), jnp.nan, jnp.maximum(mth.div(amax_t, qmax), ref.FP8_MIN_SCALE))
        if spec.row_amax_given:  # split pass 2: s_in holds the rows' partial amaxes, one per chunk
            nch = k // bk
            j = jnp.arange(pl.next_power_of_2(nch), dtype=jnp.int32)[None, :]
            pm = rmask & (j < nch)
            amax = _amax(plgpu.load(s_in_ref.at[_oob(r * nch + j, pm, m * nch)], mask=pm, other=0.0), 1,
                         keepdims=True)
        return dynamic_scale(amax)

    def row_codes(v_, s_):  # vLLM: static-style per-tensor fp8 multiplies by 1/s, dynamic divides
        if fmt == QuantFormat.FP8 and spec.tensor_scale_given:
            return sat(v_ * mth.div(1.0, s_))
        return sat(mth.div(v_, s_))

    def store_row_scale(s_):  # one writer per row (per tensor): the row's first chunk
        first = pid1 == 0
        if spec.tensor_scale_given:
            plgpu.store(scale_ref.at[pl.ds(0, 1)], s_.reshape(1),
                        mask=first & (pid0 == 0) & (jnp.arange(1) == 0))
        else:
            plgpu.store(scale_ref.at[pl.ds(row0, bm)], s_[:, 0], mask=(r[:, 0] < m) & first)

    if spec.loop:  # per-row scales over bk-wide chunks: loop 1 the amax, loop 2 the codes
        nch = k // bk

        def v_at(j):
            c_, m_ = window(j * bk)
            return elementwise(j * bk, m_, c_)

        if spec.tensor_scale_given:
            amax = None
        else:
            amax = jax.lax.fori_loop(0, nch, lambda j, acc: _max_nan(acc, _amax(jnp.abs(v_at(j)), 1, keepdims=True)),
                                     jnp.zeros((bm, 1), F32))
            if spec.amax_only:
                plgpu.store(amax_ref.at[pl.ds(row0, bm)], amax[:, 0], mask=r[:, 0] < m)
                return
        s = row_scale(amax)

        def quant_chunk(j, carry):
            store_data(row_codes(v_at(j), s), bk, j * bk)
            return carry

        jax.lax.fori_loop(0, nch, quant_chunk, 0)
        store_row_scale(s)
        return

    # ---- the pre-quant value v (f32, zero outside [m, k])
    if spec.op in ("quant", "silu"):
        v = elementwise()
    else:  # rms
        xv = load(x_ref)
        if spec.has_residual:
            rv = load(res_ref)
            if spec.add_in_f32:
                z = xv.astype(F32) + rv.astype(F32)
            else:
                z = mth.round_to(xv.astype(F32) + rv.astype(F32), t)
            res_out = z.astype(t)
            if res_out_ref is not None:
                plgpu.store(res_out_ref.at[pl.ds(row0, bm), pl.ds(0, bk)], res_out, mask=mask)
        else:
            z = xv.astype(F32)
        ms = mth.div(mth.tree_sum(mth.square(z)), np.float32(k))[:, None]
        inv = mth.div(1.0, mth.sqrt(ms + np.float32(spec.eps)))
        w = plgpu.load(w_ref.at[pl.ds(0, bk)], mask=c[0] < k, other=0)[None, :]
        v = mth.round_to(mth.mul(mth.round_to(mth.mul(z, inv), t), w.astype(F32)), t)

    a = jnp.abs(v)
    if spec.amax_only:
        if spec.bc:  # split pass 1: one partial amax per (row, chunk)
            nch = k // bk
            live = r[:, 0] < m
            plgpu.store(amax_ref.at[_oob(r[:, 0] * nch + pid1, live, m * nch)], _amax(a, 1), mask=live)
        else:
            plgpu.store(amax_ref.at[pl.ds(row0, bm)], _amax(a, 1), mask=r[:, 0] < m)
        return

    # ---- quantize
    if fmt in (QuantFormat.FP8, QuantFormat.INT8):
        gs_ = desc.group_shape
        if spec.tensor_scale_given or (not desc.static and gs_.is_per_token()):
            s = row_scale(None if spec.tensor_scale_given or spec.row_amax_given else _amax(a, 1, keepdims=True))
            store_data(row_codes(v, s))
            store_row_scale(s)
            return
        if desc.static:
            if gs_.is_per_tensor():
                s = plgpu.load(s_in_ref.at[pl.ds(0, 1)]).reshape(1, 1)
            elif gs_.is_per_token():
                s = plgpu.load(s_in_ref.at[pl.ds(row0, bm)], mask=r[:, 0] < m, other=1.0)[:, None]
            elif gs_.is_per_channel():
                s = plgpu.load(s_in_ref.at[pl.ds(col0, bk)], mask=c[0] < k, other=1.0)[None, :]
            else:  # static 2-D blocks, row-major [cdiv(m, gr), cdiv(k, gc)]
                gr, gc = gs_
                nkb = cdiv(k, gc)
                s = plgpu.load(s_in_ref.at[_oob((r // gr) * nkb + c // gc, mask, cdiv(m, gr) * nkb)],
                               mask=mask, other=1.0)
            if fmt == QuantFormat.FP8:
                q = sat(v * mth.div(1.0, s))
            else:
                q = sat(mth.div(v, s))
            store_data(q)
            return  # static scales are the caller's; the wrapper passes them through
        # dynamic per-token-group
        gsize = gs_.col
        ng = bk // gsize
        s = dynamic_scale(_amax(a.reshape(bm, ng, gsize), 2))
        s_full = jnp.broadcast_to(s[:, :, None], (bm, ng, gsize)).reshape(bm, bk)
        store_data(sat(mth.div(v, s_full)))
        n_groups = k // gsize
        gcol = col0 // gsize + jnp.arange(ng, dtype=jnp.int32)[None, :]
        live = (r < m) & (gcol < n_groups)
        if desc.layout == ScaleLayout.PACKED_UE8M0:
            b = jnp.where(live, (jax.lax.bitcast_convert_type(s, U32) >> 23) & 0xFF, 0).astype(U32)
            per = min(ng, 4)
            nw = ng // per
            shifts = (jnp.arange(per, dtype=U32) * 8)[None, None, :]
            words = jnp.sum(b.reshape(bm, nw, per) << shifts, axis=-1)
            mp, nwords = round_up(m, 4), cdiv(n_groups, 4)
            wcol = col0 // (4 * gsize) + jnp.arange(nw, dtype=jnp.int32)[None, :]
            wmask = (r < mp) & (wcol < nwords)
            plgpu.store(scale_ref.at[_oob(wcol * mp + r, wmask, mp * nwords)],
                        jax.lax.bitcast_convert_type(words, jnp.int32), mask=wmask)
            return
        off, smask = _scale_offsets(desc.layout, r, gcol, m, n_groups)
        plgpu.store(scale_ref.at[_oob(off, smask, scale_ref.shape[0])], jnp.where(live, s, 0.0), mask=smask)
        return

    # ---- NVFP4 / MXFP8 / MXFP4: block scales per 16 / 32
    gsize = desc.group_shape.col
    ng = bk // gsize
    n_groups = k // gsize
    groups = v.reshape(bm, ng, gsize)
    gcol = col0 // gsize + jnp.arange(ng, dtype=jnp.int32)[None, :]
    live = (r < m) & (gcol < n_groups)
    if desc.static:
        off, smask = _scale_offsets(desc.layout, r, gcol, m, n_groups)
        sbytes = plgpu.load(s_in_ref.at[_oob(off, live, s_in_ref.shape[0])], mask=live, other=0)
    if fmt == QuantFormat.NVFP4:
        gs = plgpu.load(gs_ref.at[pl.ds(0, 1)]).reshape(1, 1)
        if desc.static:
            sf = jax.lax.bitcast_convert_type(sbytes, ref.E4M3).astype(F32)
        else:
            amax16 = _amax(jnp.abs(groups), 2)
            sf32 = mth.div(gs * amax16, ref.FP4_MAX)
            sf = jnp.where(jnp.isnan(sf32), jnp.nan,  # Triton's clip drops NaN; the policy keeps it
                           mth.round_to(jnp.clip(sf32, -ref.FP8_MAX, ref.FP8_MAX), ref.E4M3))
        ratio = jnp.where(sf == 0, 0.0, mth.div(gs, sf))
        codes = ref.e2m1_encode(groups * ratio[:, :, None]).reshape(bm, bk)
        sbytes = jax.lax.bitcast_convert_type(sf.astype(ref.E4M3), jnp.uint8)
    else:
        emax = ref.FP8_MAX if fmt == QuantFormat.MXFP8 else ref.FP4_MAX
        if not desc.static:
            sbytes = ref.e8m0_from_f32(mth.div(_amax(jnp.abs(groups), 2), emax))
        sf = ref.f32_from_e8m0(sbytes)
        y = mth.div(groups, sf[:, :, None]).reshape(bm, bk)
        codes = ref.sat_fp8(y) if fmt == QuantFormat.MXFP8 else ref.e2m1_encode(y)
    if key.is_fp4:
        pairs = codes.reshape(bm, bk // 2, 2).astype(U32)
        packed = jnp.sum(pairs << (jnp.arange(2, dtype=U32) * 4)[None, None, :], axis=-1).astype(jnp.uint8)
        store_data(packed, bk // 2, col0 // 2)
    else:
        store_data(codes)
    if not desc.static:
        off, smask = _scale_offsets(desc.layout, r, gcol, m, n_groups)
        plgpu.store(scale_ref.at[_oob(off, smask, scale_ref.shape[0])], jnp.where(live, sbytes, 0).astype(jnp.uint8),
                    mask=smask)
        covered = (k // bk) * ng if spec.bc else ng  # groups the programs of a row cover
        if desc.layout == ScaleLayout.SWIZZLED_128x4 and covered < round_up(n_groups, 4):
            # the tile pads groups to 4 but the row holds fewer: the last chunk zeroes the padding columns
            pcol = covered + jnp.arange(4, dtype=jnp.int32)[None, :]
            off, smask = _scale_offsets(desc.layout, r, pcol, m, n_groups)
            smask = smask & last_chunk
            plgpu.store(scale_ref.at[_oob(off, smask, scale_ref.shape[0])], jnp.zeros((bm, 4), jnp.uint8),
                        mask=smask)


# ------------------------------------------------------------------ wrapper
def _default_interpret() -> bool:
    return jax.default_backend() != "gpu"


def _rows_cover(key: QuantKey, m: int) -> int:
    lay = key.scale.layout
    if not key.scale.group_shape.is_per_group() or key.scale.static:
        return m
    if lay in (ScaleLayout.COL_MAJOR_TMA, ScaleLayout.PACKED_UE8M0):
        return round_up(m, 4)
    if lay == ScaleLayout.SWIZZLED_128x4:
        return round_up(m, 128)
    return m


def _chunk_width(op: str, key: QuantKey, k: int, max_width: int = 2048) -> int:
    """Column chunk for group-local keys (per-group scales, NVFP4/MX, static scales): the
    largest power of two <= ``max_width`` dividing K and holding whole groups (whole
    packed words for PACKED_UE8M0); 0 (whole rows) for RMSNorm and per-token/per-tensor
    dynamic scales, which need the full row."""
    desc = key.scale
    gs = desc.group_shape
    if op == "rms" or (not desc.static and not gs.is_per_group()):
        return 0
    g = gs.col if gs.is_per_group() else 1
    if gs.row > 1 and not gs.is_per_tensor():  # static 2-D blocks: keep chunks inside column blocks
        g = max(g, 1)
    least = max(g * (4 if desc.layout == ScaleLayout.PACKED_UE8M0 else 1), 64)
    w = max_width
    while w >= least:
        if k % w == 0:
            return w
        w //= 2
    return 0


def _check_key(key: QuantKey) -> None:
    gs = key.scale.group_shape
    fmt = key.format
    if fmt in (QuantFormat.FP8, QuantFormat.INT8) and not key.scale.static:
        if not (gs.is_per_tensor() or gs.is_per_token() or gs.is_per_group()):
            raise QuantLayoutError(f"{key}: dynamic scales need per-tensor, per-token or per-token-group groups")
    if fmt == QuantFormat.INT8 and not key.scale.static and not gs.is_per_token():
        raise QuantLayoutError(f"{key}: dynamic int8 is per-token only (vLLM's scaled_int8_quant)")


def _poisoned(sds: jax.ShapeDtypeStruct) -> jax.Array:
    """A buffer of 0xA5 bytes (NaN-free but never a value a kernel writes by chance)."""
    nbytes = int(np.prod(sds.shape, dtype=np.int64)) * jnp.dtype(sds.dtype).itemsize
    raw = jnp.full((nbytes,), 0xA5, jnp.uint8)
    if jnp.dtype(sds.dtype).itemsize == 1:
        return jax.lax.bitcast_convert_type(raw, sds.dtype).reshape(sds.shape)
    return jax.lax.bitcast_convert_type(raw.reshape(-1, jnp.dtype(sds.dtype).itemsize), sds.dtype).reshape(sds.shape)


def _run(op: str, x: jax.Array, key: QuantKey, *, k: int, weight=None, residual=None, eps: float = 1e-6,
         add_in_f32: bool = True, scale=None, global_scale=None, scale_ub=None,
         config: ProducerConfig | None = None, interpret: bool | None = None, poison: bool = False,
         axis_name: str | tuple[str, ...] | None = None, row_amax_parts: jax.Array | None = None):
    if not isinstance(key, QuantKey):
        raise TypeError(f"key must be a QuantKey, got {key!r}")
    if axis_name is not None and (key.scale.static or not key.scale.group_shape.is_per_tensor()):
        raise QuantLayoutError(f"{key}: axis_name (a cross-shard amax) applies only to dynamic per-tensor keys; "
                               "other scales are computed from whole local rows or groups")
    if x.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        raise QuantLayoutError(f"input dtype must be float32/float16/bfloat16, got {x.dtype}")
    if x.ndim < 1:
        raise QuantLayoutError("input must have at least one dimension")
    _check_key(key)
    check_k_divisible(key, k)
    if key.is_fp4 and k % 2:
        raise QuantLayoutError(f"{key}: packed fp4 needs an even K, got {k}")
    interpret = _default_interpret() if interpret is None else interpret
    lead = x.shape[:-1]
    m = int(np.prod(lead, dtype=np.int64))
    x2 = x.reshape(m, x.shape[-1])
    if pl.next_power_of_2(k) > MAX_BLOCK_ELEMS:
        raise QuantLayoutError(f"rows wider than {MAX_BLOCK_ELEMS} elements are not supported yet (K={k})")
    fmt, desc = key.format, key.scale
    bc = _chunk_width(op, key, k)
    dyn_tensor = fmt in (QuantFormat.FP8, QuantFormat.INT8) and not desc.static and desc.group_shape.is_per_tensor()
    per_row = op != "rms" and (dyn_tensor or (fmt in (QuantFormat.FP8, QuantFormat.INT8) and not desc.static
                                              and desc.group_shape.is_per_token()))  # may loop / split rows
    cfg = config or heuristic_config(m, bc or k, op, chunked=bool(bc), per_row=per_row)
    if row_amax_parts is not None:  # quantize_given_row_amax: the split kernel's second pass only
        if not (per_row and desc.group_shape.is_per_token()) or op != "quant":
            raise QuantLayoutError(f"{key}: given row amaxes apply to dynamic per-token fp8/int8 quantization")
        n_chunks = row_amax_parts.shape[-1]
        if row_amax_parts.shape != (m, n_chunks) or k % n_chunks:
            raise QuantLayoutError(f"row_amax_parts must be [M={m}, P] with P dividing K={k}, got "
                                   f"{tuple(row_amax_parts.shape)}")
        cfg = dataclasses.replace(config or ProducerConfig(num_warps=8), block_m=1, row_chunk=k // n_chunks,
                                  split=True)
    if per_row and cfg.row_chunk:
        if k % cfg.row_chunk:
            raise QuantLayoutError(f"row_chunk {cfg.row_chunk} does not divide the row width {k}")
        bc = cfg.row_chunk
    orig_shape = (*lead, k)

    inputs = [x2]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise QuantLayoutError(f"residual must be {tuple(x.shape)} {x.dtype}, got "
                                   f"{tuple(residual.shape)} {residual.dtype}")
        inputs.append(residual.reshape(m, k))
    if op == "rms":
        weight = jnp.asarray(weight)
        if weight.shape != (k,):
            raise QuantLayoutError(f"weight must have shape ({k},), got {tuple(weight.shape)}")
        inputs.append(weight)
    static_storage = None
    scale_slot = len(inputs)  # kernel order: x, residual, weight, scale, global_scale, scale_ub
    if desc.static:
        static_storage = ref.static_scale_storage(key, scale, m, k)
        flat = static_storage.reshape(-1)
        # the kernel reads f32 scales for fp8/int8, raw e4m3/e8m0 bytes (given as such or as uint8) otherwise
        if fmt in (QuantFormat.FP8, QuantFormat.INT8):
            inputs.append(flat.astype(F32))
        else:
            inputs.append(flat if flat.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(flat, jnp.uint8))
    if fmt == QuantFormat.NVFP4:
        if global_scale is None:
            raise QuantLayoutError(f"{key} needs global_scale (the quantisation multiplier 448*6/amax)")
        inputs.append(ref.as_f32_scalar(global_scale, "global_scale").reshape(1))
    has_ub = scale_ub is not None
    if has_ub:
        inputs.append(ref.as_f32_scalar(scale_ub, "scale_ub").reshape(1))

    spec = _Spec(op=op, key=key, m=m, k=k, in_dtype=x.dtype, block_m=cfg.block_m, rows_cover=_rows_cover(key, m),
                 has_residual=residual is not None, add_in_f32=add_in_f32, eps=float(eps), has_ub=has_ub,
                 interpret=interpret, bc=bc, loop=per_row and bool(cfg.row_chunk) and not cfg.split)
    n_blocks = cdiv(spec.rows_cover, cfg.block_m)
    programs = n_blocks
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def call(spec_, inputs_, out_shapes):
        aliases = {}
        if poison:  # outputs start as 0xA5 bytes, so any element the kernel misses shows
            spec_ = dataclasses.replace(spec_, n_poison=len(out_shapes))
            aliases = {len(inputs_) + i: i for i in range(len(out_shapes))}
            inputs_ = [*inputs_, *map(_poisoned, out_shapes)]
        return pl.pallas_call(
            functools.partial(_kernel, spec=spec_, cfg=cfg),
            out_shape=out_shapes,
            grid=(programs, (spec_.k // spec_.bc) if spec_.bc and not spec_.loop else 1),
            input_output_aliases=aliases,
            compiler_params=params, interpret=interpret, name=f"quantact_{op}_{fmt.value}",
        )(*inputs_)

    data_shape = (m, k // 2) if key.is_fp4 else (m, k)
    data_dtype = jnp.uint8 if key.is_fp4 else jnp.dtype(key.dtype)
    res_shape = [jax.ShapeDtypeStruct((m, k), x.dtype)] if residual is not None else []

    n_parts = m * (k // bc) if per_row and cfg.split else m  # pass-1 amaxes: per row, or per (row, chunk)
    if dyn_tensor:
        # pass 1: per-row (per-chunk) amax of v; XLA: their max; pass 2: the scale (in-kernel division), the codes
        amax_rows = call(dataclasses.replace(spec, amax_only=True), inputs, [jax.ShapeDtypeStruct((n_parts,), F32)])[0]
        amax_t = jnp.max(amax_rows).reshape(1)  # the scale is formed in pass 2 (exact division)
        if axis_name is not None:  # under shard_map: the amax of every shard (max is exact in any order)
            amax_t = jax.lax.pmax(amax_t, axis_name)
        q_spec = dataclasses.replace(spec, tensor_scale_given=True)
        q_inputs = [*inputs[:scale_slot], amax_t, *inputs[scale_slot:]]
        outs = call(q_spec, q_inputs, [jax.ShapeDtypeStruct(data_shape, data_dtype),
                                           jax.ShapeDtypeStruct((1,), F32), *res_shape])
        data, scale_out = outs[0], outs[1]
    elif per_row and cfg.split:
        # per-token over column-chunk programs: pass 1 the partial amaxes, pass 2 their max, the scale, the codes
        if row_amax_parts is not None:
            parts = jnp.asarray(row_amax_parts, F32).reshape(-1)
        else:
            parts = call(dataclasses.replace(spec, amax_only=True), inputs, [jax.ShapeDtypeStruct((n_parts,), F32)])[0]
        q_spec = dataclasses.replace(spec, row_amax_given=True)
        outs = call(q_spec, [*inputs[:scale_slot], parts, *inputs[scale_slot:]],
                    [jax.ShapeDtypeStruct(data_shape, data_dtype), jax.ShapeDtypeStruct((m,), F32), *res_shape])
        data, scale_out = outs[0], outs[1].reshape(scale_storage_shape(desc, m, k))
    else:
        storage_shape = scale_storage_shape(desc, m, k)
        sdt = desc.storage_dtype
        kernel_sdt = jnp.uint8 if sdt in ("float8_e4m3fn", "float8_e8m0fnu") else jnp.dtype(sdt)
        n_scale = int(np.prod(storage_shape)) if not desc.static else 1
        outs = call(spec, inputs, [jax.ShapeDtypeStruct(data_shape, data_dtype),
                                   jax.ShapeDtypeStruct((n_scale,), kernel_sdt), *res_shape])
        data = outs[0]
        if desc.static:
            scale_out = static_storage
        else:
            scale_out = outs[1].reshape(storage_shape)
            if kernel_sdt != jnp.dtype(sdt):
                scale_out = jax.lax.bitcast_convert_type(scale_out, jnp.dtype(sdt))
    res_out = outs[2].reshape(x.shape) if residual is not None else None
    qa = QuantizedActivation(data.reshape(*lead, data_shape[-1]), scale_out, x.dtype, orig_shape, key)
    return qa, res_out


def _key_and_scales(key: QuantKey | None, layer: Any, scale, global_scale):
    """Resolve the key and scales from an explicit key or a consumer layer's exposure."""
    return resolve_input_quant(key, layer, scale, global_scale, lambda g: 1.0 / jnp.asarray(g, F32))


# ------------------------------------------------------------------ public ops
def quantize(x: jax.Array, key: QuantKey | None = None, *, layer: Any = None, scale: Any = None,
             global_scale: Any = None, scale_ub: Any = None, config: ProducerConfig | None = None,
             interpret: bool | None = None, axis_name: str | tuple[str, ...] | None = None,
             _poison: bool = False) -> QuantizedActivation:
    """Quantize ``x [..., K]`` with ``key`` (or the key ``layer`` exposes) in one Pallas pass.

    Same arguments and bits as ``reference.quantize``. ``interpret`` defaults to
    True when JAX's default backend is not a GPU.
    ``axis_name``: under ``shard_map``, the mesh axes a dynamic per-tensor key takes its amax
    over (``lax.pmax``), so every shard uses the global scale (dynamic per-tensor keys only).
    """
    key, scale, global_scale = _key_and_scales(key, layer, scale, global_scale)
    x = jnp.asarray(x)
    return _run("quant", x, key, k=x.shape[-1], scale=scale, global_scale=global_scale, scale_ub=scale_ub,
                config=config, interpret=interpret, poison=_poison, axis_name=axis_name)[0]


def quantize_given_row_amax(x: jax.Array, parts: jax.Array, key: QuantKey, *, orig_dtype: Any = None,
                            max_chunk: int = 2048, interpret: bool | None = None,
                            _poison: bool = False) -> QuantizedActivation:
    """Dynamic per-token quantization of ``x [M, K]`` whose row amaxes come as partial maxima:
    ``parts [M, P]``, ``parts[m, j]`` = max |x[m, c]| over the j-th of P equal column chunks (what a
    GEMM epilogue that produced ``x`` tile by tile can emit: ``mosaic_gate_up.gate_up_silu``). One
    read of ``x``: the split kernel's second pass alone (the row's amax from its chunk maxima, the
    scale, the codes), where :func:`quantize` first reads ``x`` for the amax. Same bits as
    ``quantize(x, key)`` when ``parts`` are the true chunk maxima (max is exact in any grouping).

    The chunk maxima are first merged (exact) into chunks up to ``max_chunk`` wide, one kernel
    program each. ``orig_dtype``: the activation's recorded dtype (default ``x.dtype``), e.g. the
    dtype of the unfused op whose f32 intermediate ``x`` is.
    """
    x = jnp.asarray(x)
    if x.ndim != 2 or parts.ndim != 2 or parts.shape[0] != x.shape[0] or x.shape[1] % parts.shape[1]:
        raise QuantLayoutError(f"x must be [M, K] and parts [M, P] with P dividing K, got {tuple(x.shape)} and "
                               f"{tuple(parts.shape)}")
    m, k = x.shape
    width = k // parts.shape[1]
    group = 1
    while width * group * 2 <= max_chunk and parts.shape[1] % (group * 2) == 0:
        group *= 2
    if group > 1:
        parts = jnp.max(jnp.asarray(parts, F32).reshape(m, -1, group), axis=-1)
    qa = _run("quant", x, key, k=k, interpret=interpret, poison=_poison, row_amax_parts=parts)[0]
    if orig_dtype is not None and jnp.dtype(orig_dtype) != x.dtype:
        qa = QuantizedActivation(qa.data, qa.scale, jnp.dtype(orig_dtype), qa.orig_shape, qa.quant_key)
    return qa


def rms_norm_quant(x: jax.Array, weight: jax.Array, key: QuantKey | None = None, *, layer: Any = None,
                   eps: float = 1e-6, residual: jax.Array | None = None, scale: Any = None,
                   global_scale: Any = None, scale_ub: Any = None, config: ProducerConfig | None = None,
                   interpret: bool | None = None, axis_name: str | tuple[str, ...] | None = None,
                   _poison: bool = False) -> tuple[QuantizedActivation, jax.Array | None]:
    """Fused (residual add +) RMSNorm -> quant; returns ``(activation, residual_out)``.

    Static keys add the residual in the input dtype, dynamic keys in f32 (vLLM).
    ``axis_name``: under ``shard_map``, the mesh axes a dynamic per-tensor key takes its amax
    over (``lax.pmax``), so every shard uses the global scale (dynamic per-tensor keys only).
    """
    key, scale, global_scale = _key_and_scales(key, layer, scale, global_scale)
    x = jnp.asarray(x)
    return _run("rms", x, key, k=x.shape[-1], weight=weight, residual=residual, eps=eps,
                add_in_f32=not key.scale.static, scale=scale, global_scale=global_scale, scale_ub=scale_ub,
                config=config, interpret=interpret, poison=_poison, axis_name=axis_name)


def silu_and_mul_quant(x: jax.Array, key: QuantKey | None = None, *, layer: Any = None, scale: Any = None,
                       global_scale: Any = None, scale_ub: Any = None, config: ProducerConfig | None = None,
                       interpret: bool | None = None, axis_name: str | tuple[str, ...] | None = None,
                       _poison: bool = False) -> QuantizedActivation:
    """Fused SiLU-and-mul -> quant of ``x [..., 2d] = [gate | up]``.

    ``axis_name``: under ``shard_map``, the mesh axes a dynamic per-tensor key takes its amax
    over (``lax.pmax``), so every shard uses the global scale (dynamic per-tensor keys only).
    """
    key, scale, global_scale = _key_and_scales(key, layer, scale, global_scale)
    x = jnp.asarray(x)
    if x.shape[-1] % 2:
        raise QuantLayoutError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    return _run("silu", x, key, k=x.shape[-1] // 2, scale=scale, global_scale=global_scale,
                scale_ub=scale_ub, config=config, interpret=interpret, poison=_poison, axis_name=axis_name)[0]


__all__ = ["ProducerConfig", "heuristic_config", "quantize", "quantize_given_row_amax", "rms_norm_quant",
           "silu_and_mul_quant"]
