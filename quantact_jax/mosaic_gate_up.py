"""Mosaic GPU (Hopper) gate/up fp8 GEMM with SiLU-and-mul in the epilogue: the MLP block's M = 4096 lever.

**Experimental: traced and cross-lowered on CPU only, never run on a GPU; nothing calls it by default.**

For a gate/up weight ``B [2I, K]`` (rows ``[gate | up]``, per-channel or per-tensor scales) and an fp8
activation ``A [M, K]`` (per-token or per-tensor scale) it computes, per output element,

    g = T(sa * (sb[j] * (A @ B[j].T)))          u = T(sa * (sb[I + j] * (A @ B[I + j].T)))
    h = silu(g) * u = (g / (1 + exp(-g))) * u   (f32, IEEE division)

with ``T`` the gate/up layer's output dtype: ``g`` and ``u`` are exactly what the unfused path's GEMM
writes (``mosaic_gemm``'s epilogue, the same scale order and rounding), and ``h`` is what the fused
per-token SiLU-and-mul producer forms from them (vLLM's dynamic fused kernel: f32, no intermediate
rounding). Instead of ``[M, 2I]`` in ``T`` it writes ``h [M, I]`` in f32 (the same bytes for bf16)
and each warpgroup tile's row maxima of ``|h|`` (``[I / tile_n, M]``), so that the next step,
:func:`quantact_jax.producers.quantize_given_row_amax`, reads ``h`` once (the per-token scale from the
maxima, then the codes), where the SiLU producer reads ``[M, 2I]`` twice (amax, then codes; the
second read mostly misses L2 at 4096 x 28672: 189-231 us against a ~100 us single-read floor).

Layout: a CTA computes ``tile_m`` rows x ``2 * tile_n`` intermediate columns; the pipeline streams
the A tile and two B tiles per K step (the gate rows and the matching up rows, two views of one
weight: no interleaved copy), and each compute warpgroup keeps two ``tile_m x tile_n`` f32
accumulators (gate and up: 128 registers per thread at 128 x 64). Skeleton as
:mod:`quantact_jax.mosaic_gemm` (persistent grid, warp-specialised TMA pipeline, SMEM + TMA epilogue).

Numerics, to be checked on a GPU: ``jnp.exp`` lowers to ``math.exp`` here (libdevice ``expf``) and
to Triton's exp in the producer; where those differ in the last bit the codes may differ by one step
at a few elements. The row maxima reduce with ``max`` (NaN propagation of Mosaic's reduction
unverified).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from interop.layout import cdiv
from quantact_jax.mosaic_gemm import SMEM_LIMIT, _bcast, _launch, _pad, _store_tile, _tma_rows

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GateUpConfig:
    """``tile_m`` rows x ``tile_n`` intermediate columns per compute warpgroup (two per CTA, side by
    side), K step, pipeline depth, f32 epilogue sub-tile width (32: 128-byte rows) and tile order."""

    tile_m: int = 128
    tile_n: int = 64
    tile_k: int = 128
    stages: int = 3
    epi_tile_n: int = 32
    grid_minor_n: bool = False
    grid_tile_width: int = 8

    def smem_bytes(self) -> int:
        per_stage = (self.tile_m + 4 * self.tile_n) * self.tile_k  # A, 2 x gate rows, 2 x up rows (fp8)
        epilogue = 2 * 2 * 64 * self.epi_tile_n * 4  # two f32 slots per warpgroup
        vectors = 2 * (2 * self.tile_m + 2 * self.tile_n) * 4  # sa, row maxima, sb gate/up per warpgroup
        return self.stages * per_stage + epilogue + vectors


def supports(m: int, n2: int, k: int, cfg: GateUpConfig | None = None) -> bool:
    """True when the kernel takes ``A [m, k] @ B [n2, k].T`` with ``B``'s rows ``[gate | up]``."""
    cfg = cfg or GateUpConfig()
    inter = n2 // 2
    return (m >= 1 and n2 % 2 == 0 and inter % (2 * cfg.tile_n) == 0 and k % cfg.tile_k == 0
            and cfg.tile_m % 64 == 0 and cfg.tile_n % cfg.epi_tile_n == 0 and cfg.smem_bytes() <= SMEM_LIMIT)


