#!/usr/bin/env python
"""GPU check of the sharded code paths (``quantact_jax.sharding``, ``quantact_jax.tp``) on a mesh of all visible GPUs.

Every sharded op (producers, ``sharded_scaled_mm`` data/column/row parallel, column/row-parallel
``QuantLinear``, the TP MLP block) is compiled through ``shard_map`` on the mesh ``("dp", "tp")`` of
shape ``(1, n)`` (``n`` = the visible GPUs; 1 works too) and compared with the unsharded op on one GPU:

- bit for bit where every output element goes through the same arithmetic: the producers (split
  along K over ``tp`` where the key allows it, else along the rows), data and column parallel (each
  shard gets the 512 weight rows the single-device case has, so it runs the same GEMM kernel);
- within the bounds of ``tests/sharding_bounds.py`` where the sharded path sums partials with
  ``lax.psum`` (row parallel, the MLP's down projection): another f32 summation order than the
  kernel's K loop (``2 (n_blocks + 2) u sum|a||w|``, plus the bias's rounding, plus, for per-token
  GEMMs with M > 64 on a GPU, the Mosaic kernel's fast fp8 accumulation over K and K/n:
  ``((K + K/n) / 32) 2^-13 sum|a||w|``, with the norm-wise ``2e-3``: twice what tests/test_consumers.py
  allows that kernel against the exact references); a bf16 output may differ by one step where the
  f32 difference tips its rounding. On a mesh of one, only the bias's rounding differs (the kernel
  may fuse it into one FMA; the sharded path adds it after the trivial psum).

Also times both paths (median of a few eager calls) to show the wrapper's overhead. Prints a table and
writes JSON to ``--out``; exit status 1 if a check failed. Without a GPU it prints a message and exits 0::

    NCCL_NVLS_ENABLE=0 python bench/sharding_gpu.py --out bench/results/sharding_gpu.json

``--cpu`` runs the same on the CPU devices in Pallas interpret mode (a check of the script itself;
it asks for 2 virtual devices unless ``XLA_FLAGS`` sets a count)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu PYTHONPATH=. python bench/sharding_gpu.py --cpu
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _mgpu_env  # noqa: E402,F401  (before JAX starts: NCCL multicast off, --cpu devices)

import argparse
import json
import platform
import time
import traceback
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # sharding_bounds: the bounds the sharding tests use

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from interop import keys as K
from interop.errors import QuantShardingError
from quantact_jax.bench.producers import latency_s


def _bytes(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _equal(got, want) -> bool:
    g, w = jax.tree.leaves(got), jax.tree.leaves(want)
    return len(g) == len(w) and all(a.shape == b.shape and (_bytes(a) == _bytes(b)).all() for a, b in zip(g, w))


def _median_ms(fn, n: int = 5) -> float:
    return latency_s(fn, (), n, warmup=1) * 1e3


def _x(shape, seed, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.5, 4.0, (*shape[:-1], 1)), dtype)


class Bound:
    """A tolerance check on the first outputs (as f32): ``|got - want| <= bound()`` elementwise
    (``bound`` a thunk, evaluated inside the case's try), with ``cast=True`` the bf16 rule of
    :func:`sharding_bounds.close_after_cast`, and optionally a relative L2 limit ``norm``."""

    def __init__(self, name: str, bound: Callable[[], np.ndarray], *, cast: bool = False, norm: float | None = None):
        self.__name__, self.bound, self.cast, self.norm = name, bound, cast, norm

    def __call__(self, g: np.ndarray, w: np.ndarray) -> tuple[bool, str]:
        from sharding_bounds import close_after_cast, rel_l2

        b = self.bound()
        if self.cast:
            ok, why = close_after_cast(g, w, b)
        else:
            over = np.abs(g - w) > b
            ok, why = not over.any(), f"{int(over.sum())} of {over.size} outputs outside the bound"
        if ok and self.norm is not None and rel_l2(g, w) > self.norm:
            ok, why = False, f"relative L2 {rel_l2(g, w):.2e} > {self.norm:.0e}"
        return ok, ("" if ok else why)


def _quant_spec(key, shape, mesh) -> tuple[P, str]:
    """K split over tp where the key allows it (the activation's groups stay inside a shard), else rows."""
    from quantact_jax import sharding as S

    try:
        S.producer_axis_name("quant", key, S.shard_plan(key, shape, P("dp", "tp"), mesh))
        return P("dp", "tp"), "K/tp"
    except QuantShardingError:
        S.shard_plan(key, shape, P(("dp", "tp")), mesh)
        return P(("dp", "tp")), "rows/tp"


def cases(mesh: Mesh):
    """(name, sharded fn, unsharded fn, check): check is "bits" or a :class:`Bound`."""
    from sharding_bounds import FAST_ACCUM_NORM_F32, fast_accum_k, interleave_halves, mm_bound, row_parallel_bound
    from sharding_bounds import single_mlp

    from quantact_jax import consumers as C
    from quantact_jax import mlp as M
    from quantact_jax import producers as PR
    from quantact_jax import sharding as S
    from quantact_jax import tp as T

    n = mesh.shape["tp"]
    m, k = 128 * max(2, n), 1024  # swizzled scales: rows per shard a multiple of 128
    g128 = K.kFp8Dynamic128Sym
    x = _x((m, k), 0)
    w = _x((k,), 1)
    res = _x((m, k), 2)
    gs = np.float32(448 * 6 / float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
    out = []
    quant_cases = {
        "fp8 per-token": (K.kFp8DynamicTokenSym, {}),
        "fp8 per-tensor dynamic (pmax)": (K.kFp8DynamicTensorSym, {}),
        "fp8 1x128 row-major": (g128, {}),
        "fp8 1x128 col-major TMA ue8m0": (g128.with_layout("col_major_tma", ue8m0=True), {}),
        "fp8 1x128 packed ue8m0": (g128.with_layout("packed_ue8m0"), {}),
        "nvfp4 swizzled": (K.kNvfp4Dynamic, {"global_scale": gs}),
        "mxfp8 swizzled": (K.kMxfp8Dynamic, {}),
        "fp8 static per-tensor": (K.kFp8StaticTensorSym, {"scale": jnp.array([0.02], jnp.float32)}),
    }
    for label, (key, kw) in quant_cases.items():
        spec, where = _quant_spec(key, x.shape, mesh)
        out.append((f"quantize {label} ({where})",
                    lambda key=key, kw=kw, spec=spec: S.sharded_quantize(x, key, mesh, spec, **kw),
                    lambda key=key, kw=kw: PR.quantize(x, key, **kw), "bits"))
    out.append(("rms_norm_quant per-token + residual (rows/tp)",
                lambda: S.sharded_rms_norm_quant(x, w, K.kFp8DynamicTokenSym, mesh, P(("dp", "tp")), residual=res),
                lambda: PR.rms_norm_quant(x, w, K.kFp8DynamicTokenSym, residual=res), "bits"))
    x_il = interleave_halves(x, n)  # shard i of the last dim holds [gate_i | up_i]
    out.append(("silu_and_mul_quant 1x128 (K/tp)",
                lambda: S.sharded_silu_and_mul_quant(x_il, g128, mesh, P("dp", "tp")),
                lambda: PR.silu_and_mul_quant(x, g128), "bits"))
    jit_q = jax.jit(lambda a: S.sharded_quantize(a, g128, mesh, P("dp", "tp")),
                    out_shardings=S.activation_sharding(NamedSharding(mesh, P("dp", "tp")), g128, x.shape, x.dtype))
    out.append(("jit(sharded_quantize) with out_shardings", lambda: jit_q(x), lambda: PR.quantize(x, g128), "bits"))

    rng = np.random.default_rng(3)

    def weight(nrows):  # per-channel fp8 weight [nrows, k]
        wf = jnp.asarray(rng.standard_normal((nrows, k)) * 0.05, jnp.float32)
        wsc = jnp.max(jnp.abs(wf), axis=1, keepdims=True) / 448
        return PR.quantize(wf.astype(jnp.bfloat16), K.kFp8StaticTokenSym, scale=wsc).data, wsc

    tok = K.kFp8DynamicTokenSym
    qa = PR.quantize(x, tok)
    wq_c, wsc_c = weight(512 * n)  # column parallel: 512 rows per shard (a narrow N could pick another kernel)
    bias_c = jnp.asarray(rng.standard_normal(512 * n), jnp.float32)
    mm_c = {"input_quant_key": tok, "bias": bias_c}
    out.append(("scaled_mm data + column parallel",
                lambda: S.sharded_scaled_mm(qa, wq_c, wsc_c, mesh, P("dp"), n_axes="tp", **mm_c),
                lambda: C.scaled_mm(qa, wq_c, wsc_c, **mm_c), "bits"))
    wq, wsc = weight(512)
    bias = jnp.asarray(rng.standard_normal(512), jnp.float32)
    mm = {"input_quant_key": tok, "bias": bias}
    fast = fast_accum_k(tok, m, k, n)
    out.append(("scaled_mm row parallel (f32 out)",
                lambda: S.sharded_scaled_mm(qa, wq, wsc, mesh, P("dp", "tp"), out_dtype=jnp.float32, **mm),
                lambda: C.scaled_mm(qa, wq, wsc, out_dtype=jnp.float32, **mm),
                Bound("f32 order" + (" + fast acc" if fast else ""),
                      lambda: row_parallel_bound(qa, wq, wsc, "channel", k // 128, bias=bias, fast_k=fast),
                      norm=2 * FAST_ACCUM_NORM_F32 if fast else None)))

    inter = 128 * max(4, n)  # 128x128 weight blocks: each shard's gate/up/down slice a multiple of 128
    block = M.make_block(k, inter, key=g128, seed=4)
    out.append(("QuantLinear column parallel", lambda: T.column_parallel(block.gate_up, x, mesh, P("dp"), tp_axis="tp"),
                lambda: block.gate_up(x), "bits"))
    h = _x((m, inter), 5)
    dn = block.down
    out.append(("QuantLinear row parallel (f32 out)",
                lambda: T.row_parallel(dn, h, mesh, P("dp", "tp"), out_dtype=jnp.float32),
                lambda: dn(h, out_dtype=jnp.float32),
                Bound("f32 order", lambda: mm_bound(PR.quantize(h, dn.input_key, scale=dn.input_scale), dn,
                                                    inter // 128, bias=dn.bias))))
    tpb = T.shard_mlp_block(block, mesh, "tp")
    tp_fn = jax.jit(lambda b, a, r: T.tp_mlp(b, a, mesh, P("dp"), residual=r))
    one_fn = jax.jit(lambda a, r: M.mlp(block, a, r))
    y_fn = jax.jit(lambda a, r: single_mlp(block, a, r)[3])  # the down projection's input, for the bound
    out.append(("TP MLP block (1x128 groups)", lambda: tp_fn(tpb, x, res), lambda: one_fn(x, res),
                Bound("f32 order, bf16", lambda: mm_bound(y_fn(x, res), dn, inter // 128), cast=True)))
    return out


def check(kind, got, want) -> tuple[bool, bool, float, str]:
    """(ok, bit_exact, max relative error of the first output, why not ok); ``kind`` is "bits" or a
    :class:`Bound` on the first outputs (as f32); any further outputs (the MLP's residual) must be exact."""
    exact = _equal(got, want)
    (g0, *g_rest), (w0, *w_rest) = jax.tree.leaves(got), jax.tree.leaves(want)
    g, wv = np.asarray(g0, np.float32), np.asarray(w0, np.float32)
    if g.shape != wv.shape:
        return False, False, float("inf"), f"shape {g.shape} != {wv.shape}"
    rel = float(np.max(np.abs(g - wv) / np.maximum(np.abs(wv), 1e-30)))
    if kind == "bits" or exact:
        return exact, exact, rel, "" if exact else "bits differ"
    if not all((_bytes(a) == _bytes(b)).all() for a, b in zip(g_rest, w_rest)):
        return False, False, rel, "a further output (residual) differs"
    ok, why = kind(g, wv)
    return ok, False, rel, why


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="path of the JSON report (default: none with --cpu, else required)")
    ap.add_argument("--cpu", action="store_true",
                    help="run on the CPU devices (interpret mode): checks the script itself")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the cases whose name has one")
    args = ap.parse_args(argv)
    if args.out is None and not args.cpu:
        ap.error("--out is required")
    try:
        devs = jax.devices("cpu" if args.cpu else "gpu")
    except RuntimeError:
        devs = []
    if not devs:
        print("no GPU visible to jax: nothing to check (run this on a GPU host)")
        return 0
    mesh = Mesh(np.array(devs).reshape(1, len(devs)), ("dp", "tp"))
    report = {"env": {"python": platform.python_version(), "jax": jax.__version__, "device": str(devs[0].device_kind),
                      "n_devices": len(devs), "mesh": str(mesh), "interpret": jax.default_backend() != "gpu",
                      **{v: os.environ.get(v) for v in ("NCCL_NVLS_ENABLE", "XLA_FLAGS")}}, "cases": []}
    reps = 1 if args.cpu else 5
    t_start = time.perf_counter()
    only = [w for w in args.only.split(",") if w]
    all_cases = [c for c in cases(mesh) if not only or any(w in c[0] for w in only)]
    for i, (name, sharded, single, kind) in enumerate(all_cases):
        row = {"case": name, "check": kind if kind == "bits" else kind.__name__}
        t0 = time.perf_counter()
        try:
            got, want = sharded(), single()
            ok, exact, rel, why = check(kind, got, want)
            row.update(ok=ok, bit_exact=exact, max_rel_err=rel, sharded_ms=_median_ms(sharded, reps),
                       single_ms=_median_ms(single, reps))
            if why:
                row["why"] = why
        except Exception as e:  # noqa: BLE001  (record and go on)
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        report["cases"].append(row)
        print(f"[sharding {i + 1}/{len(all_cases)}] {name}: {'ok' if row['ok'] else 'FAIL'} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"\nsharded paths on a mesh of {len(devs)} {report['env']['device']} (dp=1, tp={len(devs)}; "
          f"jax {jax.__version__}{', interpret mode' if report['env']['interpret'] else ''})")
    print(f"{'case':<46} {'check':>16} {'exact':>5} {'max rel':>9} {'sharded ms':>10} {'single ms':>9}  status")
    for r in report["cases"]:
        if "error" in r:
            print(f"{r['case']:<46} {r['check']:>16} {'':>5} {'':>9} {'':>10} {'':>9}  FAIL {r['error'][:200]}")
            continue
        print(f"{r['case']:<46} {r['check']:>16} {'yes' if r['bit_exact'] else 'no':>5} {r['max_rel_err']:>9.2e} "
              f"{r['sharded_ms']:>10.3f} {r['single_ms']:>9.3f}  {'ok' if r['ok'] else 'FAIL ' + r.get('why', '')}")
    report["ok"] = all(r["ok"] for r in report["cases"])
    report["seconds"] = time.perf_counter() - t_start
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=str)
    print(f"\n{'ALL OK' if report['ok'] else 'FAILURES'} ({report['seconds']:.0f} s)"
          + (f"; wrote {args.out}" if args.out else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
