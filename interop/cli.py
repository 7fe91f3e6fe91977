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
          "128x128 weight blocks. NVFP4 / MXFP8 / MXFP4 activations (row-major or swizzled_128x4 scales) go to "
          "quantact_jax.dequant_gemm (routed by consumers.scaled_mm): weights of the same format (uint8 [N, K/2] "
          "packed e2m1 or e4m3 [N, K]) with row-major e4m3 [N, K/16] (NVFP4, plus both global scales) or e8m0 "
          "[N, K/32] (MX) scales, K tiles dequantised in-kernel, bf16 dot with f32 accumulation.")
    print("\nQuantLinear (quantact_jax.layers / quantact_torch.layers) loads vLLM / compressed-tensors state dicts and "
          "exposes its input key: fp8 weights [N, K] with per-tensor (1,), per-channel (N, 1) or 128x128-block "
          "weight_scale take per-tensor (static with input_scale, or dynamic), dynamic per-token or 1x128-group "
          "activations (JAX backends: pallas, xla, reference; torch: reference, torch._scaled_mm on CUDA); NVFP4 "
          "weights uint8 [N, K/2] with e4m3 [N, K/16] scales and global scales take kNvfp4Dynamic activations "
          "(JAX: the Pallas dequantising GEMM by default, or reference; torch: reference). MX layers: the JAX "
          "raw constructor with interop.weights.WEIGHT_MXFP8 / WEIGHT_MXFP4 (no state-dict loading yet).")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The MLP block demo, then the producer demo (``--part`` picks one)."""
    rc = _demo_block(args) if args.part in ("all", "block") else 0
    if args.part in ("all", "producers"):
        print()
        rc |= _demo_producers(args)
    return rc


def _time_ms(fn, reps: int) -> float:
    """Median wall time (ms) of ``fn()`` after one warm-up call (JAX or torch results, synchronised)."""
    import statistics

    import jax
    import torch

    def once() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    once()
    return statistics.median(once() for _ in range(reps))


def _demo_block(args: argparse.Namespace) -> int:
    """Build the decoder MLP block on seeded weights for several keys; run the fused JAX block, the
    unfused JAX block (on the layers' own GEMM and on XLA's fp8 dot) and the PyTorch reference block;
    print an equivalence table (against the fused block, with the expected bound) and a timing table."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from interop.bridge import to_torch
    from interop.keys import ALL_KEYS
    from quantact_jax import mlp as M
    from quantact_torch.mlp import MLPBlock as TorchBlock

    on_gpu = jax.default_backend() == "gpu"
    hidden = args.hidden or (4096 if on_gpu else 256)
    inter = args.intermediate or (14336 if on_gpu else 384)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else ([16, 4096] if on_gpu else [16])
    names = args.keys.split(",") if args.keys else ["kFp8DynamicTokenSym", "kFp8StaticTensorSym",
                                                    "kFp8Dynamic128Sym", "kNvfp4Dynamic"]
    supported = ("kFp8DynamicTokenSym", "kFp8DynamicTensorSym", "kFp8StaticTensorSym", "kFp8Dynamic128Sym",
                 "kNvfp4Dynamic")
    if set(names) - set(supported):
        print(f"--keys: the block takes {', '.join(supported)}; got {args.keys}", file=sys.stderr)
        return 2
    keys = {n: ALL_KEYS[n] for n in names}
    if hidden % 128 or inter % 128:
        del keys["kFp8Dynamic128Sym"]  # 1x128 groups need multiples of 128
    if hidden % 16 or inter % 16:
        del keys["kNvfp4Dynamic"]
    tdev = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    reps = 20 if on_gpu else 3
    print(f"quantact demo: decoder MLP block (residual add + RMSNorm -> quant -> gate/up [{2 * inter}, {hidden}] -> "
          f"SiLU-and-mul -> quant -> down [{hidden}, {inter}]), bf16, seed {args.seed}, on "
          f"{jax.devices()[0].device_kind} ({'compiled Pallas-Triton' if on_gpu else 'Pallas interpret mode: no GPU found'})")
    fused = jax.jit(M.mlp)
    unfused = jax.jit(M.mlp_unfused, static_argnames=("gemm",))

    def variants(block, tblock, x, r) -> dict:
        xt, rt = to_torch(x).to(tdev), to_torch(r).to(tdev)
        runs = {"fused JAX": lambda: fused(block, x, r)[0], "unfused JAX": lambda: unfused(block, x, r)[0]}
        if M.is_fp8_block(block):
            runs["unfused JAX, XLA fp8 dot"] = lambda: unfused(block, x, r, gemm="xla")[0]
        runs["PyTorch reference"] = lambda: tblock(xt, rt)[0]
        return runs

    eq_rows, t_rows, ok = [], [], True
    for name, key in keys.items():
        block = M.make_block(hidden, inter, key=key, seed=args.seed)
        tblock = TorchBlock.from_state_dict(block.state_dict(), input_quant_key=key, use_scaled_mm=False).to(tdev)
        label = name + (" (jnp GEMM)" if key.is_fp4 else "")
        for m in tokens:
            rng = np.random.default_rng(args.seed + m)
            x, r = (jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32), jnp.bfloat16) for _ in range(2))
            runs = variants(block, tblock, x, r)
            outs = {k: np.asarray(jnp.asarray(fn(), jnp.float32)) if k != "PyTorch reference" else
                    fn().float().cpu().numpy() for k, fn in runs.items()}
            t_rows.append((label, m, {k: _time_ms(fn, reps) for k, fn in runs.items()}))
            ref = outs["fused JAX"]
            for k, out in outs.items():
                if k == "fused JAX":
                    continue
                # expected distance to the fused block: the plain path's rounding (dynamic keys; 0 for static
                # keys on CPU, where every op rounds alike) plus, where the GEMM differs, its f32 sum order
                bound = {"unfused JAX": M.unfused_rtol(key) + (M.SUM_ORDER_RTOL if on_gpu else 0.0),
                         "unfused JAX, XLA fp8 dot": M.unfused_rtol(key) + M.SUM_ORDER_RTOL}.get(k, M.SUM_ORDER_RTOL)
                rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                exact = bool((out == ref).all())
                passed = exact if bound == 0 else rel < bound
                ok &= passed
                eq_rows.append((label, m, k, float(np.abs(out - ref).max()), rel, exact,
                                "bit-exact" if bound == 0 else f"rel < {bound:.3g}", passed))
    head = (f"{'key':32s} {'M':>5s}  {'vs the fused JAX block':26s} {'max |diff|':>10s} {'rel L2':>9s} "
            f"{'bit-exact':>9s}  {'expected':16s}")
    print("\nequivalence\n" + head + "\n" + "-" * len(head))
    for label, m, k, mx, rel, exact, want, passed in eq_rows:
        print(f"{label:32s} {m:5d}  {k:26s} {mx:10.3g} {rel:9.2e} {'yes' if exact else 'no':>9s}  {want:16s}"
              f"{'' if passed else '  FAIL'}")
    cols = ["fused JAX", "unfused JAX", "unfused JAX, XLA fp8 dot", "PyTorch reference"]
    head = f"{'key':32s} {'M':>5s}  " + " ".join(f"{c:>24s}" for c in cols)
    print(f"\ntiming (ms, median of {reps}{'; interpret mode on CPU: not performance figures' if not on_gpu else ''})\n"
          + head + "\n" + "-" * len(head))
    for label, m, t in t_rows:
        print(f"{label:32s} {m:5d}  " + " ".join(f"{t[c]:24.3f}" if c in t else f"{'-':>24s}" for c in cols))
    print("\nthe block agrees with its unfused form and the PyTorch reference" if ok else "\nMISMATCH: see the table above")
    return 0 if ok else 1