def _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, h_gmem, amax_gmem, *, cfg: GateUpConfig, inter: int, out_dtype):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = a_gmem.shape
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_n = 2 * tn
    swizzle = plgpu.find_swizzle(tk * 8)  # fp8: one byte per element
    transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    m_iters, n_iters, k_iters = cdiv(m, tm), inter // cta_n, k // tk
    em, en = 64, cfg.epi_tile_n
    out_swizzle = plgpu.find_swizzle(en * 4 * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))

    def pipeline(body, compute_context):
        b_spec = plgpu.BlockSpec((cta_n, tk), lambda ki: (0, ki), transforms=transforms, memory_space=plgpu.SMEM)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((tm, tk), lambda ki: (0, ki), transforms=transforms, memory_space=plgpu.SMEM),
                      b_spec, b_spec],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=compute_context)

    ignore = lambda *_, **__: None  # allocations do not depend on the bodies

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, b_gmem),
                       out_smem=plgpu.SMEM((2, 2, em, en), F32, transforms=out_transforms),
                       amax_smem=plgpu.SMEM((2, tm), F32), sa_smem=plgpu.SMEM((2, tm), F32),
                       sb_smem=plgpu.SMEM((2, 2, tn), F32), bars=plgpu.Barrier(num_barriers=6), collective_axes="wg")
    def _scope(allocs, out_smem, amax_smem, sa_smem, sb_smem, bars):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0, cfg.grid_tile_width)
            m_sl = pl.ds(mi * tm, tm)
            c0 = ni * cta_n + wg * tn  # this warpgroup's first intermediate column

            def compute_context(run):
                vecs = [(sa_gmem.at[m_sl], sa_smem.at[wg]), (sb_gmem.at[pl.ds(c0, tn)], sb_smem.at[wg, 0]),
                        (sb_gmem.at[pl.ds(inter + c0, tn)], sb_smem.at[wg, 1])]
                for j, (src, dst) in enumerate(vecs):
                    plgpu.copy_gmem_to_smem(src, dst, bars.at[wg * 3 + j])

                @functools.partial(pl.run_scoped, acc_g=plgpu.ACC((tm, tn), F32), acc_u=plgpu.ACC((tm, tn), F32))
                def _acc(acc_g, acc_u):
                    run((acc_g, acc_u))
                    g, u = acc_g[...], acc_u[...]
                    for j in range(3):
                        plgpu.barrier_wait(bars.at[wg * 3 + j])
                    sa = _bcast(sa_smem.at[wg], (tm, tn), 0)
                    # the unfused GEMM's outputs, rounded to its dtype, then the producer's f32 SiLU-and-mul
                    g = (sa * (_bcast(sb_smem.at[wg, 0], (tm, tn), 1) * g)).astype(out_dtype).astype(F32)
                    u = (sa * (_bcast(sb_smem.at[wg, 1], (tm, tn), 1) * u)).astype(out_dtype).astype(F32)
                    h = g / (1.0 + jnp.exp(-g)) * u
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores
                    amax_smem.at[wg][...] = jnp.max(jnp.abs(h), axis=1)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(amax_smem.at[wg], amax_gmem.at[ni * 2 + wg, m_sl])
                    _store_tile(h, out_smem.at[wg], h_gmem, mi * tm, c0)

            def mma(_, a_smem, bg_smem, bu_smem, carry):
                acc_g, acc_u = carry
                plgpu.wgmma(acc_g, a_smem, bg_smem.at[pl.ds(wg * tn, tn)].T)
                plgpu.wgmma(acc_u, a_smem, bu_smem.at[pl.ds(wg * tn, tn)].T)
                plgpu.wgmma_wait(0)
                return carry

            pipeline(mma, compute_context)(a_gmem.at[m_sl, :], b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                                           b_gmem.at[pl.ds(inter + ni * cta_n, cta_n), :], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gate_up_silu(a: jax.Array, b: jax.Array, sa: jax.Array, sb: jax.Array, out_dtype=jnp.bfloat16,
                 cfg: GateUpConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """``a [M, K] fp8``, ``b [2I, K] fp8`` (rows ``[gate | up]``), ``sa [M] or [1]``, ``sb [2I] or [1]``
    f32 -> ``(h [M, I] f32, row maxima of |h| [M, I / tile_n] f32)``; ``out_dtype``: the gate/up
    layer's output dtype, to which ``g`` and ``u`` are rounded (module docstring). Call
    :func:`supports` first."""
    cfg = cfg or GateUpConfig()
    m, k = a.shape
    n2 = b.shape[0]
    if b.shape[1] != k or not supports(m, n2, k, cfg):
        raise ValueError(f"the gate/up SiLU GEMM does not take A {a.shape} B {b.shape} with {cfg}")
    inter = n2 // 2
    a = _tma_rows(a)
    mp = cdiv(m, cfg.tile_m) * cfg.tile_m
    sa = _pad(jnp.broadcast_to(sa.astype(F32).reshape(-1), (m,)), mp)
    sb = jnp.broadcast_to(sb.astype(F32).reshape(-1), (n2,))
    f = _launch(functools.partial(_kernel, cfg=cfg, inter=inter, out_dtype=jnp.dtype(out_dtype)),
                (jax.ShapeDtypeStruct((a.shape[0], inter), F32), jax.ShapeDtypeStruct((inter // cfg.tile_n, mp), F32)))
    h, amax = f(a, b, sa, sb)
    return h[:m], amax[:, :m].T


__all__ = ["GateUpConfig", "gate_up_silu", "supports"]
