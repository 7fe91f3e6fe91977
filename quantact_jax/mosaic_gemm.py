"""Mosaic GPU (Hopper) fp8 scaled GEMM: ``out = sa[m] * (sb[n] * (A @ B.T)) (+ bias[n])``.

The kernel the consumer dispatches to on an H100 for per-tensor and per-token x per-channel
scales. It follows JAX's ``hopper_matmul_mgpu.py`` (a persistent grid of one CTA per SM, a
TMA pipeline fed by a memory warpgroup, two compute warpgroups issuing wgmma), changed where
our contract differs:

- B is the ``[N, K]`` weight (K-major, as ``torch.nn.Linear.weight``): its SMEM tile is
  ``[tile_n, tile_k]`` and wgmma reads it transposed, the only fp8 operand order Hopper has;
- the f32 epilogue applies the scales in vLLM's order ``sa * (sb * acc)``, then the bias,
  then rounds once to the output dtype; per-tensor scales arrive as broadcast vectors;
- M, N and K need not be multiples of the tiles: TMA zero-fills out-of-bounds loads and
  clips out-of-bounds stores; the scale and bias vectors are padded to whole tiles.

Outputs: bf16, fp16 or f32. Accumulation: the tensor core's fp8 accumulator over the whole
K, like cuBLASLt's ``use_fast_accum=True`` (it keeps about 14 mantissa bits; docs/numerics.md).

Requirements: Mosaic tiles the GMEM side of every TMA descriptor like the SMEM side, so
``K % tile_k == 0`` and ``N % epi_tile_n == 0`` (LLM shapes are multiples of 128); M only
is padded (to a multiple of 8) when it is above 8 and not a multiple of 8, which costs a copy
of the activation and the output. :func:`supports` says whether a problem fits; the consumer
falls back to the Triton kernel otherwise. No interpret mode (the Mosaic interpreter does not run fp8
transposed wgmma), so the CPU tests cover the Triton kernel and the GPU run covers this one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from interop.layout import cdiv

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """CTA tile ``tile_m x 2*tile_n`` (two compute warpgroups side by side along N), K step,
    pipeline depth, epilogue sub-tile and the L2-friendly tile order (``grid_tile_width``
    output tiles along the minor grid dimension before moving on). ``delay_release``: each
    warpgroup keeps that many wgmma groups in flight (``wgmma_wait(delay_release)``), so a
    stage's SMEM is released that many K steps late. ``cluster`` "m" or "n": two CTAs, adjacent
    along that dimension, form a cluster and share the other operand's tile by TMA multicast
    (each loads half of it), halving that operand's L2 traffic."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 3
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor_n: bool = False
    grid_tile_width: int = 8
    delay_release: int = 0
    cluster: str | None = None

    def smem_bytes(self, out_itemsize: int = 2) -> int:
        per_stage = (self.tile_m + 2 * self.tile_n) * self.tile_k
        vectors = 2 * (self.tile_m + 2 * self.tile_n) * 4  # sa, sb, bias per warpgroup, f32
        return self.stages * per_stage + 2 * 2 * self.epi_tile_m * self.epi_tile_n * out_itemsize + vectors


SMEM_LIMIT = 232448 - 1024  # bytes of dynamic shared memory per CTA on the H100, less barriers