def _demo_producers(args: argparse.Namespace) -> int:
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
    """The producer, consumer and MLP-block benchmarks with their peers, in one process: tables,
    one JSON (``--out``) and a PNG of achieved vs ceiling (``--plot``, needs matplotlib)."""
    import importlib
    import json
    import tempfile

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    which = [w for w in args.which.split(",") if w]
    if set(which) - {"producers", "consumers", "block"}:
        print(f"--which takes producers, consumers, block; got {args.which}", file=sys.stderr)
        return 2
    if jax.default_backend() != "gpu":
        if not args.interpret_small:
            print("no GPU found: `quantact bench` needs one (on a CPU the kernels run in Pallas interpret mode, "
                  "which says nothing about speed). `quantact bench --interpret-small` runs the block "
                  "benchmark's small CPU smoke test.")
            return 0
        if which != ["block"]:
            print("no GPU found: running only the block benchmark's small interpret-mode smoke test")
        which = ["block"]
    from quantact_jax.bench import block, plot

    res: dict = {}
    rc = 0
    for name in block.progress(which, "quantact bench"):
        if name == "block":
            res["block"] = block.run(interpret_small=args.interpret_small)
            print(block.table(res["block"]))
            continue
        with tempfile.TemporaryDirectory() as tmp:  # the producer/consumer scripts write their own JSON
            path = os.path.join(tmp, f"{name}.json")
            flags = (["--quick"] if args.quick and name == "producers" else []) + (["--configs"] if args.configs else [])
            argv, sys.argv = sys.argv, [f"quantact bench {name}", "--out", path, *flags]
            try:
                rc |= importlib.import_module(f"quantact_jax.bench.{name}").main()
            finally:
                sys.argv = argv
            if os.path.exists(path):
                with open(path) as f:
                    res[name] = json.load(f)
    first = next(iter(res.values()), {})
    res = {"device": first.get("device"), "date": first.get("date"), **res}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"results: {args.out}")
    png = args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out else None)
    if png:
        if plot.plot(res, png):
            print(f"plot: {png}")
        else:
            print("no plot: matplotlib is not installed (pip install 'quantact[bench]'), or no section has a "
                  "ceiling (interpret-mode runs have none)")
    return rc


