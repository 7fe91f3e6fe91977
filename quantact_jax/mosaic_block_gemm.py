"""Mosaic GPU (Hopper) DeepSeek block-scaled fp8 GEMM with per-K-block promotion.

``out[m, n] = sum_kb sa[m, kb] * sb[n // 128, kb] * sum_{k in kb} a[m, k] * b[n, k]  (+ bias[n])``

with activation groups 1x128 (``sa [M, K/128]`` f32) and weight blocks 128x128
(``sb [N/128, K/128]`` f32), weights ``[N, K]`` (K-major). Same skeleton as
:mod:`quantact_jax.mosaic_gemm` (persistent grid of one CTA per SM, a TMA pipeline fed by a
memory warpgroup through ``plgpu.emit_pipeline_warp_specialized``, two compute warpgroups
issuing wgmma with B read transposed from SMEM, an SMEM + TMA epilogue), and DeepGEMM's
"promotion" in the main loop: for every 128-wide K block each compute warpgroup

1. zeroes its tensor-core accumulator (``plgpu.ACC``) and issues one wgmma ``[wm, 128] x
   [128, wn]`` into it (the tensor core's fast fp8 accumulation, ~14 mantissa bits, over only
   128 products of K: four k=32 instructions),
2. waits for it, and
3. adds ``partial * (sa[rows, kb] * sb[nblock, kb])`` into an f32 running sum that lives in
   registers (the pipeline carry), one FMA per element.

The epilogue adds the bias in f32 and rounds once to bf16/fp16/f32.

Registers: a compute warpgroup holds ``n_acc`` wgmma accumulators (``wm*wn/128`` f32 per
thread each) and ``n_sub`` running sums of the same size: ``(n_acc + n_sub) * wm * wn / 128``
registers per thread (:meth:`MosaicBlockConfig.acc_registers`, at most 192). The pipeline
reallocates registers (``setmaxnreg``): the memory warpgroup keeps 40, each compute thread may
use up to 232, so (64 x 128, n_sub=1) takes 128 and (64 x 128, n_sub=2) 192 registers of
accumulators. (ptxas 13.0 for sm_90a, 4096^3 bf16: the default and the bench's schedule
variants keep their main loop free of spills and of serialized wgmma; only the pipeline's
barrier phase bits go through local memory.)

Schedules (how the tensor core overlaps the promotion; :class:`MosaicBlockConfig`):

- default (``n_acc=1``): a warpgroup's ``n_sub`` column sub-tiles run one after the other
  through one accumulator, each issued, waited for (wait 0) and promoted before the next is
  issued. Only the other warpgroup's wgmma can run during a promotion, and the two warpgroups,
  released by the same pipeline barrier every K block, tend to issue, wait and promote in
  step, so the tensor core idles while both promote.
- ``n_acc=2``: two accumulators; sub-tile ``j + 1`` is issued before sub-tile ``j`` is waited
  for (wait 1) and promoted, so each warpgroup keeps a wgmma queued while it promotes, except
  after its last sub-tile of a K block. Within the 192-register budget: 64 x 64 sub-tiles,
  ``n_sub=4`` (a 128 x 256 CTA tile, 2 x 32 + 4 x 32 registers), at the price of N=64 wgmma
  instructions (the A tile is read from SMEM once per sub-tile). Keeping the last sub-tile in
  flight into the next K block (promoting it there) is not offered: ptxas serializes every
  wgmma (C7514) when an accumulator that a loop iteration leaves in flight is read by the next.
- ``pingpong``: the two compute warpgroups take turns at the tensor core through a two-arrival
  SMEM barrier (FlashAttention-3's ping-pong): one turn is ``issue; rendezvous; finish;
  rendezvous`` (issue: one sub-tile's wgmma with ``n_acc=1``, a K block's issues with
  ``n_acc=2``; finish: the promotions left), and warpgroup 1 starts one rendezvous ahead, so
  the issues alternate 0, 1, 0, 1, ... and each warpgroup promotes while the other's wgmma
  runs. Costs two rendezvous (an arrive and a wait) per turn. The offset is per output tile
  (warpgroup 1's extra rendezvous at the start of each tile, warpgroup 0's after its epilogue),
  so warpgroup 1's last promotion of a tile waits for warpgroup 0's epilogue, and the next
  tile's loads start after it (the pipeline's memory warpgroup waits for both warpgroups to
  release a tile's last stage before loading the next tile). A per-kernel offset (extra turns
  at kernel start and end only) deadlocks as soon as a CTA has two tiles: ``_kernel``'s
  ``turn`` docstring has the accounting.

Clusters (``MosaicBlockConfig.cluster``, off by default): ``"m"`` or ``"n"`` launches one cluster of
two CTAs per two SMs (``plgpu.kernel(cluster=(2,))``, grid ``num_sms // 2``) over cluster tiles of two
CTA tiles side by side along that dimension, taken in the usual persistent order (``nd_loop`` over
the cluster grid); CTA ``c`` of a cluster takes CTA tile ``2 * i + c`` along it. The two CTAs share
the other operand's tile, which the pipeline loads once by TMA multicast (``BlockSpec
collective_axes=("cluster",)``: each CTA loads half of it into both): B (and its L2 traffic) for
``"m"``; A and the transposed ``sa`` slices (same rows) for ``"n"``. A stage is then refilled only when
the compute warpgroups of both CTAs have released it (the pipeline's consumed barrier becomes a
cluster barrier), so the two CTAs run their K loops in loose lock-step. Remainders: the wrapper pads
the ``sa``/``sb``/bias vectors to whole cluster tiles, and a CTA tile partly or wholly past M or N
still runs its pipeline (its peer needs its half of the multicast): TMA zero-fills the loads past
the operands' ends and drops the stores past the output's. The ping-pong rendezvous stay within a
CTA and within a tile; the cluster couples only the two CTAs' pipelines, each tile's stages being
released before the next tile's are loaded, so the per-tile pairing argument (``turn``) is
unchanged. ``delay_release`` (``BlockSpec.delay_release``, as JAX's ``hopper_matmul_mgpu``) hands each
stage back to the memory warpgroup that many K steps late; JAX's kernel uses it to leave a wgmma
in flight past its step, but every body here waits for its own wgmma (the promotion reads them),
so here it only shortens the prefetch distance to ``stages - delay_release``: offered for the sweep,
not expected to pay.

The promotion arithmetic is the same in every schedule: per output element and K block one
f32 FMA of the block's partial and scale into the running sum, in K order.

Scales:
- ``sa`` is transposed in the wrapper to ``[K/128, Mp/wm, wm]`` (M contiguous), so every K
  step needs one contiguous ``[cta_m]`` slice; it travels through the pipeline as a third
  input (one small TMA per stage) and is read in the wgmma row layout
  (``Layout.WGMMA.reduce(1)``).
- ``sb`` rows (``[K/128]`` f32, padded to a multiple of 32 = 128 bytes for TMA) are staged per
  output tile and per weight block into SMEM while the pipeline fills; the body reads one
  scalar per K step and sub-tile.

Requirements (:func:`supports`): ``K % 128 == 0``, ``N % 128 == 0``, ``K <= 32768`` (one TMA
box of sb), M arbitrary (rows padded to a multiple of 8 and at least one tile, as
``mosaic_gemm`` does), with or without a cluster (M and N need not fill whole cluster tiles). No
interpret mode (the Mosaic interpreter does not run fp8 transposed wgmma); the CPU tests trace and
cross-lower the kernel, the GPU tests run it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from interop.layout import cdiv
from quantact_jax.mosaic_gemm import SMEM_LIMIT, _bcast, _launch, _pad, _store_tile

F32 = jnp.float32
BLOCK = 128  # DeepSeek scale block (K step and weight-block height)


@dataclasses.dataclass(frozen=True)
class MosaicBlockConfig:
    """Per-warpgroup tile ``wg_m x (n_sub * wg_n)`` (``n_sub`` sub-tiles of ``wg_n`` columns), the
    two compute warpgroups stacked along ``wg_dim`` ("m" or "n"); the K step is always 128 (one
    scale block). ``stages``: pipeline depth; epilogue sub-tile ``epi_tile_m x epi_tile_n`` through
    ``epi_slots`` SMEM buffers per warpgroup (2 lets a store overlap the next sub-tile's write);
    tile order as ``MosaicConfig``.

    How the tensor core overlaps the promotion (module docstring, "Schedules"):

    - ``n_acc``: wgmma accumulators per warpgroup. 1: each sub-tile is issued, waited for and
      promoted before the next one is issued. 2: sub-tile ``j + 1`` is issued into the other
      accumulator before sub-tile ``j`` is waited for and promoted (needs ``n_sub >= 2``).
    - ``pingpong``: the two compute warpgroups take turns at the tensor core (FlashAttention-3
      style rendezvous on a two-arrival barrier), so that one warpgroup's promotion runs while the
      other's wgmma does instead of both at once: turns of one sub-tile with ``n_acc=1``, of one
      K block's issues with ``n_acc=2``.

    Clusters and stage release (module docstring, "Clusters"):

    - ``cluster``: None (one CTA per SM, the default), ``"m"`` or ``"n"``: clusters of two CTAs whose
      tiles sit side by side along M (``"m"``, cluster tile ``2 * cta_m x cta_n``: they share the B
      tile, loaded once by TMA multicast) or along N (``"n"``, ``cta_m x 2 * cta_n``: they share the A
      tile and its ``sa`` slice).
    - ``delay_release``: K steps each pipeline stage is held after its step before the memory
      warpgroup may refill it (``BlockSpec.delay_release``; below ``stages``). 0 by default."""

    wg_m: int = 64
    wg_n: int = 128
    n_sub: int = 2
    wg_dim: str = "m"
    stages: int = 4
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    epi_slots: int = 2
    grid_minor_n: bool = False
    grid_tile_width: int = 8
    n_acc: int = 1
    pingpong: bool = False
    cluster: str | None = None
    delay_release: int = 0

    @property
    def tile_k(self) -> int:
        return BLOCK

    @property
    def cta_m(self) -> int:
        return self.wg_m * (2 if self.wg_dim == "m" else 1)

    @property
    def wg_cols(self) -> int:
        return self.wg_n * self.n_sub

    @property
    def cta_n(self) -> int:
        return self.wg_cols * (2 if self.wg_dim == "n" else 1)

    @property
    def cluster_size(self) -> int:
        return 1 if self.cluster is None else 2

    @property
    def cluster_m(self) -> int:
        """Rows of a cluster tile (a CTA tile without a cluster)."""
        return self.cta_m * (2 if self.cluster == "m" else 1)

    @property
    def cluster_n(self) -> int:
        """Columns of a cluster tile (a CTA tile without a cluster)."""
        return self.cta_n * (2 if self.cluster == "n" else 1)

    @property
    def wg_blocks(self) -> int:
        """128-column weight blocks (sb rows) one warpgroup's columns touch."""
        return cdiv(self.wg_cols, BLOCK)

    def acc_registers(self) -> int:
        """f32 accumulator registers per compute thread: the wgmma ones + the running sums."""
        return (self.n_acc + self.n_sub) * self.wg_m * self.wg_n // 128

    def smem_bytes(self, out_itemsize: int = 2, k: int = 0) -> int:
        per_stage = (self.cta_m + self.cta_n) * BLOCK + self.cta_m * 4  # A, B fp8 + sa f32
        kbp = cdiv(max(k // BLOCK, 1), 32) * 32
        vectors = 2 * (self.wg_blocks * kbp + self.wg_cols) * 4  # sb rows and bias per warpgroup, f32
        epi = 2 * self.epi_slots * self.epi_tile_m * self.epi_tile_n * out_itemsize
        return self.stages * per_stage + epi + vectors

    def valid(self) -> bool:
        return (self.wg_dim in ("m", "n") and self.wg_m in (64, 128) and self.wg_n in (64, 128)
                and self.n_sub in (1, 2, 4) and self.acc_registers() <= 192 and self.stages >= 2
                and self.epi_slots in (1, 2)
                and self.wg_m % self.epi_tile_m == 0 and self.wg_n % self.epi_tile_n == 0
                and (self.n_acc == 1 or (self.n_acc == 2 and self.n_sub >= 2))
                and self.cluster in (None, "m", "n") and 0 <= self.delay_release < self.stages)


def heuristic_config(m: int, n: int, k: int, out_dtype=jnp.bfloat16) -> MosaicBlockConfig:
    """128x256 CTA tiles (each compute warpgroup 64 rows x two 128-column sub-tiles: 192
    accumulator registers), 4 stages (194 KiB of operands), so one epilogue buffer per
    warpgroup; f32 outputs use 32-wide epilogue tiles (128-byte swizzled rows); the two compute
    warpgroups take turns at the tensor core (``pingpong``): H100, 1019 / 1001 / 1075 TFLOP/s at
    4096^3, 4096x28672x4096, 4096x4096x14336 against 895 / 835 / 971 without (session 4,
    bench/mosaic_block_gpu.py --quick; two accumulators without ping-pong: 951 / 1024 / 1031).
    Small M (<= 64): one 64-row tile, 64 x 256 CTA tiles (warpgroups side by side along N) with a
    deeper pipeline (untuned)."""
    size = jnp.dtype(out_dtype).itemsize
    en = min(128 // size, 64)
    if m <= 64:
        cfg = MosaicBlockConfig(wg_m=64, wg_n=128, n_sub=1, wg_dim="n", stages=6, epi_tile_n=en)
    else:
        cfg = MosaicBlockConfig(epi_tile_n=en, pingpong=True)
    return fit_smem(cfg, k, size)


def fit_smem(cfg: MosaicBlockConfig, k: int, out_itemsize: int = 2) -> MosaicBlockConfig:
    """``cfg`` with one epilogue buffer, then fewer stages (down to 2, and above ``delay_release``),
    until it fits in SMEM."""
    if cfg.smem_bytes(out_itemsize, k) > SMEM_LIMIT:
        cfg = dataclasses.replace(cfg, epi_slots=1)
    while cfg.smem_bytes(out_itemsize, k) > SMEM_LIMIT and cfg.stages > max(2, cfg.delay_release + 1):
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg


def supports(m: int, n: int, k: int, out_dtype, cfg: MosaicBlockConfig | None = None) -> bool:
    """True when the kernel can run this problem (block-scaling shapes, TMA limits, SMEM)."""
    cfg = cfg or heuristic_config(m, n, k, out_dtype)
    size = jnp.dtype(out_dtype).itemsize
    return (m >= 1 and k % BLOCK == 0 and n % BLOCK == 0 and 0 < k <= 256 * BLOCK and size in (2, 4)
            and cfg.valid() and cfg.epi_tile_n * size <= 128 and cfg.smem_bytes(size, k) <= SMEM_LIMIT)


def _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, bias_gmem, out_gmem, *, cfg: MosaicBlockConfig):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    kbp = sb_gmem.shape[1]
    out_dtype = out_gmem.dtype
    wm, wn, n_sub, n_acc = cfg.wg_m, cfg.wg_n, cfg.n_sub, cfg.n_acc
    cta_m, cta_n, tk = cfg.cta_m, cfg.cta_n, BLOCK
    split_m = cfg.wg_dim == "m"
    swizzle = plgpu.find_swizzle(tk * 8)  # fp8: one byte per element, 128-byte rows
    transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    # the persistent loop walks cluster tiles (CTA tiles without a cluster)
    m_iters, n_iters, k_iters = cdiv(m, cfg.cluster_m), cdiv(n, cfg.cluster_n), k // tk
    # multicast operands: B when the cluster spans M, A and its sa slice when it spans N
    share_a = ("cluster",) if cfg.cluster == "n" else ()
    share_b = ("cluster",) if cfg.cluster == "m" else ()
    dr = cfg.delay_release
    em, en = cfg.epi_tile_m, cfg.epi_tile_n
    itemsize = jnp.dtype(out_dtype).itemsize
    out_swizzle = plgpu.find_swizzle(en * itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // itemsize)), plgpu.SwizzleTransform(out_swizzle))
    n_epi = (wm // em) * (n_sub * wn // en)
    n_slots = min(cfg.epi_slots, n_epi)
    wgs_m = cta_m // wm  # warpgroup row blocks per CTA (2 when the warpgroups split M)
    row = plgpu.Layout.WGMMA.reduce(1)
    has_bias = bias_gmem is not None
    nblk = cfg.wg_blocks  # weight blocks (sb rows) per warpgroup; sub-tile j reads row j * wn // 128
    blk = [j * wn // BLOCK for j in range(n_sub)]

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((cta_m, tk), lambda ki: (0, ki), transforms=transforms,
                                      memory_space=plgpu.SMEM, collective_axes=share_a, delay_release=dr),
                      plgpu.BlockSpec((cta_n, tk), lambda ki: (0, ki), transforms=transforms,
                                      memory_space=plgpu.SMEM, collective_axes=share_b, delay_release=dr),
                      # this K block's activation scales of the CTA's rows: [1, wgs_m, wm] f32
                      plgpu.BlockSpec((1, wgs_m, wm), lambda ki: (ki, 0, 0), memory_space=plgpu.SMEM,
                                      collective_axes=share_a, delay_release=dr)],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=compute_context)

    ignore = lambda *_, **__: None  # allocations do not depend on the bodies
    sa_view = lambda mi: sa_gmem.at[:, pl.ds(mi * wgs_m, wgs_m), :]
    nv = nblk + (n_sub if has_bias else 0)  # vectors staged per warpgroup and tile: sb rows (, bias)

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, sa_view(0)),
                       out_smem=plgpu.SMEM((2, n_slots, em, en), out_dtype, transforms=out_transforms),
                       sb_smem=plgpu.SMEM((2, nblk, kbp), F32),
                       bias_smem=plgpu.SMEM((2, n_sub, wn), F32),
                       bars=plgpu.Barrier(num_barriers=2 * nv),
                       sched=plgpu.Barrier(num_arrivals=2) if cfg.pingpong else None,
                       collective_axes="wg")
    def _scope(allocs, out_smem, sb_smem, bias_smem, bars, sched):
        wg = lax.axis_index("wg")

        def turn():
            """Ping-pong: a rendezvous of the two compute warpgroups on ``sched`` (an mbarrier whose
            phase completes once every thread of both warpgroups has arrived; each thread tracks
            its parity and waits for the phase it arrived on, so no warpgroup can get a phase
            ahead: the k-th call of warpgroup 0 pairs with the k-th call of warpgroup 1).

            Per output tile each warpgroup's main loop makes N = 2 * n_sub * k_iters calls
            (``n_acc=1``: ``issue; turn(); promote; turn()`` per sub-tile) or 2 * k_iters
            (``n_acc=2``); warpgroup 1 makes one more before its main loop and warpgroup 0 one more
            after its epilogue, both in the tile (N + 1 each). Pairs: W1's extra with W0's 1st,
            W1's i-th with W0's (i+1)-th, W1's N-th (after its last promotion) with W0's extra.
            So W0's issue of sub-tile j runs against W1's promotion of the sub-tile before, and
            every pair lies within one tile.

            That last point is what the pipeline needs: ``emit_pipeline_warp_specialized``'s
            memory warpgroup, before loading the next tile, waits until both compute warpgroups
            have released every stage of this one (its quiesce), and a warpgroup releases the last
            stage only after its last body step, turns included. With the extra calls once per
            kernel (session 4: W1's at kernel start, W0's at kernel end), W1's N-th call of tile
            t paired with W0's first call of tile t + 1, made after W0's first issue there, which
            waits for tile t + 1's first stage, which the memory warpgroup loads only after W1
            released tile t's last stage, after that call: a cycle, a hang for any CTA with two
            or more tiles (4096^3: 3-4 tiles per CTA; the 300x768x1152 check: at most one).

            W0's extra call comes after the epilogue, not right after the main loop: there the
            running sums are live across the conditional, and ptxas (13.0, sm_90a) added ~64
            register moves per K step to the main loop; after the epilogue the loop is as before
            (no spills in it but the pipeline's phase bits)."""
            if cfg.pingpong:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")  # the persistent grid (of clusters, with one)
        def _tiles(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                        cfg.grid_tile_width)
            # the CTA tile: this CTA's half of the cluster tile (both CTAs of a cluster get the same lin)
            if cfg.cluster == "m":
                mi = mi * 2 + lax.axis_index("cluster")
            elif cfg.cluster == "n":
                ni = ni * 2 + lax.axis_index("cluster")
            m_sl = pl.ds(mi * cta_m, cta_m)
            # this warpgroup's first output row and column
            r0 = mi * cta_m + (wg * wm if split_m else 0)
            c0 = ni * cta_n + (0 if split_m else wg * n_sub * wn)

            def compute_context(run):
                # sb rows (and the bias) of this tile's weight blocks travel by TMA into SMEM
                # while the pipeline fills; the sb rows are awaited before the first K step.
                for i in range(nblk):
                    plgpu.copy_gmem_to_smem(sb_gmem.at[c0 // BLOCK + i], sb_smem.at[wg, i], bars.at[wg * nv + i])
                if has_bias:
                    for j in range(n_sub):
                        plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(c0 + j * wn, wn)], bias_smem.at[wg, j],
                                                bars.at[wg * nv + nblk + j])
                if cfg.pingpong:
                    pl.when(wg == 1)(turn)  # warpgroup 1's extra turn of this tile: warpgroup 0 issues first
                for i in range(nblk):
                    plgpu.barrier_wait(bars.at[wg * nv + i])

                @functools.partial(pl.run_scoped, accs=tuple(plgpu.ACC((wm, wn), F32) for _ in range(n_acc)))
                def _acc(accs):
                    zero = plgpu.layout_cast(jnp.zeros((wm, wn), F32), plgpu.Layout.WGMMA)
                    _, sums = run((accs, (zero,) * n_sub))
                    if has_bias:
                        for j in range(n_sub):
                            plgpu.barrier_wait(bars.at[wg * nv + nblk + j])
                    outs = []
                    for j in range(n_sub):
                        o = sums[j]
                        if has_bias:
                            o = o + _bcast(bias_smem.at[wg, j], (wm, wn), 1)
                        outs.append(o.astype(out_dtype))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores
                    t = 0
                    for j in range(n_sub):
                        t = _store_tile(outs[j], out_smem.at[wg], out_gmem, r0, c0 + j * wn, t)

                if cfg.pingpong:
                    # warpgroup 0's extra turn of this tile, paired with warpgroup 1's last one
                    # (after its last promotion): before the next tile's pipeline (turn() docstring)
                    pl.when(wg == 0)(turn)

            def body(idx, a_smem, b_smem, sa_smem, state):
                (ki,) = idx
                accs, sums = state[0], list(state[1])
                a_wg = a_smem.at[pl.ds(wg * wm, wm)] if split_m else a_smem
                # this K block's activation scales of the warpgroup's rows, in the wgmma row layout
                sa = plgpu.load(sa_smem.at[0, wg if split_m else 0], (), layout=row)

                def promote(j, wait_n):
                    """sums[j] += sub-tile j's partial * its [wm] row scales (this K block's sa times
                    the weight block's sb), once at most wait_n wgmma groups are in flight."""
                    acc = accs[j % n_acc]
                    part = acc[...] if wait_n == 0 else plgpu.wgmma_accumulator_load(acc, wait_n=wait_n)
                    s = sa * sb_smem[wg, blk[j], ki]
                    sums[j] = sums[j] + part * lax.broadcast_in_dim(s, (wm, wn), [0])
                    if n_acc == 2:
                        # Keeps LLVM from sinking these FMAs past the next wgmma into this
                        # accumulator, which would keep the old and the new one alive at once.
                        sums[j] = lax.optimization_barrier(sums[j])

                for j in range(n_sub):
                    acc = accs[j % n_acc]
                    boff = (0 if split_m else wg * n_sub * wn) + j * wn
                    acc[...] = plgpu.layout_cast(jnp.zeros((wm, wn), F32), plgpu.Layout.WGMMA)
                    plgpu.wgmma(acc, a_wg, b_smem.at[pl.ds(boff, wn)].T)
                    if n_acc == 1:  # one turn per sub-tile
                        turn()
                        promote(j, 0)
                        turn()
                    else:  # sub-tile j runs while j - 1 (the other accumulator) is promoted; one turn per K block
                        if j == n_sub - 1:
                            turn()
                        if j > 0:
                            promote(j - 1, 1)
                if n_acc == 2:
                    promote(n_sub - 1, 0)
                    turn()
                return accs, tuple(sums)

            pipeline(body, compute_context)(a_gmem.at[m_sl, :], b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                                            sa_view(mi), allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def scaled_mm_block(a: jax.Array, b: jax.Array, sa: jax.Array, sb: jax.Array, bias: jax.Array | None, out_dtype,
                    cfg: MosaicBlockConfig | None = None) -> jax.Array:
    """``a [M, K] fp8``, ``b [N, K] fp8``, ``sa [M, K/128]`` f32 (row-major, 1x128 groups),
    ``sb [N/128, K/128]`` f32 (128x128 blocks), ``bias [N]`` or None -> ``[M, N]`` in
    ``out_dtype``. Call :func:`supports` first."""
    m, k = a.shape
    n = b.shape[0]
    cfg = cfg or heuristic_config(m, n, k, out_dtype)
    if not supports(m, n, k, out_dtype, cfg):
        raise ValueError(f"the Mosaic block GEMM does not take M={m} N={n} K={k} out {jnp.dtype(out_dtype)} "
                         f"with {cfg}")
    kb, nb = k // BLOCK, n // BLOCK
    if sa.shape != (m, kb) or sb.shape != (nb, kb):
        raise ValueError(f"block scales must be sa [{m}, {kb}] and sb [{nb}, {kb}], got {sa.shape}, {sb.shape}")
    rows = max(cfg.cta_m, cdiv(m, 8) * 8)  # TMA tiles rows by 8; at least one whole M tile
    if rows != m:
        a = jnp.pad(a, ((0, rows - m), (0, 0)))
    # scale and bias vectors padded to whole cluster tiles, so that a CTA tile past M or N (its
    # operand loads and output stores left to TMA's bounds handling) still reads in-bounds vectors
    mp = cdiv(rows, cfg.cluster_m) * cfg.cluster_m
    np_ = cdiv(n, cfg.cluster_n) * cfg.cluster_n
    # sa^T, M contiguous, padded rows scale 0: [KB, Mp / wg_m, wg_m]
    sa_t = jnp.pad(sa.astype(F32).T, ((0, 0), (0, mp - m))).reshape(kb, mp // cfg.wg_m, cfg.wg_m)
    # sb rows padded to 128 bytes (each row is a TMA destination in SMEM, which wants 128-byte
    # alignment) and to whole CTA tiles of N
    kbp = cdiv(kb, 32) * 32
    sb_p = jnp.pad(sb.astype(F32), ((0, cdiv(np_, BLOCK) - nb), (0, kbp - kb)))
    args = [a, b, sa_t, sb_p] + ([_pad(bias.astype(F32).reshape(-1), np_)] if bias is not None else [])

    def body(a_gmem, b_gmem, sa_gmem, sb_gmem, *rest):
        bias_gmem = rest[0] if bias is not None else None
        _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, bias_gmem, rest[-1], cfg=cfg)

    # one persistent CTA per SM; with a cluster, one persistent cluster of two CTAs per two SMs
    return _launch(body, jax.ShapeDtypeStruct((rows, n), out_dtype), cluster=cfg.cluster_size)(*args)[:m]


__all__ = ["MosaicBlockConfig", "fit_smem", "heuristic_config", "scaled_mm_block", "supports"]
