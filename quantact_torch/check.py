"""Cross-framework equivalence check: the Pallas kernels (run through :mod:`quantact_torch.ops` on
torch tensors) against the PyTorch reference (:mod:`quantact_torch.reference`), bit for bit.

For every key the producers support (optionally in every scale layout) and every fused op (plain
quant, RMSNorm, residual add + RMSNorm, SiLU-and-mul), :func:`run_check` quantizes seeded random
inputs both ways and compares the bytes of the codes, of the scale *storage* and of the residual
output. ``quantact check`` prints the rows as a table and exits nonzero on any mismatch.

One documented exception (NUMERICS.md, ``tests/test_reference_equivalence.py``): SiLU uses ``exp``,
which XLA, libdevice and torch round differently in the last bit, so a SiLU row that is not
bit-exact passes as ``exp-ulp`` when every difference is that rounding: at most 1% of codes, each
one code step apart with the same sign; f32 scales within 2**-19 relative (power-of-two scales one
binade, e4m3/e8m0 scale bytes one step). Everything else must be bit-exact.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from interop.keys import ALL_KEYS, QuantFormat, QuantKey, ScaleDesc
from interop.layout import scale_storage_shape
from quantact_torch import ops
from quantact_torch import reference as ref

#: The producer ops checked: plain quant, RMSNorm, residual add + RMSNorm, SiLU-and-mul.
OPS = ("quant", "rms", "rms+res", "silu")
EXP_CODE_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class Case:
    """One producer op with one key (``label`` names the key: constant name and non-default layout)."""

    op: str
    label: str
    key: QuantKey


@dataclasses.dataclass(frozen=True)
class Row:
    """Outcome of one :class:`Case`: differing bytes of data / scale storage / residual, and the verdict
    (``bit-exact``, ``exp-ulp`` (SiLU within the exp bound), ``MISMATCH``, or ``ERROR: ...``)."""

    op: str
    label: str
    shape: tuple[int, ...]
    dtype: str
    data: str
    scale: str
    residual: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status in ("bit-exact", "exp-ulp")


def key_variants(layouts: bool = False) -> list[tuple[str, QuantKey]]:
    """Every named key; with ``layouts`` also each other scale layout the producers write
    (column-major, TMA-aligned, packed UE8M0, UE8M0 rounding for 64/128 groups; row-major for the
    swizzled block formats)."""
    out = []
    for name, key in ALL_KEYS.items():
        out.append((name, key))
        if not layouts:
            continue
        if key.group_size in (64, 128):
            for lay in ("col_major", "col_major_tma", "packed_ue8m0"):
                out.append((f"{name}[{lay}]", key.with_layout(lay)))
            out.append((f"{name}[ue8m0]", key.with_layout("row_major", ue8m0=True)))
        elif key.group_size in (16, 32):
            out.append((f"{name}[row_major]", key.with_layout("row_major")))
    return out


def supports(op: str, key: QuantKey) -> bool:
    """Whether the Pallas producers implement ``op`` for ``key`` (static NVFP4/MX block scales: plain quant only)."""
    return op == "quant" or not (key.scale.static and key.format in (QuantFormat.NVFP4, QuantFormat.MXFP8,
                                                                       QuantFormat.MXFP4))


def cases(keys: Iterable[str] | None = None, op_names: Sequence[str] = OPS, layouts: bool = False) -> list[Case]:
    """The (op, key) pairs to check; ``keys`` filters by constant name (``kFp8DynamicTokenSym``)."""
    wanted = None if keys is None else set(keys)
    if wanted is not None and wanted - set(ALL_KEYS):
        raise ValueError(f"unknown keys {sorted(wanted - set(ALL_KEYS))}; known: {', '.join(ALL_KEYS)}")
    if set(op_names) - set(OPS):
        raise ValueError(f"unknown ops {sorted(set(op_names) - set(OPS))}; known: {', '.join(OPS)}")
    return [Case(op, label, key) for label, key in key_variants(layouts)
            if wanted is None or label.split("[")[0] in wanted for op in op_names if supports(op, key)]


# ---------------------------------------------------------------- inputs
def make_inputs(case: Case, m: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Seeded inputs on the CPU: x (``[m, 2k]`` for SiLU), RMSNorm weight and residual, and the key's
    scale arguments (static scales, NVFP4 global scale). Rows have log-uniform magnitudes; row 0 holds
    values near and beyond the fp8 range, row 1 (when m > 2) is all zeros."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}|{case.op}|{case.label}|{m}x{k}|{dtype}".encode()))
    width = 2 * k if case.op == "silu" else k
    x = rng.standard_normal((m, width)) * 2.0 ** rng.uniform(-2, 2, (m, 1))
    x[0, :4] = [300.0, -460.0, 1000.0, 1e-3]
    if m > 2:
        x[1] = 0.0

    def t(a, dt=dtype):  # torch.empty is 64-byte aligned (torch.tensor(ndarray) need not be): zero-copy on CPU
        return torch.empty(np.shape(a), dtype=dt).copy_(torch.from_numpy(np.asarray(a, np.float32)))

    xt, w, res = t(x), t(rng.uniform(0.5, 1.5, k)), t(rng.standard_normal((m, k)))
    key, kw = case.key, {}
    amax = float(xt.float().abs().max())
    if key.format == QuantFormat.NVFP4:
        kw["global_scale"] = torch.tensor(448.0 * 6.0 / amax, dtype=torch.float32)
    if key.scale.static:
        if key.format in (QuantFormat.FP8, QuantFormat.INT8):
            base = 4.0 / (448.0 if key.format == QuantFormat.FP8 else 127.0)
            shape = scale_storage_shape(key.scale, m, k)
            kw["scale"] = t(base * rng.uniform(0.3, 3.0, shape), torch.float32)
        else:  # block scales: those a dynamic quantization of other data produces, in the same layout
            dyn = QuantKey(key.dtype, ScaleDesc(key.scale.dtype, False, key.scale.group_shape, key.scale.layout),
                           key.scale2)
            other = t(rng.standard_normal((m, k)), torch.float32)
            kw["scale"] = ref.quantize(other, dyn, global_scale=kw.get("global_scale")).scale_storage()
    return xt, w, res, kw


def run_op(mod, op: str, key: QuantKey, x, w, res, kw):
    """``(activation, residual_out)`` of ``op`` from ``mod`` (:mod:`quantact_torch.ops` or the reference)."""
    if op == "quant":
        return mod.quantize(x, key, **kw), None
    if op == "silu":
        return mod.silu_and_mul_quant(x, key, **kw), None
    return mod.rms_norm_quant(x, w, key, residual=res if op == "rms+res" else None, **kw)


# ---------------------------------------------------------------- comparison
def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def _describe(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    n = int((a != b).sum())
    return "=" if n == 0 else f"{n}/{a.size} bytes"


def _code_steps(data: torch.Tensor, key: QuantKey) -> np.ndarray:
    """Signed code indices (adjacent codes of one sign differ by one)."""
    b = _bytes(data).astype(np.int64)
    if key.format == QuantFormat.INT8:
        return b.astype(np.uint8).view(np.int8).astype(np.int64)
    if key.is_fp4:
        b = np.stack([b & 0xF, b >> 4], -1).reshape(-1)
        return np.where(b & 8, -(b & 7), b & 7)
    return np.where(b & 0x80, -(b & 0x7F), b & 0x7F)


def _within_exp_bound(got, want, key: QuantKey) -> bool:
    """SiLU's exp rounding only: see the module docstring."""
    cg, cw = _code_steps(got.data, key), _code_steps(want.data, key)
    diff = cg != cw
    if diff.mean() > EXP_CODE_FRACTION or (np.abs(cg - cw)[diff] > 1).any() or (cg[diff] * cw[diff] < 0).any():
        return False
    sg, sw = got.scale_storage().cpu().contiguous(), want.scale_storage().contiguous()
    if sg.dtype == torch.float32:  # UE8M0 rounding: one binade either way; else 2**-19 relative
        a, b = sg.numpy().astype(np.float64), sw.numpy().astype(np.float64)
        return bool(np.all(np.abs(a - b) <= (1.0 if key.scale.ue8m0 else 2.0 ** -19) * np.abs(b)))
    return bool(np.all(np.abs(_bytes(sg).astype(np.int64) - _bytes(sw).astype(np.int64)) <= 1))  # byte codes


