"""Mosaic GPU block-scaled fp8 GEMM (quantact_jax.mosaic_block_gemm) vs the reference consumer.

On CPU only the tracing and the CUDA cross-lowering (Pallas -> Mosaic GPU, layout inference
included) are checked; the numerical tests need a Hopper GPU.

Tolerance (elementwise, on top of one output ulp and 1e-5 of the output scale): each K block's
partial sum ``sum_{k in kb} a_k b_k`` runs through the tensor core's fp8 accumulator, which
keeps about 14 mantissa bits (DeepSeek-V3 report, 3.3.2; tests/test_consumers.py ``_check``).
A 128-wide block is four k=32 wgmma steps, each losing at most 2^-13 of the running magnitude,
which is bounded by ``sum_{k in kb} |a_k b_k|``; so the block's partial is off by at most
``4 * 2^-13 * sum_{k in kb} |a_k b_k|``. The partial is then scaled (``sa * sb``, exact up to
one f32 rounding) and promoted into an f32 running sum, which adds ``2^-24`` of the running
magnitude per block. Summed over the blocks (with the dequantised magnitudes ``|a| = |q_a| sa``,
``|b| = |q_b| sb``):

    |err| <= (4 * 2^-13 + (K/128 + 2) * 2^-24) * (|a| @ |b|^T)

i.e. a bound that does not grow with K (whole-K fast accumulation, as in ``mosaic_gemm``,
gets ``K/32 * 2^-13``). Norm-wise the issue's 1e-3 (2e-3 for 16-bit outputs, whose ulp flips
dominate, as in test_consumers).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from interop.keys import kFp8Dynamic128Sym
from interop.weights import WEIGHT_BLOCK_128
from quantact_jax import mosaic_block_gemm as MB
from quantact_jax import producers as P
from quantact_jax import reference as R

CPU = jax.devices("cpu")[0]
GPU = jax.default_backend() == "gpu"
HOPPER = GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")

C = MB.MosaicBlockConfig
CONFIGS = {  # every tile arrangement the kernel has
    "128x256": C(),
    "128x128": C(n_sub=1, stages=5),
    "64x256-wgN": C(wg_dim="n", n_sub=1, stages=5),
    "128x128-wg128x64": C(wg_m=128, wg_n=64, n_sub=1, stages=5),
    "128x256-wgN-128x64x2": C(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4),
    "128x128-wg64x64x2": C(wg_n=64, n_sub=2, stages=5),
    # schedules that overlap the tensor core with the promotion (module docstring)
    "128x256-pingpong": C(pingpong=True),
    "128x256-wg64x64x4-acc2": C(wg_n=64, n_sub=4, n_acc=2),
    "128x256-wg64x64x4-acc2-pingpong": C(wg_n=64, n_sub=4, n_acc=2, pingpong=True),
    "128x256-wgN-128x64x2-pingpong": C(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4, pingpong=True),
    "128x128-wg64x64x2-acc2": C(wg_n=64, n_sub=2, n_acc=2, stages=5),
    "64x256-wgN-pingpong": C(wg_dim="n", n_sub=1, stages=5, pingpong=True),
    # 2-CTA clusters sharing one operand's tile by TMA multicast (module docstring, "Clusters")
    "128x256-clusterM": C(cluster="m"),
    "128x256-clusterN": C(cluster="n"),
    "128x256-pingpong-clusterM": C(pingpong=True, cluster="m"),
    "128x256-pingpong-clusterN": C(pingpong=True, cluster="n"),
    "128x256-wg64x64x4-acc2-pingpong-clusterM": C(wg_n=64, n_sub=4, n_acc=2, pingpong=True, cluster="m"),
    "128x256-wgN-128x64x2-pingpong-clusterN": C(wg_m=128, wg_n=64, n_sub=2, wg_dim="n", stages=4, pingpong=True,
                                                cluster="n"),
    "64x256-wgN-clusterN": C(wg_dim="n", n_sub=1, stages=5, cluster="n"),  # sa slice [1, 1, 64] split in two
    # stages handed back one K step late
    "128x256-pingpong-delay1": C(pingpong=True, delay_release=1),
    "128x256-pingpong-clusterM-delay1": C(pingpong=True, cluster="m", delay_release=1),
}
CLUSTER = [name for name, cfg in CONFIGS.items() if cfg.cluster]


def _problem(m, n, k, bias, seed=0):
    rng = np.random.default_rng(seed + m * 1000 + n + k)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.5, 2.0, (m, 1)), jnp.bfloat16)
    wf = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    ws = (np.abs(wf).max() / 448 * rng.uniform(0.8, 1.2, (n // 128, k // 128))).astype(np.float32)
    with jax.default_device(CPU):
        wq = R.quantize(jnp.asarray(wf), WEIGHT_BLOCK_128, scale=ws).data
    qa = P.quantize(x, kFp8Dynamic128Sym)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
    return qa, np.asarray(wq), ws, b


def _check(got, qa, wq, ws, b, out_dtype):
    got = np.asarray(got, np.float32)
    m, k = qa.orig_shape
    kb = k // 128
    with jax.default_device(CPU):
        qa_cpu = jax.device_put(qa, CPU)
        want = np.asarray(R.scaled_mm(qa_cpu, jnp.asarray(wq), jnp.asarray(ws), WEIGHT_BLOCK_128, bias=b,
                                      out_dtype=out_dtype), np.float32)
    sa = np.asarray(qa.scale, np.float32).reshape(m, kb)
    a_abs = (np.abs(np.asarray(qa.data, np.float32)).reshape(m, kb, 128) * sa[:, :, None]).reshape(m, k)
    b_abs = (np.abs(np.asarray(wq, np.float32)).reshape(-1, 128, kb, 128)
             * ws[:, None, :, None]).reshape(-1, k)
    slack = (4 * 2.0 ** -13 + (kb + 2) * 2.0 ** -24) * (a_abs @ b_abs.T)  # module docstring
    scale = np.abs(want).max()
    ulp = 2.0 ** -{jnp.dtype(jnp.bfloat16): 7, jnp.dtype(jnp.float16): 10, jnp.dtype(jnp.float32): 23}[
        jnp.dtype(out_dtype)]
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "unwritten (poisoned) or non-finite outputs"
    err = np.abs(got - want)
    bound = np.maximum(np.abs(want), np.abs(got)) * ulp + 1e-5 * scale + slack
    assert (err <= bound).all(), f"max excess {np.max(err - bound)} at {np.unravel_index(np.argmax(err - bound), err.shape)}"
    norm_tol = 2e-3 if jnp.dtype(out_dtype).itemsize == 2 else 1e-3
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < norm_tol


def _run(qa, wq, ws, b, out_dtype, cfg=None):
    """The kernel, after freeing a NaN-filled buffer of the output's size: the allocator
    usually hands that memory to the output, so unwritten elements show up as NaN (plgpu.kernel
    allocates its output itself; it cannot be poisoned directly)."""
    m, k = qa.orig_shape
    n = wq.shape[0]
    poison = jnp.full((max(m, 128), n), jnp.nan, out_dtype).block_until_ready()
    del poison
    return MB.scaled_mm_block(qa.data, jnp.asarray(wq), jnp.asarray(qa.scale, jnp.float32).reshape(m, k // 128),
                              jnp.asarray(ws), b, out_dtype, cfg)


def _abstract_args(m, n, k, bias):
    S = jax.ShapeDtypeStruct
    args = [S((m, k), jnp.float8_e4m3fn), S((n, k), jnp.float8_e4m3fn), S((m, k // 128), jnp.float32),
            S((n // 128, k // 128), jnp.float32)]
    return args + ([S((n,), jnp.float32)] if bias else [])


# ------------------------------------------------------------------ CPU: trace + cross-lower
@pytest.mark.parametrize("name", list(CONFIGS) + ["heuristic"])
@pytest.mark.parametrize("m,n,k,bias,out_dtype", [(200, 384, 640, True, jnp.bfloat16),
                                                   (5, 256, 256, False, jnp.float32),
                                                   (4096, 4096, 4096, False, jnp.bfloat16)], ids=str)
def test_kernel_traces_and_lowers_for_cuda(name, m, n, k, bias, out_dtype):
    size = jnp.dtype(out_dtype).itemsize
    if name == "heuristic":
        cfg = MB.heuristic_config(m, n, k, out_dtype)
    else:
        cfg = MB.fit_smem(C(**{**CONFIGS[name].__dict__, "epi_tile_n": min(64, 128 // size)}), k, size)
    assert MB.supports(m, n, k, out_dtype, cfg), cfg
    f = jax.jit(lambda a, b, sa, sb, *r: MB.scaled_mm_block(a, b, sa, sb, r[0] if r else None, out_dtype, cfg))
    traced = f.trace(*_abstract_args(m, n, k, bias))
    assert traced.out_info.shape == (m, n) and traced.out_info.dtype == out_dtype
    # Pallas -> Mosaic GPU lowering, layout inference included, without a GPU
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _barrier_ops_by_loop_depth(cfg, m=1024, n=1024, k=1024):
    """Counter of (primitive, loop nesting depth) for the barrier arrives and waits in the kernel's
    jaxpr (depth 0: kernel level, 1: the tile loop, 2: the pipeline's K loop)."""
    import collections
    from jax.extend import core as jcore

    def subjaxprs(eqn):
        for v in eqn.params.values():
            for x in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(x, jcore.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jcore.Jaxpr):
                    yield x

    def walk(jaxpr, depth, out):
        for e in jaxpr.eqns:
            if e.primitive.name in ("barrier_arrive", "barrier_wait"):
                out[(e.primitive.name, depth)] += 1
            for sub in subjaxprs(e):
                walk(sub, depth + (e.primitive.name in ("while", "scan")), out)

    f = lambda a, b, sa, sb: MB.scaled_mm_block(a, b, sa, sb, None, jnp.bfloat16, MB.fit_smem(cfg, k))
    out = collections.Counter()
    walk(jax.make_jaxpr(f)(*_abstract_args(m, n, k, False)).jaxpr, 0, out)
    return out


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n].pingpong])
def test_pingpong_rendezvous_pair_within_a_tile(name):
    # The ping-pong rendezvous must pair up within each output tile: the pipeline's memory
    # warpgroup loads tile t + 1 only after both compute warpgroups released tile t's last stage,
    # so a rendezvous of tile t that pairs with one of tile t + 1 deadlocks any CTA with two
    # tiles (session 4: the extra turns were made once per kernel, at depth 0, and Cfg(pingpong=
    # True) hung at 4096^3 on an H100 while passing every check with at most one tile per CTA).
    # So: no barrier arrive or wait at kernel level, and in the tile loop (outside the K loop)
    # exactly the two warpgroup-conditional extra turns, besides the per-tile sb/bias waits.
    ops = _barrier_ops_by_loop_depth(CONFIGS[name])
    assert ops[("barrier_arrive", 0)] == 0 and ops[("barrier_wait", 0)] == 0, ops
    plain = _barrier_ops_by_loop_depth(dataclasses.replace(CONFIGS[name], pingpong=False))
    assert ops[("barrier_arrive", 1)] - plain[("barrier_arrive", 1)] == 2, (ops, plain)
    assert ops[("barrier_wait", 1)] - plain[("barrier_wait", 1)] == 2, (ops, plain)