def heuristic_config(m: int, n: int, k: int, out_dtype=jnp.bfloat16) -> MosaicConfig:
    """The H100 sweep's best (bench/results/): 128x256 CTA tiles, K step 128 (64 when K is
    not a multiple of 128), 3 stages, M-minor tile order in bands of 8. Decode-sized M (<= 64):
    one 64-row tile, narrow N tiles so that every SM streams its own slice of the weight, a deep
    pipeline to keep enough bytes in flight, and 2-CTA clusters sharing the activation tile (H100,
    64x8192x8192, device time: 25.9 us with 256-wide K steps, 4 stages, clusters; 26.1 without
    clusters; 26.4 with 128-wide steps; the swap-AB decode kernel 27.6)."""
    tk = 128 if k % 128 == 0 else 64
    if m <= 64:
        tk = 256 if k % 256 == 0 else tk
        return MosaicConfig(tile_m=64, tile_n=32, tile_k=tk, stages=1024 // tk, epi_tile_m=64, epi_tile_n=32,
                            cluster="n")
    # an f32 output's epilogue tiles are 32 wide: the same 128-byte swizzled rows
    return MosaicConfig(tile_k=tk, stages=3 if tk == 128 else 6, epi_tile_n=128 // jnp.dtype(out_dtype).itemsize)


def supports(m: int, n: int, k: int, out_dtype, cfg: MosaicConfig | None = None) -> bool:
    """True when the Mosaic kernel can run this problem (TMA tiling, M at least one tile)."""
    cfg = cfg or heuristic_config(m, n, k, out_dtype)
    size = jnp.dtype(out_dtype).itemsize
    return (k % cfg.tile_k == 0 and n % cfg.epi_tile_n == 0 and n >= 2 * cfg.tile_n and size in (2, 4)
            and cfg.epi_tile_n * size <= 128 and cfg.smem_bytes(size) <= SMEM_LIMIT
            and 0 <= cfg.delay_release < cfg.stages and cfg.cluster in (None, "m", "n"))


def _bcast(ref, shape: tuple[int, int], dim: int) -> jax.Array:
    """An SMEM vector loaded in the wgmma register layout and broadcast over a ``shape`` tile:
    ``dim`` 0 for one value per row, 1 for one per column (GMEM loads into that layout are not
    supported, hence the SMEM staging)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return lax.broadcast_in_dim(plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim)), shape, [dim])


def _store_tile(out: jax.Array, out_smem, out_gmem, r0, c0, start: int = 0) -> int:
    """Write the register tile ``out`` to ``out_gmem[r0:, c0:]`` through the rotating SMEM epilogue
    sub-tiles ``out_smem [slots, em, en]`` by TMA. ``start`` continues a rotation across calls;
    returns where it stopped. The caller waits for the previous tile's stores first."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    slots, em, en = out_smem.shape
    t = start
    for ei in range(out.shape[0] // em):
        for ej in range(out.shape[1] // en):
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)  # this slot's last store has read it
            out_smem[t % slots] = out[ei * em:(ei + 1) * em, ej * en:(ej + 1) * en]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[t % slots],
                                    out_gmem.at[pl.ds(r0 + ei * em, em), pl.ds(c0 + ej * en, en)])
            t += 1
    return t


def _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, bias_gmem, out_gmem, *, cfg: MosaicConfig):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    out_dtype = out_gmem.dtype
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_n = 2 * tn
    swizzle = plgpu.find_swizzle(tk * 8)  # fp8: one byte per element
    transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    cm, cn = _cluster_shape(cfg)
    m_iters, n_iters, k_iters = cdiv(m, cm * tm), cdiv(n, cn * cta_n), cdiv(k, tk)
    em, en = cfg.epi_tile_m, cfg.epi_tile_n
    out_swizzle = plgpu.find_swizzle(en * jnp.dtype(out_dtype).itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
                      plgpu.SwizzleTransform(out_swizzle))
    n_slots = min(2, (tm * tn) // (em * en))

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((tm, tk), lambda ki: (0, ki), transforms=transforms, memory_space=plgpu.SMEM,
                                      delay_release=cfg.delay_release,
                                      collective_axes=("cluster",) if cfg.cluster == "n" else ()),
                      plgpu.BlockSpec((cta_n, tk), lambda ki: (0, ki), transforms=transforms,
                                      memory_space=plgpu.SMEM, delay_release=cfg.delay_release,
                                      collective_axes=("cluster",) if cfg.cluster == "m" else ())],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=compute_context)

    ignore = lambda *_, **__: None  # allocations do not depend on the bodies

    nv = 3 if bias_gmem is not None else 2  # scale vectors staged per warpgroup: sa, sb (, bias)

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
                       out_smem=plgpu.SMEM((2, n_slots, em, en), out_dtype, transforms=out_transforms),
                       sa_smem=plgpu.SMEM((2, tm), F32), sb_smem=plgpu.SMEM((2, nv - 1, tn), F32),
                       bars=plgpu.Barrier(num_barriers=2 * nv), collective_axes="wg")
    def _scope(allocs, out_smem, sa_smem, sb_smem, bars):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                        cfg.grid_tile_width)
            if cfg.cluster is not None:  # the cluster's tile pair; this CTA takes one of the two
                cta = lax.axis_index("cluster")
                mi, ni = (mi * 2 + cta, ni) if cfg.cluster == "m" else (mi, ni * 2 + cta)
            m_sl = pl.ds(mi * tm, tm)
            n0 = ni * cta_n + wg * tn  # this warpgroup's first output column

            def compute_context(run):
                # The epilogue's vectors travel by TMA into SMEM while the main loop runs (GMEM
                # loads into the wgmma register layout are not supported).
                vecs = [(sa_gmem.at[m_sl], sa_smem.at[wg]), (sb_gmem.at[pl.ds(n0, tn)], sb_smem.at[wg, 0])]
                if bias_gmem is not None:
                    vecs.append((bias_gmem.at[pl.ds(n0, tn)], sb_smem.at[wg, 1]))
                for j, (src, dst) in enumerate(vecs):
                    plgpu.copy_gmem_to_smem(src, dst, bars.at[wg * nv + j])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), F32))
                def _acc(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...]
                    for j in range(nv):
                        plgpu.barrier_wait(bars.at[wg * nv + j])
                    out = _bcast(sa_smem.at[wg], (tm, tn), 0) * (_bcast(sb_smem.at[wg, 0], (tm, tn), 1) * acc)
                    if bias_gmem is not None:
                        out = out + _bcast(sb_smem.at[wg, 1], (tm, tn), 1)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores
                    _store_tile(out.astype(out_dtype), out_smem.at[wg], out_gmem, mi * tm, n0)

            def mma(_, a_smem, b_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem.at[pl.ds(wg * tn, tn)].T)
                plgpu.wgmma_wait(cfg.delay_release)  # reading acc_ref in the epilogue waits for all
                return acc_ref

            pipeline(mma, compute_context)(a_gmem.at[m_sl, :], b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                                           allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _cluster_shape(cfg: MosaicConfig) -> tuple[int, int]:
    """CTAs per cluster along (M, N)."""
    return (2, 1) if cfg.cluster == "m" else (1, 2) if cfg.cluster == "n" else (1, 1)


def _pad(v: jax.Array, size: int) -> jax.Array:
    return jnp.pad(v, (0, size - v.shape[0])) if v.shape[0] < size else v


def _tma_rows(a: jax.Array) -> jax.Array:
    """``a [M, K]`` as a TMA operand: rows past M are left to TMA (zero-filled on load, dropped on
    store), so no padded copy, except that a descriptor's rows must be fewer than 8 or a multiple
    of 8 (M above 8 is then padded to the next multiple of 8)."""
    m = a.shape[0]
    return a if m <= 8 or m % 8 == 0 else jnp.pad(a, ((0, cdiv(m, 8) * 8 - m), (0, 0)))


def _launch(body, out_type, *, cluster: int = 1, grid: int | None = None, num_threads: int = 3):
    """``plgpu.kernel`` as the Mosaic kernels here run: a persistent grid named "sm" (by default one
    CTA per SM, or with ``cluster`` > 1 one cluster of that many CTAs, axis "cluster", per as many
    SMs), ``num_threads`` warpgroups named "wg" (the last one the pipeline's memory warpgroup),
    warpgroup lowering semantics."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if grid is None:
        grid = getattr(jax.devices()[0], "core_count", 132) // cluster
    clusters = dict(cluster=(cluster,), cluster_names=("cluster",)) if cluster > 1 else {}
    return plgpu.kernel(body, out_type=out_type, grid=(grid,), grid_names=("sm",), num_threads=num_threads,
                        thread_name="wg", **clusters,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def scaled_mm(a: jax.Array, b: jax.Array, sa: jax.Array, sb: jax.Array, bias: jax.Array | None, out_dtype,
              cfg: MosaicConfig | None = None) -> jax.Array:
    """``a [M, K] fp8``, ``b [N, K] fp8``, ``sa [M] or [1]``, ``sb [N] or [1]`` f32, ``bias [N]``
    or None -> ``[M, N]`` in ``out_dtype``. Call :func:`supports` first."""
    m, k = a.shape
    n = b.shape[0]
    cfg = cfg or heuristic_config(m, n, k, out_dtype)
    if not supports(m, n, k, out_dtype, cfg):
        raise ValueError(f"the Mosaic GEMM does not take M={m} N={n} K={k} out {jnp.dtype(out_dtype)} with {cfg}")
    a = _tma_rows(a)
    cm, cn = _cluster_shape(cfg)  # vectors padded to whole cluster tiles (a cluster's second tile may lie past M or N)
    mp, np_ = cdiv(m, cm * cfg.tile_m) * cm * cfg.tile_m, cdiv(n, cn * 2 * cfg.tile_n) * cn * 2 * cfg.tile_n
    sa = _pad(jnp.broadcast_to(sa.astype(F32).reshape(-1), (m,)), mp)
    sb = _pad(jnp.broadcast_to(sb.astype(F32).reshape(-1), (n,)), np_)
    args = [a, b, sa, sb] + ([_pad(bias.astype(F32), np_)] if bias is not None else [])

    def body(a_gmem, b_gmem, sa_gmem, sb_gmem, *rest):
        bias_gmem = rest[0] if bias is not None else None
        _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, bias_gmem, rest[-1], cfg=cfg)

    f = _launch(body, jax.ShapeDtypeStruct((a.shape[0], n), out_dtype), cluster=cm * cn)
    return f(*args)[:m]


# ---------------------------------------------------------------- decode: swap-AB


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Swap-AB decode GEMM for small M (the weight read is the whole cost): each compute
    warpgroup owns ``tile_n`` weight rows, the wgmma M side, and every (padded) activation row,
    the wgmma N side (8..64). ``split_k`` K slices per output tile give every SM a share of the
    weight when N alone makes too few tiles; their f32 partials are summed in XLA in a fixed
    order before the epilogue. ``promote``: each K step's wgmma goes into a zeroed accumulator
    that is added to f32 registers (DeepSeek's promotion), so the tensor core's ~14-bit fp8
    accumulation spans one K step, not all of K: H100, max error / sum|a||w| at K = 8192 is
    8.7e-6 (K step 128) against 3.2e-4 without (bench/decode_gpu.py; Triton's mma.sync: 1.4e-8).
    ``cluster`` > 1: that many CTAs, on adjacent weight tiles, load each activation tile once between
    them by TMA multicast. Every CTA otherwise reads the whole ``[M, K]`` activation from L2 once per
    weight tile: at M = 64 that is as many bytes as the weight itself."""

    tile_n: int = 64
    tile_k: int = 128
    stages: int = 8
    split_k: int = 1
    num_wgs: int = 1
    promote: bool = False  # False: the tensor core's fast accumulator over all K; True: f32 register sums per K step
    cluster: int = 1  # CTAs (adjacent weight tiles) per cluster sharing each activation tile by TMA multicast

    def smem_bytes(self, mp: int) -> int:
        return self.stages * (self.num_wgs * self.tile_n + mp) * self.tile_k + self.num_wgs * self.tile_n * mp * 4 + 4096


def decode_heuristic(m: int, n: int, k: int, num_sms: int = 132) -> DecodeConfig:
    """64-row weight tiles, 256-wide K steps, 4 stages, promoted per K step (H100, device time with the
    glue: 27.2 / 26.4 / 27.8 us at M = 1 / 16 / 64, N = K = 8192; 44.8 at 16x28672x4096; the best of the
    sweep everywhere, 0.1-0.7 us ahead of 128-wide steps, and the promotion costs nothing measurable);
    K split until the tiles cover the SMs. K not a multiple of 256: 128-wide steps, 8 stages."""
    tk = 256 if k % 256 == 0 else 128
    tiles = cdiv(n, 64)
    split = 1
    while tiles * split * 2 <= num_sms + num_sms // 4 and k % (2 * split * tk) == 0:
        split *= 2
    return DecodeConfig(tile_n=64, tile_k=tk, stages=4 if tk == 256 else 8, split_k=split, promote=True)


def decode_rows(m: int) -> int:
    """The activation rows the decode kernel computes (the wgmma N side): M rounded up to 16, so
    that a bf16 row of the transposed output tile is at least 32 bytes (the smallest swizzle)."""
    return cdiv(m, 16) * 16


def decode_supports(m: int, n: int, k: int, out_dtype, cfg: DecodeConfig | None = None) -> bool:
    """True when the swap-AB decode kernel takes this problem (M <= 64, TMA tiling)."""
    cfg = cfg or decode_heuristic(m, n, k)
    mp = decode_rows(m)
    return (m <= 64 and k % (cfg.split_k * cfg.tile_k) == 0 and n % 8 == 0 and jnp.dtype(out_dtype).itemsize in (2, 4)
            and cfg.smem_bytes(mp) <= SMEM_LIMIT
            and cfg.cluster in (1, 2, 4) and (cfg.cluster == 1 or (mp // cfg.cluster) % 8 == 0))


def _decode_kernel(w_gmem, x_gmem, sa_gmem, sb_gmem, bias_gmem, out_gmem, *, cfg: DecodeConfig):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n, k = w_gmem.shape
    mp = decode_rows(x_gmem.shape[0])
    tn, tk, wgs, split, pk, c = cfg.tile_n, cfg.tile_k, cfg.num_wgs, cfg.split_k, cfg.promote, cfg.cluster
    cta_n = wgs * tn
    k_per = k // split
    swizzle = plgpu.find_swizzle(tk * 8)
    transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    out_dtype = out_gmem.dtype
    size = jnp.dtype(out_dtype).itemsize
    out_swizzle = plgpu.find_swizzle(mp * size * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // size)), plgpu.SwizzleTransform(out_swizzle))
    n_groups = cdiv(cdiv(n, cta_n), c)  # groups of c adjacent weight tiles (the CTAs of a cluster)
    has_vecs = split == 1
    nv = (3 if bias_gmem is not None else 2) if has_vecs else 0

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_per // tk,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((cta_n, tk), lambda ki: (0, ki), transforms=transforms,
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((mp, tk), lambda ki: (0, ki), transforms=transforms, memory_space=plgpu.SMEM,
                                      collective_axes=("cluster",) if c > 1 else ())],
            wg_axis="wg", num_compute_wgs=wgs, max_concurrent_steps=cfg.stages, compute_context=compute_context)

    ignore = lambda *_, **__: None  # allocations do not depend on the bodies

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(w_gmem, x_gmem),
                       out_smem=plgpu.SMEM((wgs, tn, mp), out_dtype, transforms=out_transforms),
                       # rows of a multiple of 128 bytes: each warpgroup's TMA destination stays 128-byte
                       # aligned (a 48-row tile's 192-byte rows faulted with a misaligned address, H100)
                       sa_smem=plgpu.SMEM((wgs, cdiv(mp, 32) * 32), F32), sb_smem=plgpu.SMEM((wgs, 2, tn), F32),
                       bars=plgpu.Barrier(num_barriers=max(1, wgs * nv)), collective_axes="wg")
    def _scope(allocs, out_smem, sa_smem, sb_smem, bars):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((n_groups * split,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            ni, s = lin // split, lin % split
            if c > 1:  # this CTA's tile of the group (past N for the last group's extra CTAs: TMA clips them)
                ni = ni * c + lax.axis_index("cluster")
            n0 = ni * cta_n + wg * tn  # this warpgroup's first weight row

            def compute_context(run):
                vecs = []
                if has_vecs:
                    vecs = [(sa_gmem, sa_smem.at[wg, pl.ds(0, mp)]), (sb_gmem.at[pl.ds(n0, tn)], sb_smem.at[wg, 0])]
                    if bias_gmem is not None:
                        vecs.append((bias_gmem.at[pl.ds(n0, tn)], sb_smem.at[wg, 1]))
                for j, (src, dst) in enumerate(vecs):
                    plgpu.copy_gmem_to_smem(src, dst, bars.at[wg * nv + j])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tn, mp), F32))
                def _acc(acc_ref):
                    if pk:
                        _, out = run((acc_ref, plgpu.layout_cast(jnp.zeros((tn, mp), F32), plgpu.Layout.WGMMA)))
                    else:
                        run(acc_ref)
                        out = acc_ref[...]  # [weight rows, activation rows]: the transposed output tile
                    if has_vecs:
                        for j in range(nv):
                            plgpu.barrier_wait(bars.at[wg * nv + j])
                        out = (_bcast(sa_smem.at[wg, pl.ds(0, mp)], (tn, mp), 1)
                               * (_bcast(sb_smem.at[wg, 0], (tn, mp), 0) * out))
                        if bias_gmem is not None:
                            out = out + _bcast(sb_smem.at[wg, 1], (tn, mp), 0)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = out.astype(out_dtype)
                    plgpu.commit_smem()
                    dst = out_gmem.at[pl.ds(n0, tn)] if split == 1 else out_gmem.at[s, pl.ds(n0, tn)]
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], dst)

            def mma(_, w_smem, x_smem, acc_ref):
                plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * tn, tn)], x_smem.T)
                plgpu.wgmma_wait(0)
                return acc_ref

            def mma_promote(_, w_smem, x_smem, carry):  # each K step into a fresh accumulator, summed in f32
                acc_ref, total = carry
                acc_ref[...] = plgpu.layout_cast(jnp.zeros((tn, mp), F32), plgpu.Layout.WGMMA)
                plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * tn, tn)], x_smem.T)
                return acc_ref, total + acc_ref[...]  # the load waits for the wgmma

            pipeline(mma_promote if pk else mma, compute_context)(
                w_gmem.at[pl.ds(ni * cta_n, cta_n), pl.ds(s * k_per, k_per)], x_gmem.at[:, pl.ds(s * k_per, k_per)],
                allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def scaled_mm_decode(a: jax.Array, b: jax.Array, sa: jax.Array, sb: jax.Array, bias: jax.Array | None, out_dtype,
                     cfg: DecodeConfig | None = None) -> jax.Array:
    """The decode-sized ``scaled_mm`` (same arguments and result as :func:`scaled_mm`), computed
    as ``out.T = B @ A.T`` so that the weight fills the wgmma's 64-row side."""
    m, k = a.shape
    n = b.shape[0]
    cfg = cfg or decode_heuristic(m, n, k)
    if not decode_supports(m, n, k, out_dtype, cfg):
        raise ValueError(f"the Mosaic decode GEMM does not take M={m} N={n} K={k} out {jnp.dtype(out_dtype)} "
                         f"with {cfg}")
    mp = decode_rows(m)
    a = _tma_rows(a)
    np_ = cdiv(n, cfg.cluster * cfg.num_wgs * cfg.tile_n) * cfg.cluster * cfg.num_wgs * cfg.tile_n
    sa = _pad(jnp.broadcast_to(sa.astype(F32).reshape(-1), (m,)), mp)
    sb = _pad(jnp.broadcast_to(sb.astype(F32).reshape(-1), (n,)), np_)
    split = cfg.split_k
    args = [b, a, sa, sb] + ([_pad(bias.astype(F32), np_)] if bias is not None and split == 1 else [])
    c = cfg.cluster
    units = cdiv(cdiv(n, cfg.num_wgs * cfg.tile_n), c) * split  # work items per cluster
    grid = min(getattr(jax.devices()[0], "core_count", 132) // c, units)  # no idle CTAs

    def body(w_gmem, x_gmem, sa_gmem, sb_gmem, *rest):
        bias_gmem = rest[0] if len(rest) == 2 else None
        _decode_kernel(w_gmem, x_gmem, sa_gmem, sb_gmem, bias_gmem, rest[-1], cfg=cfg)

    shape = (n, mp) if split == 1 else (split, n, mp)
    out = _launch(body, jax.ShapeDtypeStruct(shape, out_dtype if split == 1 else F32), cluster=c, grid=grid,
                  num_threads=cfg.num_wgs + 1)(*args)
    if split == 1:
        return out[:, :m].T
    acc = out[0]
    for i in range(1, split):  # a fixed summation order
        acc = acc + out[i]
    acc = sa[:m][:, None] * (sb[None, :n] * acc[:, :m].T)
    if bias is not None:
        acc = acc + bias.astype(F32)[None, :]
    return acc.astype(out_dtype)


__all__ = ["DecodeConfig", "MosaicConfig", "decode_heuristic", "decode_supports", "heuristic_config", "scaled_mm",
           "scaled_mm_decode", "supports"]
