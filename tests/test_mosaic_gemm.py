"""The Mosaic GPU fp8 GEMM's schedule options (``MosaicConfig.delay_release`` / ``cluster``), the
decode kernel's configs, and the gate/up GEMM with SiLU-and-mul in its epilogue (``mosaic_gate_up``,
experimental; its GPU tests compare it with the unfused path and the fused block).

On CPU each config is traced and cross-lowered to Mosaic GPU (layout inference included), which
catches API and layout errors without a GPU. On a Hopper GPU each config runs on shapes that are
not multiples of its (cluster) tiles, with at least two tiles per CTA, against the jnp and torch
reference consumers (``test_consumers._check``, fast-accumulation tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interop.keys import kFp8DynamicTokenSym
from quantact_jax import consumers as C
from quantact_jax import mosaic_gate_up as GU
from quantact_jax import mosaic_gemm as MG
from quantact_jax import producers as PR
from test_consumers import CASES, HOPPER, _check, _problem

Cfg = MG.MosaicConfig
CONFIGS = {
    "default": Cfg(),
    "delay1": Cfg(delay_release=1),
    "cluster_m": Cfg(cluster="m"),
    "cluster_n": Cfg(cluster="n"),
    "cluster_m_delay1": Cfg(cluster="m", delay_release=1, stages=4, tile_k=64),
    "cluster_n_minor_n": Cfg(cluster="n", grid_minor_n=True, grid_tile_width=4),
    # one 64-row M tile, for decode-sized M (rows past M zero-filled by TMA, not padded)
    "small_m": Cfg(tile_m=64, tile_n=32, stages=8, epi_tile_m=64, epi_tile_n=32),
    "small_m_cluster_n": Cfg(tile_m=64, tile_n=64, tile_k=128, stages=6, epi_tile_m=64, cluster="n"),
}


def _lower(m, n, k, bias, out_dtype, cfg):
    S = jax.ShapeDtypeStruct
    args = [S((m, k), jnp.float8_e4m3fn), S((n, k), jnp.float8_e4m3fn), S((m,), jnp.float32), S((n,), jnp.float32)]
    if bias:
        args.append(S((n,), jnp.float32))
    f = jax.jit(lambda a, b, sa, sb, *r: MG.scaled_mm(a, b, sa, sb, r[0] if r else None, out_dtype, cfg))
    traced = f.trace(*args)
    assert traced.out_info.shape == (m, n) and traced.out_info.dtype == out_dtype
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m,n,k,bias,out_dtype", [(300, 640, 384, True, jnp.bfloat16),
                                                   (4096, 4096, 4096, False, jnp.float16)], ids=str)
def test_kernel_traces_and_lowers_for_cuda(name, m, n, k, bias, out_dtype):
    cfg = CONFIGS[name]
    assert MG.supports(m, n, k, out_dtype, cfg), cfg
    assert "mosaic_gpu" in _lower(m, n, k, bias, out_dtype, cfg)


def test_delay_release_needs_a_deeper_pipeline():
    # the pipeline releases a stage delay_release steps late: it needs more stages than that
    assert not MG.supports(4096, 4096, 4096, jnp.bfloat16, Cfg(delay_release=3, stages=3))
    assert not MG.supports(4096, 4096, 4096, jnp.bfloat16, Cfg(cluster="k"))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic GEMM needs a Hopper GPU")
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m,n,k,bias", [(2100, 4352, 512, True), (1031, 1536, 1024, False), (16, 4352, 512, True),
                                        (5, 1536, 1024, False), (37, 1536, 1024, True), (100, 1536, 512, False)],
                         ids=str)
def test_configs_match_references(name, m, n, k, bias):
    # 2100 x 4352: 9 x 17 cluster tiles of 256 x 256 (cluster m) or 17 x 9 of 128 x 512 (cluster n) over
    # 66 clusters, >= 2 per CTA, partial M tiles and (cluster n) a cluster whose second tile lies past N
    akey, wmode = CASES[0]
    qa, wq, ws, wk, b = _problem(m, n, k, akey, wmode, bias)
    cfg = CONFIGS[name]
    assert MG.supports(m, n, k, jnp.bfloat16, cfg)
    got = C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey, backend="mosaic", config=cfg)
    _check(got, qa, wq, ws, wk, b, None, fast_accum=True)


# ------------------------------------------------------------------ the swap-AB decode kernel's clusters
D = MG.DecodeConfig
DECODE_CONFIGS = {
    "cluster2": D(tile_k=256, stages=4, promote=True, cluster=2),
    "cluster2_wgs2_split2": D(tile_k=128, stages=6, promote=True, cluster=2, num_wgs=2, split_k=2),
    "cluster4": D(tile_k=256, stages=4, promote=True, cluster=4),
    "cluster2_fast": D(cluster=2),
}


def _lower_decode(m, n, k, bias, cfg):
    S = jax.ShapeDtypeStruct
    args = [S((m, k), jnp.float8_e4m3fn), S((n, k), jnp.float8_e4m3fn), S((m,), jnp.float32), S((n,), jnp.float32)]
    if bias:
        args.append(S((n,), jnp.float32))
    f = jax.jit(lambda a, b, sa, sb, *r: MG.scaled_mm_decode(a, b, sa, sb, r[0] if r else None, jnp.bfloat16, cfg))
    traced = f.trace(*args)
    assert traced.out_info.shape == (m, n)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", list(DECODE_CONFIGS))
@pytest.mark.parametrize("m,n,k,bias", [(64, 8192, 8192, False), (37, 1096, 1024, True)], ids=str)
def test_decode_kernel_traces_and_lowers_for_cuda(name, m, n, k, bias):
    cfg = DECODE_CONFIGS[name]
    if not MG.decode_supports(m, n, k, jnp.bfloat16, cfg):  # test_decode_cluster_needs_whole_row_slices
        assert MG.decode_rows(m) // cfg.cluster % 8, cfg
        pytest.skip(f"{cfg} does not take M={m}")
    assert "mosaic_gpu" in _lower_decode(m, n, k, bias, cfg)


def test_decode_cluster_needs_whole_row_slices():
    # each CTA of a cluster loads mp / cluster activation rows, in whole 8-row TMA tiles
    assert not MG.decode_supports(16, 1024, 1024, jnp.bfloat16, D(cluster=4))
    assert not MG.decode_supports(16, 1024, 1024, jnp.bfloat16, D(cluster=3))
    assert MG.decode_supports(16, 1024, 1024, jnp.bfloat16, D(cluster=2))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic decode GEMM needs a Hopper GPU")
@pytest.mark.parametrize("name", list(DECODE_CONFIGS))
@pytest.mark.parametrize("m,n,k,bias", [(64, 8200, 1024, True), (37, 1096, 1024, False), (9, 17960, 512, True)],
                         ids=str)
def test_decode_configs_match_references(name, m, n, k, bias):
    # N not a multiple of the cluster's tiles (the last cluster's second CTA lies past N); 17960 / 64 = 281
    # tiles over 66 clusters: several per CTA; M = 9 only fits clusters of 2 (16 rows)
    cfg = DECODE_CONFIGS[name]
    if not MG.decode_supports(m, n, k, jnp.bfloat16, cfg):
        pytest.skip(f"{cfg} does not take M={m}")
    akey, wmode = CASES[0]
    qa, wq, ws, wk, b = _problem(m, n, k, akey, wmode, bias)
    got = C.scaled_mm(qa, wq, ws, bias=b, input_quant_key=akey, backend="mosaic", config=cfg)
    _check(got, qa, wq, ws, wk, b, None, fast_accum=True)


# ------------------------------------------------------------------ gate/up GEMM with SiLU-and-mul in the epilogue
@pytest.mark.parametrize("m,n2,k", [(4096, 28672, 4096), (300, 512, 384), (5, 256, 256)], ids=str)
def test_gate_up_silu_traces_and_lowers_for_cuda(m, n2, k):
    S = jax.ShapeDtypeStruct
    args = [S((m, k), jnp.float8_e4m3fn), S((n2, k), jnp.float8_e4m3fn), S((m,), jnp.float32), S((1,), jnp.float32)]
    traced = jax.jit(lambda a, b, sa, sb: GU.gate_up_silu(a, b, sa, sb)).trace(*args)
    h, amax = traced.out_info
    assert h.shape == (m, n2 // 2) and h.dtype == jnp.float32 and amax.shape == (m, n2 // 2 // GU.GateUpConfig().tile_n)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_gate_up_silu_supports():
    assert GU.supports(4096, 28672, 4096) and not GU.supports(4096, 28672 + 128, 4096)  # I % 128
    assert not GU.supports(4096, 28672, 4100) and GU.GateUpConfig(stages=4).smem_bytes() > MG.SMEM_LIMIT


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic GEMM needs a Hopper GPU")
@pytest.mark.parametrize("wmode", ["channel", "tensor"])
@pytest.mark.parametrize("m,inter,k", [(300, 640, 384), (4096, 1024, 512), (37, 256, 256)], ids=str)
def test_gate_up_silu_matches_the_unfused_path(m, inter, k, wmode):
    # the unfused path: the gate/up GEMM's bf16 output, then the per-token SiLU-and-mul producer
    akey = CASES[0][0]
    qa, wq, ws, wk, _ = _problem(m, 2 * inter, k, akey, wmode, False)
    y = C.scaled_mm(qa, wq, ws, input_quant_key=akey, backend="mosaic")  # [M, 2I] bf16
    h, amax = GU.gate_up_silu(qa.data, jnp.asarray(wq), jnp.asarray(qa.scale), jnp.asarray(ws), jnp.bfloat16)
    g, u = (y[:, :inter].astype(jnp.float32), y[:, inter:].astype(jnp.float32))
    want_h = np.asarray(g / (1.0 + jnp.exp(-g)) * u)
    # g and u are the same bits (same tiles, K order and epilogue), so h differs only where the two exp
    # implementations (libdevice in Mosaic, XLA's here) round differently: a few f32 ulps
    np.testing.assert_allclose(np.asarray(h), want_h, rtol=4e-7, atol=1e-30)
    hv = np.abs(np.asarray(h)).reshape(m, -1, GU.GateUpConfig().tile_n).max(-1)
    assert (np.asarray(amax) == hv).all()  # the epilogue's maxima are those of the h it wrote
    q = PR.quantize_given_row_amax(h, amax, kFp8DynamicTokenSym, orig_dtype=jnp.bfloat16)
    want = PR.quantize(h, kFp8DynamicTokenSym)
    assert (np.asarray(q.data).view(np.uint8) == np.asarray(want.data).view(np.uint8)).all()
    assert (np.asarray(q.scale) == np.asarray(want.scale)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Mosaic GEMM needs a Hopper GPU")
def test_mlp_silu_epilogue_matches_the_fused_block():
    from quantact_jax import mlp as M

    block = M.make_block(512, 1024, key=kFp8DynamicTokenSym, seed=5)
    rng = np.random.default_rng(6)
    x, r = (jnp.asarray(rng.standard_normal((300, 512)), jnp.bfloat16) for _ in range(2))
    a, _ = PR.rms_norm_quant(x, block.norm_weight, layer=block.gate_up, residual=r, eps=block.eps)
    assert M._silu_epilogue_applies(block.gate_up, block.down, a)
    want, want_res = M.mlp(block, x, r)
    got, got_res = M.mlp(block, x, r, silu_epilogue=True)
    assert (np.asarray(got_res) == np.asarray(want_res)).all()
    # h differs by a few f32 ulps where the exp implementations differ (test above): a code moves one
    # fp8 step (2^-3 relative) at such an element at most, a small fraction of the down GEMM's sum
    err = np.linalg.norm(np.asarray(got, np.float32) - np.asarray(want, np.float32))
    assert err <= 1e-3 * np.linalg.norm(np.asarray(want, np.float32))