def run_case(case: Case, *, m: int = 37, k: int = 384, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
             device: str | torch.device = "cpu") -> Row:
    """Run ``case`` through the Pallas kernel (on ``device``) and the torch reference (on the CPU)."""
    x, w, res, kw = make_inputs(case, m, k, dtype, seed)
    head = (case.op, case.label, tuple(x.shape), str(dtype).removeprefix("torch."))
    want, want_res = run_op(ref, case.op, case.key, x, w, res, kw)
    try:
        on = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        got, got_res = run_op(ops, case.op, case.key, on(x), on(w), on(res), {n: on(v) for n, v in kw.items()})
    except Exception as e:  # noqa: BLE001 -- a failing kernel is a row of the table, not the end of the check
        return Row(*head, "-", "-", "-", f"ERROR: {type(e).__name__}: {e}"[:200])
    data = _describe(_bytes(got.data), _bytes(want.data))
    scale = _describe(_bytes(got.scale_storage()), _bytes(want.scale_storage()))
    resid = "-" if want_res is None else _describe(_bytes(got_res), _bytes(want_res))
    if data == scale == "=" and resid in ("=", "-"):
        status = "bit-exact"
    elif case.op == "silu" and _within_exp_bound(got, want, case.key):
        status = "exp-ulp"
    else:
        status = "MISMATCH"
    return Row(*head, data, scale, resid, status)