def _with_epi(cfg, out_dtype, k):
    """``cfg`` with the epilogue tile width an output dtype allows (128-byte rows), fitted to SMEM."""
    size = jnp.dtype(out_dtype).itemsize
    return MB.fit_smem(dataclasses.replace(cfg, epi_tile_n=min(cfg.epi_tile_n, 128 // size)), k, size)


# shapes that do not fill whole cluster tiles: N = 10.5 or 5.5 256-column tiles (2688: a cluster
# "n"'s last second CTA tile wholly outside N), M past the last 256-row cluster tile by 64 rows
# (3900: a cluster "m"'s last second CTA tile wholly outside M), M not a multiple of 8 (1001: padded
# rows), one M tile (5: the cluster "m" peer's tile wholly outside); 3900 x 2688 gives every CTA
# of every cluster config here at least 2 tiles (132 SMs: 66 clusters, 176 to 366 cluster tiles)
CLUSTER_SHAPES = [(3900, 2688, 512, False, jnp.bfloat16), (1001, 1408, 384, True, jnp.float32),
                  (5, 384, 256, True, jnp.bfloat16)]


@pytest.mark.parametrize("name", CLUSTER)
@pytest.mark.parametrize("m,n,k,bias,out_dtype", CLUSTER_SHAPES, ids=str)
def test_cluster_configs_lower_on_partial_cluster_tiles(name, m, n, k, bias, out_dtype):
    cfg = _with_epi(CONFIGS[name], out_dtype, k)
    assert cfg.cluster_m * cfg.cluster_n == 2 * cfg.cta_m * cfg.cta_n
    assert m % cfg.cluster_m or n % cfg.cluster_n  # a partial (or empty) CTA tile somewhere
    assert MB.supports(m, n, k, out_dtype, cfg), cfg
    f = jax.jit(lambda a, b, sa, sb, *r: MB.scaled_mm_block(a, b, sa, sb, r[0] if r else None, out_dtype, cfg))
    traced = f.trace(*_abstract_args(m, n, k, bias))
    assert traced.out_info.shape == (m, n)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def _gmem_loads(cfg, m=200, n=384, k=640, bias=True):
    """{(dtype, shape) of the GMEM source: collective_axes} of every copy_gmem_to_smem in the kernel."""
    from jax.extend import core as jcore

    out = {}

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "copy_gmem_to_smem":
                aval = e.invars[0].aval
                key = (str(aval.dtype), tuple(aval.shape))
                out.setdefault(key, set()).add(tuple(e.params["collective_axes"] or ()))
            for v in e.params.values():
                for x in (v if isinstance(v, (tuple, list)) else [v]):
                    if isinstance(x, jcore.ClosedJaxpr):
                        walk(x.jaxpr)
                    elif isinstance(x, jcore.Jaxpr):
                        walk(x)

    cfg = MB.fit_smem(cfg, k)
    f = lambda a, b, sa, sb, *r: MB.scaled_mm_block(a, b, sa, sb, r[0] if r else None, jnp.bfloat16, cfg)
    walk(jax.make_jaxpr(f)(*_abstract_args(m, n, k, bias)).jaxpr)
    return out


@pytest.mark.parametrize("cluster", [None, "m", "n"])
def test_cluster_multicasts_the_shared_operand(cluster):
    # A cluster along M shares the B tile, one along N the A tile and the sa slice of its rows; the
    # per-tile sb rows and bias are each CTA's own (plain TMA), and nothing is multicast without one.
    m, n, k = 200, 384, 640
    cfg = C(cluster=cluster)
    loads = _gmem_loads(cfg, m, n, k)
    mp = -(-m // cfg.cluster_m) * cfg.cluster_m
    npad = -(-n // cfg.cluster_n) * cfg.cluster_n  # sb / bias padded to whole cluster tiles
    multi = {("cluster",)}
    assert loads[("float8_e4m3fn", (m, k))] == (multi if cluster == "n" else {()})  # A
    assert loads[("float8_e4m3fn", (n, k))] == (multi if cluster == "m" else {()})  # B
    assert loads[("float32", (k // 128, mp // 64, 64))] == (multi if cluster == "n" else {()})  # sa^T
    assert loads[("float32", (npad // 128, 32))] == {()}  # sb rows
    assert loads[("float32", (npad,))] == {()}  # bias
    assert len(loads) == 5, loads


def test_configs_fit_and_supports():
    for cfg in CONFIGS.values():
        assert cfg.valid() and cfg.acc_registers() <= 192
    cfg = MB.heuristic_config(4096, 4096, 4096)
    assert (cfg.cta_m, cfg.cta_n, cfg.acc_registers()) == (128, 256, 192)
    assert cfg.smem_bytes(2, 4096) <= MB.SMEM_LIMIT
    assert MB.supports(200, 384, 640, jnp.bfloat16)
    assert not MB.supports(200, 320, 640, jnp.bfloat16)  # N % 128
    assert not MB.supports(200, 384, 600, jnp.bfloat16)  # K % 128
    assert not MB.supports(200, 384, 640, jnp.float8_e4m3fn)
    assert not MB.supports(200, 384, 640, jnp.bfloat16, C(wg_m=128, wg_n=128))  # 256 registers
    assert not MB.supports(4096, 4096, 4096, jnp.bfloat16, C(stages=6))  # SMEM
    # two accumulators: registers (n_acc + n_sub) * wm * wn / 128, and something to overlap
    assert C(wg_n=64, n_sub=4, n_acc=2).acc_registers() == 192
    assert C(wg_n=64, n_sub=4, n_acc=2).cta_n == 256 and C(wg_n=64, n_sub=4, n_acc=2).wg_blocks == 2
    assert not C(n_acc=2).valid()  # 64 x 128 x 2: 256 registers
    assert not C(n_sub=1, n_acc=2).valid()  # one sub-tile: nothing to overlap
    assert not C(n_acc=3, wg_n=64, n_sub=2).valid()
    # clusters: two CTA tiles side by side; any M and N (remainder tiles are left to TMA bounds)
    assert (C(cluster="m").cluster_m, C(cluster="m").cluster_n) == (256, 256)
    assert (C(cluster="n").cluster_m, C(cluster="n").cluster_n) == (128, 512)
    assert (C().cluster_m, C().cluster_n, C().cluster_size) == (128, 256, 1)
    assert C(cluster="n").cluster_size == 2 and C(cluster="n").smem_bytes(2, 4096) == C().smem_bytes(2, 4096)
    assert not C(cluster="k").valid() and not C(cluster="M").valid()
    for m, n, k, _, out_dtype in CLUSTER_SHAPES:
        assert MB.supports(m, n, k, out_dtype, _with_epi(C(cluster="m", pingpong=True), out_dtype, k))
    # delayed release: below the pipeline depth, which fit_smem does not cut below it
    assert C(delay_release=3).valid() and not C(delay_release=4).valid() and not C(delay_release=-1).valid()
    assert MB.fit_smem(C(stages=6, delay_release=3), 32768).stages >= 4
    # the defaults are unchanged: no cluster, no delay, in the heuristic too
    for shape in [(4096, 4096, 4096), (5, 256, 256), (300, 768, 1152)]:
        h = MB.heuristic_config(*shape)
        assert h.cluster is None and h.delay_release == 0


def test_bad_scale_shapes_fail_loudly():
    S = jax.ShapeDtypeStruct
    with pytest.raises(ValueError, match="block scales"):
        jax.jit(lambda a, b, sa, sb: MB.scaled_mm_block(a, b, sa, sb, None, jnp.bfloat16)).trace(
            S((256, 256), jnp.float8_e4m3fn), S((256, 256), jnp.float8_e4m3fn), S((2, 256), jnp.float32),
            S((2, 2), jnp.float32))


# ------------------------------------------------------------------ GPU: numerics
@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic block GEMM needs a Hopper GPU")
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,n,k", [(200, 384, 640), (5, 256, 256), (130, 640, 384), (1031, 1536, 1024),
                                   (4096, 4096, 4096)], ids=str)
def test_block_gemm_matches_reference(m, n, k, bias, out_dtype):
    qa, wq, ws, b = _problem(m, n, k, bias)
    assert MB.supports(m, n, k, out_dtype)
    got = _run(qa, wq, ws, b, out_dtype)
    _check(got, qa, wq, ws, b, out_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic block GEMM needs a Hopper GPU")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_gemm_configs(name):
    m, n, k = 300, 768, 1152
    qa, wq, ws, b = _problem(m, n, k, True, seed=1)
    cfg = MB.fit_smem(CONFIGS[name], k)
    got = _run(qa, wq, ws, b, jnp.bfloat16, cfg)
    _check(got, qa, wq, ws, b, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic block GEMM needs a Hopper GPU")
@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n].pingpong])
def test_pingpong_several_tiles_per_cta(name):
    # 4096 x 2560: 320 tiles of 128x256 (640 of 64x256) over 132 SMs, 2 or more per CTA; the
    # 300x768x1152 check above gives each CTA at most one, which hid the session-4 hang.
    m, n, k = 4096, 2560, 512
    qa, wq, ws, b = _problem(m, n, k, False, seed=3)
    got = _run(qa, wq, ws, b, jnp.bfloat16, MB.fit_smem(CONFIGS[name], k))
    _check(got, qa, wq, ws, b, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic block GEMM needs a Hopper GPU")
@pytest.mark.parametrize("name", CLUSTER)
@pytest.mark.parametrize("m,n,k,bias,out_dtype", CLUSTER_SHAPES, ids=str)
def test_cluster_configs_on_partial_cluster_tiles(name, m, n, k, bias, out_dtype):
    # Every cluster config where M and N do not fill whole cluster tiles (a peer CTA's tile partly
    # or wholly outside the output still feeds the multicast), with >= 2 tiles per CTA at 3900x2688.
    qa, wq, ws, b = _problem(m, n, k, bias, seed=4)
    got = _run(qa, wq, ws, b, out_dtype, _with_epi(CONFIGS[name], out_dtype, k))
    _check(got, qa, wq, ws, b, out_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic block GEMM needs a Hopper GPU")
def test_nan_scale_reaches_exactly_its_block():
    # A NaN weight-block scale poisons exactly the 128 output columns of that block (all rows):
    # checks the sb indexing per warpgroup / sub-tile, and that no other column reads it.
    m, n, k = 200, 768, 640
    qa, wq, ws, _ = _problem(m, n, k, False, seed=2)
    sb = ws.copy()
    sb[3, 2] = np.nan  # weight rows 384..511, K block 2
    run = lambda s: np.asarray(_run(qa, wq, s, None, jnp.float32, MB.heuristic_config(m, n, k, jnp.float32)))
    got, ref = run(sb), run(ws)
    nan = np.isnan(got)
    assert nan[:, 384:512].all() and not np.delete(nan, np.s_[384:512], axis=1).any()
    assert (np.delete(got, np.s_[384:512], axis=1) == np.delete(ref, np.s_[384:512], axis=1)).all()


def _truncate(x, bits):
    """Round toward zero to ``bits`` mantissa bits (the worst case of the fast accumulator)."""
    m, e = np.frexp(x.astype(np.float64))
    return (np.trunc(m * 2.0 ** bits) / 2.0 ** bits * 2.0 ** e).astype(np.float32)


@pytest.mark.parametrize("m,n,k,bias,out_dtype", [(200, 384, 640, True, jnp.bfloat16),
                                                   (64, 256, 2048, False, jnp.float32)], ids=str)
def test_tolerance_admits_the_kernels_arithmetic(m, n, k, bias, out_dtype):
    # A numpy model of the kernel: per 128-block partials over four k=32 steps, each step's
    # running value truncated to 13 mantissa bits (worse than the tensor core's ~14), scaled and
    # promoted into an f32 sum; bias in f32; one rounding. It must pass _check, and a model that
    # accumulates the whole K that coarsely must not (the bound is not vacuous).
    qa, wq, ws, b = _problem(m, n, k, bias)
    kb = k // 128
    qa_f = np.asarray(qa.data, np.float32).reshape(m, kb, 4, 32)
    wq_f = np.asarray(wq, np.float32).reshape(n, kb, 4, 32)
    sa = np.asarray(qa.scale, np.float32).reshape(m, kb)
    steps = np.einsum("mbsk,nbsk->bsmn", qa_f, wq_f)  # exact in f32 (fp8 products, 32 terms)
    run = np.zeros((m, n), np.float32)
    for j in range(kb):
        part = np.zeros((m, n), np.float32)
        for s in range(4):
            part = _truncate(part + steps[j, s], 13)
        scale = sa[:, j][:, None] * np.repeat(ws[:, j], 128)[None, :]
        run = (run + part * scale).astype(np.float32)
    out = run + (np.asarray(b, np.float32) if b is not None else 0)
    _check(jnp.asarray(out).astype(out_dtype), qa, wq, ws, b, out_dtype)
    # whole-K coarse accumulation (no promotion) with 10 bits is outside the bound
    coarse = np.zeros((m, n), np.float32)
    for j in range(kb):
        scale = sa[:, j][:, None] * np.repeat(ws[:, j], 128)[None, :]
        for s in range(4):
            coarse = _truncate(coarse + steps[j, s] * scale, 10)
    with pytest.raises(AssertionError):
        _check(jnp.asarray(coarse).astype(out_dtype), qa, wq, ws, None, out_dtype)
