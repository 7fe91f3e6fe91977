#!/usr/bin/env python
"""GPU check of the sharded code paths (``quantact_jax.sharding``, ``quantact_jax.tp``) on a mesh of one GPU.

Every sharded op (producers, ``sharded_scaled_mm`` data/column/row parallel, column/row-parallel
``QuantLinear``, the TP MLP block) is compiled on one GPU through ``shard_map`` (mesh axes ``dp`` and
``tp`` of size 1) and compared with the unsharded op: bit for bit, except where the sharded path
sums partials outside the kernel (row parallel, the MLP's down projection): there the kernel's
epilogue ``sa * (sb * acc) + bias`` may be one fused multiply-add on the GPU while the sharded path
adds the bias after the (here trivial) ``psum``, so those are checked against one f32 rounding of the
terms. Also times both paths (median of a few calls) to show the wrapper's overhead.

Prints a table and writes JSON to ``--out``; exit status 1 if a check failed. Without a GPU it prints
a message and exits 0::

    python bench/sharding_gpu.py --out bench/results/sharding_gpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from interop import keys as K


def _bytes(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _equal(got, want) -> bool:
    g, w = jax.tree.leaves(got), jax.tree.leaves(want)
    return len(g) == len(w) and all(a.shape == b.shape and (_bytes(a) == _bytes(b)).all() for a, b in zip(g, w))


def _median_ms(fn, n: int = 5) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _x(shape, seed, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.5, 4.0, (*shape[:-1], 1)), dtype)


def cases(mesh: Mesh):
    """(name, sharded fn, unsharded fn, check): check is "bits" or a tolerance function (see :func:`check`)."""
    from quantact_jax import consumers as C
    from quantact_jax import mlp as M
    from quantact_jax import producers as PR
    from quantact_jax import sharding as S
    from quantact_jax import tp as T

    g128 = K.kFp8Dynamic128Sym
    x = _x((256, 1024), 0)
    w = _x((1024,), 1)
    res = _x((256, 1024), 2)
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
        out.append((f"quantize {label}", lambda key=key, kw=kw: S.sharded_quantize(x, key, mesh, P("dp", "tp"), **kw),
                    lambda key=key, kw=kw: PR.quantize(x, key, **kw), "bits"))
    out.append(("rms_norm_quant per-token + residual",
                lambda: S.sharded_rms_norm_quant(x, w, K.kFp8DynamicTokenSym, mesh, P("dp"), residual=res),
                lambda: PR.rms_norm_quant(x, w, K.kFp8DynamicTokenSym, residual=res), "bits"))
    out.append(("silu_and_mul_quant 1x128", lambda: S.sharded_silu_and_mul_quant(x, g128, mesh, P("dp", "tp")),
                 lambda: PR.silu_and_mul_quant(x, g128), "bits"))
    jit_q = jax.jit(lambda a: S.sharded_quantize(a, g128, mesh, P("dp", "tp")),
                    out_shardings=S.activation_sharding(NamedSharding(mesh, P("dp", "tp")), g128, x.shape, x.dtype))
    out.append(("jit(sharded_quantize) with out_shardings", lambda: jit_q(x), lambda: PR.quantize(x, g128), "bits"))

    rng = np.random.default_rng(3)
    wf = jnp.asarray(rng.standard_normal((512, 1024)) * 0.05, jnp.float32)
    wsc = jnp.max(jnp.abs(wf), axis=1, keepdims=True) / 448
    wq = PR.quantize(wf.astype(jnp.bfloat16), K.kFp8StaticTokenSym, scale=wsc).data  # per-channel weight
    bias = jnp.asarray(rng.standard_normal(512), jnp.float32)
    qa = PR.quantize(x, K.kFp8DynamicTokenSym)
    mm = {"input_quant_key": K.kFp8DynamicTokenSym, "bias": bias}
    single = lambda: C.scaled_mm(qa, wq, wsc, **mm)
    out.append(("scaled_mm data + column parallel", lambda: S.sharded_scaled_mm(qa, wq, wsc, mesh, P("dp"), n_axes="tp", **mm),
                single, "bits"))
    out.append(("scaled_mm row parallel (f32 out)",
                lambda: S.sharded_scaled_mm(qa, wq, wsc, mesh, P("dp", "tp"), out_dtype=jnp.float32, **mm),
                lambda: C.scaled_mm(qa, wq, wsc, out_dtype=jnp.float32, **mm), f32_bound(float(jnp.max(jnp.abs(bias))))))

    block = M.make_block(1024, 512, key=g128, seed=4)
    out.append(("QuantLinear column parallel", lambda: T.column_parallel(block.gate_up, x, mesh, P("dp"), tp_axis="tp"),
                lambda: block.gate_up(x), "bits"))
    h = _x((256, 512), 5)
    out.append(("QuantLinear row parallel (f32 out)",
                lambda: T.row_parallel(block.down, h, mesh, P("dp", "tp"), out_dtype=jnp.float32),
                lambda: block.down(h, out_dtype=jnp.float32), f32_bound(0.0)))
    tpb = T.shard_mlp_block(block, mesh, "tp")
    tp_fn = jax.jit(lambda b, a, r: T.tp_mlp(b, a, mesh, P("dp"), residual=r))
    one_fn = jax.jit(lambda a, r: M.mlp(block, a, r))
    out.append(("TP MLP block (1x128 groups)", lambda: tp_fn(tpb, x, res), lambda: one_fn(x, res), bf16_step))
    return out


def f32_bound(bias_abs: float):
    """Row parallel on a mesh of one: the kernel may fuse ``t + bias`` (``t = sa * (sb * acc)``) into one
    FMA, the sharded path rounds ``t`` then adds: at most one rounding of each, ``2**-24 (|t| + |out|)``
    with ``|t| <= |out| + |bias|``."""
    def f32_round(g, w) -> bool:
        return bool(np.all(np.abs(g - w) <= 2.0**-23 * (np.abs(w) + bias_abs)))

    return f32_round


def bf16_step(g, w) -> bool:
    """One bf16 step (2**-7 relative) where an f32 rounding difference tips the final cast."""
    return bool(np.all(np.abs(g - w) <= 2.0**-7 * np.maximum(np.abs(g), np.abs(w))))


def check(kind, got, want) -> tuple[bool, bool, float]:
    """(ok, bit_exact, max relative error of the first output); ``kind`` is "bits" or a tolerance
    function on the first outputs (as f32); any further outputs (the MLP's residual) must be exact."""
    exact = _equal(got, want)
    (g0, *g_rest), (w0, *w_rest) = jax.tree.leaves(got), jax.tree.leaves(want)
    g, wv = np.asarray(g0, np.float32), np.asarray(w0, np.float32)
    if g.shape != wv.shape:
        return False, False, float("inf")
    rel = float(np.max(np.abs(g - wv) / np.maximum(np.abs(wv), 1e-30)))
    if kind == "bits":
        return exact, exact, rel
    rest_ok = all((_bytes(a) == _bytes(b)).all() for a, b in zip(g_rest, w_rest))
    return exact or (rest_ok and kind(g, wv)), exact, rel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="path of the JSON report")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (interpret mode): checks the script itself")
    args = ap.parse_args(argv)
    try:
        gpus = jax.devices("cpu" if args.cpu else "gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        print("no GPU visible to jax: nothing to check (run this on a GPU host)")
        return 0
    mesh = Mesh(np.array(gpus[:1]).reshape(1, 1), ("dp", "tp"))
    report = {"env": {"python": platform.python_version(), "jax": jax.__version__, "device": str(gpus[0].device_kind),
                      "mesh": str(mesh)}, "cases": []}
    for name, sharded, single, kind in cases(mesh):
        row = {"case": name, "check": kind if kind == "bits" else kind.__name__}
        try:
            got, want = sharded(), single()
            ok, exact, rel = check(kind, got, want)
            row.update(ok=ok, bit_exact=exact, max_rel_err=rel, sharded_ms=_median_ms(sharded),
                       single_ms=_median_ms(single))
        except Exception as e:  # noqa: BLE001  (record and go on)
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        report["cases"].append(row)
    print(f"sharded paths on a mesh of one {report['env']['device']} (jax {jax.__version__})")
    print(f"{'case':<42} {'check':>9} {'exact':>5} {'max rel':>9} {'sharded ms':>10} {'single ms':>9}  status")
    for r in report["cases"]:
        if "error" in r:
            print(f"{r['case']:<42} {r['check']:>9} {'':>5} {'':>9} {'':>10} {'':>9}  FAIL {r['error'][:200]}")
            continue
        print(f"{r['case']:<42} {r['check']:>9} {'yes' if r['bit_exact'] else 'no':>5} {r['max_rel_err']:>9.2e} "
              f"{r['sharded_ms']:>10.3f} {r['single_ms']:>9.3f}  {'ok' if r['ok'] else 'FAIL'}")
    report["ok"] = all(r["ok"] for r in report["cases"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"\n{'ALL OK' if report['ok'] else 'FAILURES'}; wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