def run_check(*, keys: Iterable[str] | None = None, op_names: Sequence[str] = OPS, layouts: bool = False,
              m: int = 37, k: int = 384, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
              device: str | torch.device = "cpu") -> list[Row]:
    """:func:`run_case` for every case of :func:`cases`; the rows, in order."""
    return [run_case(c, m=m, k=k, dtype=dtype, seed=seed, device=device)
            for c in cases(keys, op_names, layouts)]


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table with a summary line."""
    head = ("op", "key", "input", "data", "scale", "residual", "status")
    body = [(r.op, r.label, f"{'x'.join(map(str, r.shape))} {r.dtype}", r.data, r.scale, r.residual, r.status)
            for r in rows]
    width = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(n) for c, n in zip(line, width)).rstrip() for line in (head, *body)]
    lines.insert(1, "  ".join("-" * n for n in width))
    bad = sum(not r.ok for r in rows)
    exp = sum(r.status == "exp-ulp" for r in rows)
    lines.append(f"\n{len(rows)} cases: {len(rows) - bad - exp} bit-exact, {exp} within SiLU's exp rounding, "
                 f"{bad} mismatched")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``quantact check``: print the table for the parsed arguments; 1 on any mismatch, 2 for a CUDA
    device that is not there."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("quantact check: --device cuda but torch sees no CUDA device")
        return 2
    keys = args.keys.split(",") if args.keys else None
    rows = run_check(keys=keys, op_names=tuple(args.ops.split(",")), layouts=args.layouts, m=args.m, k=args.k,
                     dtype=getattr(torch, args.dtype), seed=args.seed, device=device)
    kernels = "compiled Pallas" if device.startswith("cuda") else "Pallas interpret mode"
    print(f"quantact check: quantact_torch.ops ({kernels} on {device}) vs quantact_torch.reference (CPU), "
          f"seed {args.seed}\n")
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


__all__ = [
    "OPS",
    "Case",
    "Row",
    "cases",
    "format_table",
    "key_variants",
    "make_inputs",
    "run_case",
    "run_check",
    "run_cli",
    "run_op",
    "supports",
]
