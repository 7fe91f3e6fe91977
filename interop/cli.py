"""The ``quantact`` command: ``demo`` (the main job), ``keys``, ``bench``.

jax and torch are imported inside the subcommands, so ``quantact --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _keys(_: argparse.Namespace) -> int:
    """Which keys and scale layouts each producer supports (and what consumes them)."""
    from interop.keys import ALL_KEYS

    rows = []
    for name, key in ALL_KEYS.items():
        g = key.group_size
        if g in (64, 128):
            layouts = "row_major, col_major, col_major_tma, packed_ue8m0 (+ue8m0 rounding)"
        elif g in (16, 32):
            layouts = "swizzled_128x4 (default), row_major"
        else:
            layouts = "-"
        fused = "quant" if key.scale.static and (key.is_fp4 or key.format.value == "mxfp8") else \
            "quant, rms_norm(+residual), silu_and_mul"
        rows.append((name, str(key), key.format.value, layouts, fused))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    head = ("constant", "str (vLLM format)", "format", "scale layouts", "Pallas producers")
    w = [max(a, len(b)) for a, b in zip(w, head)]
    print("  ".join(h.ljust(n) for h, n in zip(head, w)))
    print("  ".join("-" * n for n in w))
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, w)))
    print("\nConsumer quantact_jax.consumers.scaled_mm (fp8 weights [N, K]) takes activations keyed "
          "kFp8StaticTensorSym / kFp8DynamicTensorSym (per-tensor), kFp8DynamicTokenSym / kFp8StaticTokenSym "
          "(per-token) with per-tensor or per-channel weight scales, and kFp8Dynamic128Sym (row-major) with "
          "128x128 weight blocks. NVFP4/MX consumers: reference only (quantact_jax.reference.scaled_mm).")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run every fused producer on seeded data with the Pallas kernels, the jnp reference
    and the torch reference; print an equivalence and timing table."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from interop import bridge
    from interop.keys import (kFp8Dynamic128Sym, kFp8DynamicTensorSym, kFp8DynamicTokenSym,
                              kFp8StaticTensorSym, kInt8DynamicTokenSym, kMxfp8Dynamic, kNvfp4Dynamic)
    from quantact_jax import producers as P
    from quantact_jax import reference as RJ
    from quantact_torch import reference as RT

    on_gpu = jax.default_backend() == "gpu"
    m, k = (args.m, args.k) if args.m else ((4096, 4096) if on_gpu else (64, 512))
    print(f"quantact demo on {jax.devices()[0].device_kind} ({'compiled Pallas-Triton' if on_gpu else 'Pallas interpret mode: no GPU found'}), "
          f"M={m}, K={k}, bf16 input, seed {args.seed}")
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * 2
    x2 = rng.standard_normal((m, 2 * k)).astype(np.float32)
    res = rng.standard_normal((m, k)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    xj, x2j, rj, wj = (jnp.asarray(a, jnp.bfloat16) for a in (x, x2, res, w))
    cpu = jax.devices("cpu")[0]
    tt = {n: bridge.to_torch(jax.device_put(a, cpu)).cpu() for n, a in
          (("x", xj), ("x2", x2j), ("r", rj), ("w", wj))}
    gs = np.float32(448 * 6 / float(np.abs(x).max() * 1.5))
    cases = [
        ("rms_norm+res", kFp8StaticTensorSym, {"scale": np.float32(0.02)}),
        ("rms_norm+res", kFp8DynamicTokenSym, {}),
        ("rms_norm+res", kFp8Dynamic128Sym.with_layout("col_major_tma"), {}),
        ("rms_norm+res", kNvfp4Dynamic, {"global_scale": gs}),
        ("silu_and_mul", kFp8DynamicTokenSym, {}),
        ("silu_and_mul", kFp8Dynamic128Sym, {}),
        ("silu_and_mul", kNvfp4Dynamic, {"global_scale": gs}),
        ("quant", kFp8DynamicTensorSym, {}),
        ("quant", kFp8Dynamic128Sym.with_layout("packed_ue8m0"), {}),
        ("quant", kMxfp8Dynamic, {}),
        ("quant", kInt8DynamicTokenSym, {}),
    ]

    def bytes_of(a) -> np.ndarray:
        a = a.cpu() if isinstance(a, torch.Tensor) else a
        if isinstance(a, torch.Tensor):
            a = a.contiguous().view(torch.uint8).numpy()
        return np.ascontiguousarray(np.asarray(a)).view(np.uint8)

    def run(mod, op, key, kw, frame):
        if frame == "torch":
            xx, xx2, rr, ww = tt["x"], tt["x2"], tt["r"], tt["w"]
        else:
            xx, xx2, rr, ww = xj, x2j, rj, wj
            if frame == "ref":
                xx, xx2, rr, ww = (jax.device_put(a, cpu) for a in (xx, xx2, rr, ww))
        if op == "quant":
            return mod.quantize(xx, key, **kw)
        if op == "silu_and_mul":
            return mod.silu_and_mul_quant(xx2, key, **kw)
        return mod.rms_norm_quant(xx, ww, key, residual=rr, **kw)[0]

    from interop.keys import ALL_KEYS

    def label(key) -> str:
        for name, k0 in ALL_KEYS.items():
            if k0 == key:
                return name
            if k0.scale.group_shape == key.scale.group_shape and k0.dtype == key.dtype and \
                    k0.scale.dtype == key.scale.dtype and k0.scale.static == key.scale.static:
                return f"{name}[{key.scale.layout}]"
        return str(key)

    head = f"{'op':14s} {'key':36s} {'= jnp ref':>10s} {'= torch ref':>14s} {'Pallas ms':>10s}"
    print(head)
    print("-" * len(head))
    ok = True
    for op, key, kw in cases:
        got = run(P, op, key, kw, "jax")
        jax.block_until_ready(got)
        t0 = time.perf_counter()
        got = run(P, op, key, kw, "jax")
        jax.block_until_ready(got)
        ms = (time.perf_counter() - t0) * 1e3
        with jax.default_device(cpu):
            want = run(RJ, op, key, kw, "ref")
        tref = run(RT, op, key, {a: (torch.tensor(b) if isinstance(b, np.generic) else b) for a, b in kw.items()},
                   "torch")
        same_j = (bytes_of(got.data) == bytes_of(want.data)).all() and (bytes_of(got.scale) == bytes_of(want.scale)).all()
        t_scale = tref.scale_storage()
        same_t = (bytes_of(want.data) == bytes_of(tref.data)).all() and (bytes_of(want.scale) == bytes_of(t_scale)).all()
        codes_t = (bytes_of(want.data) != bytes_of(tref.data)).mean()
        # SiLU uses exp, whose last bit XLA:CPU and torch round differently (see NUMERICS.md)
        tcol = "bit-exact" if same_t else ("scales ~ulp" if codes_t == 0 else f"{100 * codes_t:.3f}% codes")
        if not same_t and not (op == "silu_and_mul" and codes_t < 0.01):
            ok = False
        ok &= bool(same_j) or (on_gpu and op == "silu_and_mul")
        print(f"{op:14s} {label(key):36s} {'bit-exact' if same_j else 'DIFFERS':>10s} {tcol:>14s} {ms:10.2f}")
    print("\nall producers agree with the references" if ok else "\nMISMATCH: see the table above")
    return 0 if ok else 1


def _bench(args: argparse.Namespace) -> int:
    from quantact_jax.bench import producers

    sys.argv = ["quantact bench"] + (["--out", args.out] if args.out else []) + (["--quick"] if args.quick else []) \
        + (["--configs"] if args.configs else [])
    return producers.main()


def _check(args: argparse.Namespace) -> int:
    """The Pallas kernels through the torch ops vs the torch reference, bit for bit (quantact_torch.check)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from quantact_torch.check import run_cli

    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quantact", description="vLLM's pre-quantized activation contract for "
                                 "JAX/Pallas, bridged to PyTorch.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the fused producers and check them against the jnp and torch references")
    d.add_argument("--m", type=int, default=0, help="tokens (default: 64 on CPU, 4096 on GPU)")
    d.add_argument("--k", type=int, default=0, help="hidden size (default: 512 on CPU, 4096 on GPU)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)
    sub.add_parser("keys", help="list the keys and scale layouts each producer supports").set_defaults(fn=_keys)
    b = sub.add_parser("bench", help="producer benchmark vs XLA, torch.compile, torch eager (needs a GPU)")
    b.add_argument("--out", default=None, help="write the results as JSON here")
    b.add_argument("--quick", action="store_true", help="smaller shapes")
    b.add_argument("--configs", action="store_true", help="also sweep block_m x num_warps")
    b.set_defaults(fn=_bench)
    c = sub.add_parser("check", help="Pallas kernels run through the torch ops vs the torch reference, bit for bit, "
                       "for every key and fused op; exit 1 on a mismatch")
    c.add_argument("--m", type=int, default=37, help="tokens (default 37)")
    c.add_argument("--k", type=int, default=384, help="hidden size, a multiple of 128 (default 384)")
    c.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--keys", default="", help="comma-separated key constants, e.g. kFp8DynamicTokenSym (default: all)")
    c.add_argument("--ops", default="quant,rms,rms+res,silu", help="comma-separated ops (default: all four)")
    c.add_argument("--layouts", action="store_true", help="also every other scale layout of each key")
    c.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when torch sees one)")
    c.set_defaults(fn=_check)
    args = ap.parse_args(argv)
    if args.cmd == "demo" and args.m and args.k and args.k % 128:
        ap.error("--k must be a multiple of 128 (the demo includes group-128 keys)")
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
