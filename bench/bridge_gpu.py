#!/usr/bin/env python
"""GPU check of the DLPack bridge (``interop.bridge``) between PyTorch and JAX.

On a CUDA device, for every bridge dtype and for a ``QuantizedActivation`` of every scale layout:
moves torch CUDA tensors to JAX and back (and JAX-born arrays to torch and back), asserts that the
buffer pointer never changes (zero-copy) and that every bit survives. Also checks that the DLPack
stream exchange orders work across frameworks (a torch kernel still running on a side stream when
JAX imports its output; a JAX computation still running when torch imports it), what happens to an
unaligned view, that a deleted source stays alive, and the per-call overhead.

Prints a table and writes JSON to ``--out``. Exit status 1 if any check failed.
Needs only jax (with CUDA), torch (CUDA) and numpy, plus this repository on the path::

    python bench/bridge_gpu.py --out bench/results/bridge_gpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: share the GPU with torch

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from interop import keys as K  # noqa: E402
from interop.bridge import BRIDGE_DTYPES, BridgeCopyWarning, to_jax, to_torch  # noqa: E402
from interop.dtypes import numpy_dtype  # noqa: E402
from interop.layout import data_storage, rows_cols, scale_storage_shape  # noqa: E402
from quantact_jax.activation import QuantizedActivation as JaxQA  # noqa: E402
from quantact_torch.activation import QuantizedActivation as TorchQA  # noqa: E402
from quantact_torch.activation import scale_from_storage  # noqa: E402

QA_KEYS = {
    "fp8_per_tensor_static": K.kFp8StaticTensorSym,
    "fp8_per_token": K.kFp8DynamicTokenSym,
    "fp8_g128_row_major": K.kFp8Dynamic128Sym,
    "fp8_g64_row_major": K.kFp8Dynamic64Sym,
    "fp8_g128_col_major": K.kFp8Dynamic128Sym.with_layout("col_major"),
    "fp8_g128_col_major_tma": K.kFp8Dynamic128Sym.with_layout("col_major_tma"),
    "fp8_g128_packed_ue8m0": K.kFp8Dynamic128Sym.with_layout("packed_ue8m0"),
    "nvfp4_swizzled": K.kNvfp4Dynamic,
    "nvfp4_row_major": K.kNvfp4Dynamic.with_layout("row_major"),
    "mxfp8_swizzled": K.kMxfp8Dynamic,
    "mxfp4_swizzled": K.kMxfp4Dynamic,
    "int8_per_token": K.kInt8DynamicTokenSym,
    "fp8_block128_static": K.kFp8Static128BlockSym,
}

DEV = "cuda"


def tptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def jptr(a: jax.Array) -> int:
    return a.unsafe_buffer_pointer()


def tbytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def jbytes(a: jax.Array) -> bytes:
    return np.asarray(a).tobytes()


def random_tensor(shape, dtype_name: str, gen: torch.Generator) -> torch.Tensor:
    """Random bytes (every bit pattern allowed) as a fresh CUDA tensor of ``dtype_name``."""
    td = getattr(torch, dtype_name)
    n = math.prod(shape) * td.itemsize
    raw = torch.randint(0, 256, (max(n, 1),), dtype=torch.uint8, device=DEV, generator=gen)[:n]
    return raw.view(td).reshape(shape).clone()


def check(cond: bool, what: str, fails: list[str]) -> bool:
    if not cond:
        fails.append(what)
    return cond


# ---- plain dtypes -------------------------------------------------------------------------


def run_dtype(dtype: str, gen: torch.Generator) -> dict:
    fails: list[str] = []
    td = getattr(torch, dtype)
    if td.itemsize == 1:  # every bit pattern, 4096 times
        t = torch.arange(256, dtype=torch.int32, device=DEV).to(torch.uint8).repeat(4096).view(td).reshape(1024, 1024)
    else:
        t = random_tensor((1024, 1024 // td.itemsize), dtype, gen)
    want = tbytes(t)
    a = to_jax(t)
    check(list(a.devices())[0].platform == "gpu", "jax array not on gpu", fails)
    t2j = check(jptr(a) == tptr(t), "torch->jax pointer differs", fails)
    check(jbytes(a) == want, "torch->jax bits differ", fails)
    t2 = to_torch(a)
    j2t = check(tptr(t2) == tptr(t) and t2.device == t.device, "jax->torch pointer differs", fails)
    check(tbytes(t2) == want, "jax->torch bits differ", fails)
    # JAX-born array
    a0 = jax.device_put(np.frombuffer(want, np.uint8).view(numpy_dtype(dtype)).reshape(t.shape), jax.devices("gpu")[0])
    t3 = to_torch(a0)
    j0 = check(tptr(t3) == jptr(a0), "jax-born ->torch pointer differs", fails)
    a3 = to_jax(t3)
    check(jptr(a3) == jptr(a0), "jax-born round trip pointer differs", fails)
    check(tbytes(t3) == want and jbytes(a3) == want, "jax-born bits differ", fails)
    # transposed (compact, not row-major) tensor
    tt = t.T if t.dim() == 2 else t
    at = to_jax(tt)
    tr = check(jptr(at) == tptr(tt) and jbytes(at) == tbytes(tt), "transposed torch->jax differs", fails)
    back_t = to_torch(at)
    check(back_t.stride() == tt.stride(), f"transposed strides {back_t.stride()} != {tt.stride()}", fails)
    return {"dtype": dtype, "torch_to_jax_zero_copy": t2j, "jax_to_torch_zero_copy": j2t,
            "jax_born_zero_copy": j0, "transposed_zero_copy": tr, "bits_equal": not any("bits" in f for f in fails),
            "ok": not fails, "failures": fails}


# ---- QuantizedActivation per layout ------------------------------------------------------------


def torch_qa(key, orig_shape, gen) -> TorchQA:
    m, k = rows_cols(orig_shape)
    ds, dd = data_storage(key, orig_shape)
    ss, sd = scale_storage_shape(key.scale, m, k), key.scale.storage_dtype
    data = random_tensor(ds, dd, gen)
    storage = random_tensor(ss, sd, gen)
    return TorchQA(data, scale_from_storage(storage, key, orig_shape), torch.bfloat16, orig_shape, key).validate()


def run_qa(name: str, key, gen: torch.Generator) -> dict:
    fails: list[str] = []
    g = key.group_size or 128
    orig_shape = (3, 77, 8 * g)  # M = 231: not a multiple of 4 or 128 (padding exercised)
    tqa = torch_qa(key, orig_shape, gen)
    storage = tqa.scale_storage()
    want_d, want_s = tbytes(tqa.data), tbytes(storage)
    jqa = to_jax(tqa)
    check(isinstance(jqa, JaxQA) and jqa.quant_key == key and jqa.orig_shape == orig_shape, "metadata", fails)
    check(jqa.orig_dtype == numpy_dtype("bfloat16"), "orig_dtype", fails)
    d0 = check(jptr(jqa.data) == tptr(tqa.data), "data torch->jax pointer", fails)
    s0 = check(jptr(jqa.scale) == tptr(storage), "scale torch->jax pointer", fails)
    check(jbytes(jqa.data) == want_d and jbytes(jqa.scale) == want_s, "torch->jax bits", fails)
    back = to_torch(jqa)
    d1 = check(tptr(back.data) == tptr(tqa.data), "data jax->torch pointer", fails)
    s1 = check(tptr(back.scale) == tptr(tqa.scale), "scale jax->torch pointer", fails)
    check(back.scale.stride() == tqa.scale.stride() and back.scale.shape == tqa.scale.shape,
          f"scale view {tuple(back.scale.shape)}/{back.scale.stride()} != {tuple(tqa.scale.shape)}/{tqa.scale.stride()}",
          fails)
    check(back.orig_dtype == torch.bfloat16 and back.orig_shape == torch.Size(orig_shape), "metadata back", fails)
    check(tbytes(back.data) == want_d and tbytes(back.scale_storage()) == want_s, "jax->torch bits", fails)
    # JAX-born activation
    jb = JaxQA(jnp.asarray(np.asarray(jqa.data)), jnp.asarray(np.asarray(jqa.scale)), np.dtype(numpy_dtype("bfloat16")),
               orig_shape, key).validate()
    tb = to_torch(jb)
    jb0 = check(tptr(tb.data) == jptr(jb.data) and tptr(tb.scale) == jptr(jb.scale), "jax-born pointers", fails)
    jb2 = to_jax(tb)
    check(jptr(jb2.data) == jptr(jb.data) and jptr(jb2.scale) == jptr(jb.scale), "jax-born round trip pointers", fails)
    return {"key": name, "quant_key": str(key), "layout": str(key.scale.layout), "orig_shape": list(orig_shape),
            "data": f"{tuple(tqa.data.shape)} {tqa.data.dtype}",
            "scale_view": f"{tuple(tqa.scale.shape)} strides {tqa.scale.stride()} {tqa.scale.dtype}",
            "scale_storage": f"{tuple(storage.shape)}", "zero_copy": d0 and s0 and d1 and s1, "jax_born_zero_copy": jb0,
            "ok": not fails, "failures": fails}


# ---- streams, alignment, lifetime, overhead --------------------------------------------------------


def run_streams() -> dict:
    out: dict = {}
    n = 1 << 24
    sleep = getattr(torch.cuda, "_sleep", None)
    # torch -> jax: the producer kernel is still running on a side stream when JAX imports
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t = torch.zeros(n, dtype=torch.float32, device=DEV)
        if sleep is not None:
            sleep(200_000_000)  # ~0.1 s of GPU time before the fill below
        t.fill_(3.0)
        a = to_jax(t)  # exchanges streams with torch's *current* stream (s)
    all3 = bool(jnp.all(a == 3.0))
    out["torch_side_stream_to_jax_ok"] = all3
    out["torch_side_stream_to_jax_min_max"] = [float(jnp.min(a)), float(jnp.max(a))]
    s.synchronize()
    # jax -> torch: a long JAX computation still running when torch imports its result
    # (each step adds 1, so a read before JAX finished would see a smaller value or garbage)
    x = jnp.ones((8192, 8192), jnp.float32)
    y = x
    for _ in range(12):
        y = (y @ x) / 8192.0 + 1.0
    ty = to_torch(y)  # torch's current stream waits for JAX's work
    lo, hi = float(ty.min().item()), float(ty.max().item())
    out["jax_to_torch_pending_compute_ok"] = lo == hi == 13.0
    out["jax_to_torch_pending_compute_min_max"] = [lo, hi]
    out["ok"] = out["torch_side_stream_to_jax_ok"] and out["jax_to_torch_pending_compute_ok"]
    out["used_torch_cuda_sleep"] = sleep is not None
    return out


def run_unaligned() -> dict:
    import warnings

    buf = torch.arange(4096, dtype=torch.int32, device=DEV).to(torch.uint8)
    t = buf[1:]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = to_jax(t)
    copied = jptr(a) != tptr(t)
    return {"offset_bytes": 1, "zero_copy": not copied, "warned": any(issubclass(x.category, BridgeCopyWarning) for x in w),
            "bits_equal": jbytes(a) == tbytes(t), "ok": jbytes(a) == tbytes(t)}


def run_lifetime() -> dict:
    t = torch.arange(1 << 20, dtype=torch.float32, device=DEV)
    a = to_jax(t)
    del t
    gc.collect()
    torch.cuda.empty_cache()
    junk = [torch.full((1 << 20,), 7.0, device=DEV) for _ in range(32)]
    ok1 = bool(np.array_equal(np.asarray(a), np.arange(1 << 20, dtype=np.float32)))
    b = jnp.arange(1 << 20, dtype=jnp.float32)
    tb = to_torch(b)
    del b
    gc.collect()
    junk += [jnp.full((1 << 20,), 7.0).block_until_ready() for _ in range(32)]
    ok2 = bool(np.array_equal(tb.cpu().numpy(), np.arange(1 << 20, dtype=np.float32)))
    del junk
    return {"torch_source_deleted_ok": ok1, "jax_source_deleted_ok": ok2, "ok": ok1 and ok2}


def _time_us(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            fn()
        samples.append((time.perf_counter() - t0) / (n // 5) * 1e6)
    return statistics.median(samples)


def run_overhead(gen) -> dict:
    t = random_tensor((4096, 4096), "float8_e4m3fn", gen)
    a = to_jax(t)
    qa = torch_qa(K.kFp8Dynamic128Sym.with_layout("col_major_tma"), (4096, 4096), gen)
    jqa = to_jax(qa)
    return {
        "raw_jax_from_dlpack_us": _time_us(lambda: jax.dlpack.from_dlpack(t)),
        "to_jax_tensor_us": _time_us(lambda: to_jax(t)),
        "raw_torch_from_dlpack_us": _time_us(lambda: torch.from_dlpack(a)),
        "to_torch_array_us": _time_us(lambda: to_torch(a)),
        "to_jax_qa_us": _time_us(lambda: to_jax(qa), 500),
        "to_torch_qa_us": _time_us(lambda: to_torch(jqa), 500),
        "to_jax_qa_novalidate_us": _time_us(lambda: to_jax(qa, validate=False), 500),
    }


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="path of the JSON report")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        jax.devices("gpu")
    except RuntimeError as e:
        print(f"jax has no GPU backend: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=DEV)
    gen.manual_seed(args.seed)
    report: dict = {
        "env": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": _jaxlib_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(0), "jax_devices": [str(d) for d in jax.devices()]},
        "dtypes": [], "qa": [],
    }

    def guarded(fn, *a, label):
        try:
            return fn(*a)
        except Exception as e:  # record, keep going
            return {label[0]: label[1], "ok": False, "failures": [f"{type(e).__name__}: {e}"],
                    "traceback": traceback.format_exc()}

    for dt in BRIDGE_DTYPES:
        report["dtypes"].append(guarded(run_dtype, dt, gen, label=("dtype", dt)))
    for name, key in QA_KEYS.items():
        report["qa"].append(guarded(run_qa, name, key, gen, label=("key", name)))
    report["streams"] = guarded(run_streams, label=("check", "streams"))
    report["unaligned"] = guarded(run_unaligned, label=("check", "unaligned"))
    report["lifetime"] = guarded(run_lifetime, label=("check", "lifetime"))
    try:
        report["overhead"] = run_overhead(gen)
    except Exception as e:
        report["overhead"] = {"error": f"{type(e).__name__}: {e}"}

    print(f"DLPack bridge on {report['env']['device']}: jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'dtype':<16} {'t->j 0-copy':>11} {'j->t 0-copy':>11} {'jax-born':>9} {'transp.':>8} {'bits':>5}  status")
    for r in report["dtypes"]:
        yn = lambda k: "yes" if r.get(k) else "NO"  # noqa: E731
        print(f"{r['dtype']:<16} {yn('torch_to_jax_zero_copy'):>11} {yn('jax_to_torch_zero_copy'):>11} "
              f"{yn('jax_born_zero_copy'):>9} {yn('transposed_zero_copy'):>8} {yn('bits_equal'):>5}  "
              f"{'ok' if r['ok'] else 'FAIL ' + '; '.join(r['failures'])}")
    print()
    print(f"{'activation':<24} {'layout':<15} {'scale view (torch)':<42} {'0-copy':>6}  status")
    for r in report["qa"]:
        print(f"{r['key']:<24} {r.get('layout', '?'):<15} {r.get('scale_view', '?'):<42} "
              f"{'yes' if r.get('zero_copy') else 'NO':>6}  {'ok' if r['ok'] else 'FAIL ' + '; '.join(r['failures'])}")
    print()
    for k in ("streams", "unaligned", "lifetime"):
        print(f"{k:<10} {json.dumps({kk: v for kk, v in report[k].items() if kk != 'traceback'})}")
    print(f"overhead   {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in report['overhead'].items()})}")

    ok = all(r["ok"] for r in report["dtypes"] + report["qa"]) and all(
        report[k]["ok"] for k in ("streams", "unaligned", "lifetime"))
    report["ok"] = ok
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"\n{'ALL OK' if ok else 'FAILURES'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