def _check(args: argparse.Namespace) -> int:
    """The Pallas kernels through the torch ops vs the torch reference, bit for bit (quantact_torch.check)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from quantact_torch.check import run_cli

    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quantact", description="vLLM's pre-quantized activation contract for "
                                 "JAX/Pallas, bridged to PyTorch.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the fused MLP block and every fused producer against their unfused forms "
                       "and the jnp and torch references")
    d.add_argument("--part", choices=("all", "block", "producers"), default="all", help="which demo (default: both)")
    d.add_argument("--hidden", type=int, default=0, help="block hidden size (default: 256 on CPU, 4096 on GPU)")
    d.add_argument("--intermediate", type=int, default=0,
                   help="block intermediate size (default: 384 on CPU, 14336 on GPU)")
    d.add_argument("--tokens", default="", help="block token counts, comma-separated (default: 16 on CPU, 16,4096 on GPU)")
    d.add_argument("--keys", default="", help="block activation keys, comma-separated constants (default: "
                   "kFp8DynamicTokenSym,kFp8StaticTensorSym,kFp8Dynamic128Sym,kNvfp4Dynamic)")
    d.add_argument("--m", type=int, default=0, help="producer demo tokens (default: 64 on CPU, 4096 on GPU)")
    d.add_argument("--k", type=int, default=0, help="producer demo hidden size (default: 512 on CPU, 4096 on GPU)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)
    sub.add_parser("keys", help="list the keys and scale layouts each producer supports").set_defaults(fn=_keys)
    b = sub.add_parser("bench", help="producer, consumer and MLP-block benchmarks vs XLA, cuBLASLt, torch.compile, "
                       "torch eager (needs a GPU)")
    b.add_argument("--which", default="producers,consumers,block", help="comma-separated subset (default: all three)")
    b.add_argument("--out", default=None, help="write all results as one JSON here (and the plot next to it)")
    b.add_argument("--plot", default=None, help="PNG of achieved vs ceiling (default: --out with .png; needs matplotlib)")
    b.add_argument("--quick", action="store_true", help="smaller producer shapes")
    b.add_argument("--configs", action="store_true", help="also sweep kernel configs")
    b.add_argument("--interpret-small", action="store_true",
                   help="without a GPU: run the block benchmark on small shapes in interpret mode (a smoke test)")
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
    if args.cmd == "demo" and args.part != "block" and args.m and args.k and args.k % 128:
        ap.error("--k must be a multiple of 128 (the demo includes group-128 keys)")
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
