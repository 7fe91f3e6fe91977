"""The torch-facing ops (``quantact_torch.ops``): Pallas kernels on torch tensors through DLPack.

- every key x fused op agrees bit for bit with the torch reference (``quantact_torch.check``; SiLU
  within its documented exp rounding), on CPU (interpret mode) and, marked ``gpu``, on CUDA;
- the mixed-framework paths (torch producer -> JAX consumer, JAX producer -> torch consumer) agree
  with the single-framework ones and keep the key check on both sides;
- the custom ops trace under ``torch.compile`` (fake implementations, ``opcheck``);
- bad inputs fail before any kernel with a clear, typed error;
- zero copies (pointer equality across the bridge), and on a GPU: stream ordering without host
  synchronisation, CUDA graph capture refused.
"""

from __future__ import annotations

import functools
import gc
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interop import bridge, cli
from interop.bridge import to_jax, to_torch
from interop.errors import BridgeError, QuantKeyMismatchError, QuantLayoutError
from interop.keys import (
    ALL_KEYS,
    GroupShape,
    InputQuantScales,
    QuantFormat,
    QuantKey,
    ScaleDesc,
    ScaleLayout,
    kFp8Dynamic128Sym,
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8StaticTensorSym,
    kNvfp4Dynamic,
    parse_quant_key,
)
from interop.layers import expose_input_quant_key
from quantact_jax import consumers as C
from quantact_jax import producers as P
from quantact_jax import reference as jr
from quantact_jax.activation import as_quantized_activation as jax_check_key
from quantact_torch import check, ops
from quantact_torch import reference as tr
from quantact_torch.activation import as_quantized_activation as torch_check_key

CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
M, K, N = 37, 384, 64  # odd M, K = 3 groups of 128 (not a power of two)
#: activation keys the Pallas consumer takes (the others go through the reference consumers)
COL128 = kFp8Dynamic128Sym.with_layout("col_major")  # keys are constants: build them outside compiled code
PALLAS_MM_KEYS = (kFp8StaticTensorSym, kFp8DynamicTensorSym, ALL_KEYS["kFp8StaticTokenSym"], kFp8DynamicTokenSym,
                  kFp8Dynamic128Sym)


def raw(t) -> np.ndarray:
    """Bytes of a torch tensor or JAX array in logical order."""
    if isinstance(t, torch.Tensor):
        return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(np.asarray(t)).reshape(-1).view(np.uint8)


def same_activation(a, b) -> None:
    """Same key, shape, dtype, data bytes and scale-storage bytes (torch or JAX activations)."""
    sa = a.scale_storage() if hasattr(a, "scale_storage") else a.scale
    sb = b.scale_storage() if hasattr(b, "scale_storage") else b.scale
    assert a.quant_key == b.quant_key and tuple(a.orig_shape) == tuple(b.orig_shape)
    np.testing.assert_array_equal(raw(a.data), raw(b.data))
    np.testing.assert_array_equal(raw(sa), raw(sb))


def inputs(op: str, key: QuantKey, device="cpu", m=M, k=K, dtype=torch.bfloat16):
    x, w, res, kw = check.make_inputs(check.Case(op, "t", key), m, k, dtype)
    to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
    return to(x), to(w), to(res), {n: to(v) for n, v in kw.items()}


def fp8_weight(n: int, k: int, key: QuantKey, seed: int = 1, device="cpu"):
    """A random fp8 weight [N, K] with the weight scale the consumer pairs with ``key``."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 8).to(torch.float8_e4m3fn)
    shape = ((n + 127) // 128, (k + 127) // 128) if key.group_size == 128 else (1,)
    ws = torch.rand(shape, generator=g) * 0.01 + 0.005
    return w.to(device), ws.to(device)


# ---------------------------------------------------------------- bit for bit vs the torch reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", check.cases(op_names=("quant", "rms+res", "silu")), ids=lambda c: f"{c.op}-{c.label}")
def test_ops_match_torch_reference(case, device):
    """Every key x op (RMSNorm with the residual: without it is the same kernel minus the add, which
    ``quantact check`` and tests/test_producers.py cover)."""
    row = check.run_case(case, device=device)
    assert row.ok, row


@pytest.mark.parametrize("case", [c for c in check.cases(op_names=("quant",), layouts=True) if "[" in c.label],
                         ids=lambda c: c.label)
def test_layout_variants_match_reference(case):
    """Every other scale layout: same storage bytes, and the torch scale is vLLM's (strided) view."""
    assert check.run_case(case).ok
    x, _, _, kw = inputs("quant", case.key)
    got, want = ops.quantize(x, case.key, **kw), tr.quantize(x, case.key, **kw)
    assert got.scale.shape == want.scale.shape and got.scale.stride() == want.scale.stride()
    got.validate()


def test_batch_dims_and_rows_crossing_the_swizzle_tile():
    """Leading batch dims (M = 2 x 65 = 130 rows, across the 128-row swizzle tile), fp16 and f32."""
    for key, dtype in ((kNvfp4Dynamic, torch.float16), (kFp8Dynamic128Sym.with_layout("col_major_tma"), torch.float32)):
        x, w, res, kw = inputs("rms+res", key, m=130, k=256, dtype=dtype)
        x, res = x.reshape(2, 65, 256), res.reshape(2, 65, 256)
        (got, got_r), (want, want_r) = (mod.rms_norm_quant(x, w, key, residual=res, **kw) for mod in (ops, tr))
        same_activation(got, want)
        assert got.data.shape == (2, 65, 128 if key.is_fp4 else 256) and got_r.shape == x.shape
        np.testing.assert_array_equal(raw(got_r), raw(want_r))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), groups=st.integers(1, 3), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       key=st.sampled_from([kFp8DynamicTokenSym, kFp8Dynamic128Sym, kFp8DynamicTensorSym]),
       seed=st.integers(0, 2**16))
def test_random_shapes_property(m, groups, dtype, key, seed):
    case = check.Case("quant", "p", key)
    assert check.run_case(case, m=m, k=128 * groups, dtype=dtype, seed=seed).ok


# ---------------------------------------------------------------- mixed-framework paths
def _consume_torch(qa, key, w, ws, gs):
    """Torch consumer: the Pallas consumer through ops.scaled_mm, else the torch reference (after its key check)."""
    if key in PALLAS_MM_KEYS:
        return ops.scaled_mm(qa, w, ws, input_quant_key=key)
    return tr.scaled_mm(torch_check_key(qa, key), w, ws.reshape(1), kFp8StaticTensorSym, global_scale_a=gs)


def on_cpu(a) -> bool:
    """Whether JAX array ``a`` lives on the CPU: its Pallas kernels must then run in interpret mode. The
    JAX ops' default follows ``jax.default_backend()``, which is the GPU on a GPU host even for the CPU
    arrays these tests import from CPU tensors (what ``ops`` does itself: interpret iff the tensor is on CPU)."""
    return all(d.platform == "cpu" for d in a.devices())


@functools.partial(jax.jit, static_argnums=(1, 5))
def _consume_jax(qa, key, w, ws, gs, interpret):
    """JAX consumer (jitted: the mixed and the single-framework call share one executable)."""
    if key in PALLAS_MM_KEYS:
        return C.scaled_mm(qa, w, ws, input_quant_key=key, interpret=interpret)
    return jr.scaled_mm(jax_check_key(qa, key), w, ws.reshape(1), kFp8StaticTensorSym, global_scale_a=gs)


@pytest.mark.parametrize("name", list(ALL_KEYS))
def test_mixed_framework_paths(name):
    """torch producer -> JAX consumer equals JAX -> JAX; JAX producer -> torch consumer equals torch -> torch;
    the activations themselves cross bit-identical (and the torch one is the Pallas kernel's)."""
    key = ALL_KEYS[name]
    x, _, _, kw = inputs("quant", key)
    gs = kw.get("global_scale")
    w, ws = fp8_weight(N, K, key)
    tqa = ops.quantize(x, key, **kw)  # torch producer (Pallas through DLPack)
    xj = to_jax(x)
    jqa = P.quantize(xj, key, **{n: to_jax(v) for n, v in kw.items()}, interpret=on_cpu(xj))  # JAX producer
    same_activation(to_jax(tqa), jqa)
    same_activation(to_torch(jqa), tqa)
    same_activation(tqa, tr.quantize(x, key, **kw))  # and both are the reference's bits
    wj, wsj, gsj = to_jax(w), to_jax(ws), None if gs is None else to_jax(gs)
    np.testing.assert_array_equal(raw(_consume_jax(to_jax(tqa), key, wj, wsj, gsj, on_cpu(wj))),
                                  raw(_consume_jax(jqa, key, wj, wsj, gsj, on_cpu(wj))))
    np.testing.assert_array_equal(raw(_consume_torch(to_torch(jqa), key, w, ws, gs)),
                                  raw(_consume_torch(tqa, key, w, ws, gs)))


def test_wrongly_routed_activation_fails_on_both_sides():
    x = inputs("quant", kFp8DynamicTokenSym)[0]
    w, ws = fp8_weight(N, K, kFp8DynamicTokenSym)
    tqa = ops.quantize(x, kFp8DynamicTokenSym)
    jqa, xj = to_jax(tqa), to_jax(x)
    interpret = on_cpu(xj)
    for wrong in (kFp8DynamicTensorSym, kFp8Dynamic128Sym, ALL_KEYS["kFp8StaticTokenSym"]):
        with pytest.raises(QuantKeyMismatchError, match="expects"):  # torch side, before crossing
            ops.scaled_mm(tqa, w, ws, input_quant_key=wrong)
        with pytest.raises(QuantKeyMismatchError, match="expects"):  # JAX side, after crossing
            C.scaled_mm(jqa, to_jax(w), to_jax(ws), input_quant_key=wrong, interpret=interpret)
        with pytest.raises(QuantKeyMismatchError):  # JAX producer -> torch consumer
            ops.scaled_mm(to_torch(P.quantize(xj, kFp8DynamicTokenSym, interpret=interpret)), w, ws,
                          input_quant_key=wrong)
    # a plain tensor is quantized in the kernel with the consumer's key: the same bits as the two-step path
    np.testing.assert_array_equal(raw(ops.scaled_mm(x, w, ws, input_quant_key=kFp8DynamicTokenSym)),
                                  raw(ops.scaled_mm(tqa, w, ws, input_quant_key=kFp8DynamicTokenSym)))


def test_producer_from_layer_exposed_key_and_scales():
    class Kernel:
        input_quant_key = kFp8StaticTensorSym

        def input_quant_scales(self, layer):
            return InputQuantScales(input_scale=torch.tensor([0.02]))

    class Layer:
        pass

    layer = Layer()
    expose_input_quant_key(layer, Kernel())
    x = inputs("quant", kFp8DynamicTokenSym)[0]
    same_activation(ops.quantize(x, layer=layer), tr.quantize(x, kFp8StaticTensorSym, scale=torch.tensor([0.02])))
    with pytest.raises(QuantLayoutError, match="layer exposes"):
        ops.quantize(x, kFp8DynamicTokenSym, layer=layer)


# ---------------------------------------------------------------- torch.compile, fake implementations
class Block(torch.nn.Module):
    """residual add + RMSNorm -> per-token fp8 -> scaled_mm -> NVFP4; SiLU-and-mul -> column-major group-128 fp8."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.linspace(0.5, 1.5, K, dtype=torch.bfloat16, device=device),
                                       requires_grad=False)
        self.w, self.ws = fp8_weight(N, K, kFp8DynamicTokenSym, device=device)

    def forward(self, x, res):
        qa, res = ops.rms_norm_quant(x, self.norm, kFp8DynamicTokenSym, residual=res)
        y = ops.scaled_mm(qa, self.w, self.ws, input_quant_key=kFp8DynamicTokenSym)
        g = ops.silu_and_mul_quant(torch.cat([x, res], dim=-1), COL128)
        f = ops.quantize(y, kNvfp4Dynamic, global_scale=2.0)
        return torch.relu(y) * 2, res, qa.data, g.data, g.scale, f.data, f.scale


def _compare_compiled(compiled, eager, *args):
    for got, want in zip(compiled(*args), eager(*args), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(raw(got), raw(want))


def test_torch_compile_aot_eager_fullgraph_dynamic_shapes():
    block = Block()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for m in (5, 9):  # the second M recompiles with a symbolic M
        x, res = (torch.randn(m, K, generator=torch.Generator().manual_seed(m + i)).bfloat16() for i in range(2))
        _compare_compiled(compiled, block, x, res)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_inductor(device):
    if device == "cpu" and shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    block = Block(device)
    x, res = (torch.randn(5, K, generator=torch.Generator().manual_seed(i)).bfloat16().to(device) for i in range(2))
    _compare_compiled(torch.compile(block, dynamic=False), block, x, res)


def test_opcheck_every_op():
    """torch.library.opcheck: schema, fake tensors, aot dispatch (static and dynamic)."""
    x, w, res, kw = inputs("rms+res", kNvfp4Dynamic, m=5, k=256)
    gs = kw["global_scale"].reshape(1)
    key = str(kNvfp4Dynamic)
    torch.library.opcheck(torch.ops.quantact.quantize.default, (x, key, None, gs, None))
    torch.library.opcheck(torch.ops.quantact.rms_norm_quant.default, (x, w, key, 1e-6, res, None, gs, None))
    torch.library.opcheck(torch.ops.quantact.silu_and_mul_quant.default, (torch.cat([x, res], -1), key, None, gs, None))
    qa = ops.quantize(x, kFp8DynamicTokenSym)
    wt, ws = fp8_weight(N, 256, kFp8DynamicTokenSym)
    # no test_schema here: torch's schema checker multiplies the fp8 inputs, which CPU fp8 does not implement
    torch.library.opcheck(torch.ops.quantact.scaled_mm.default,
                          (qa.data, qa.scale_storage(), str(kFp8DynamicTokenSym), torch.bfloat16, wt, ws, None, None,
                           None, None), test_utils=("test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("case", check.cases(layouts=True), ids=lambda c: f"{c.op}-{c.label}")
def test_fake_outputs_match_reference_layout(case):
    """On meta tensors the ops run their fake implementations: shapes, dtypes and scale views are the
    reference's for every key, layout and op (what torch.compile traces with)."""
    x, w, res, kw = inputs(case.op, case.key)
    want, want_r = check.run_op(tr, case.op, case.key, x, w, res, kw)
    meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v
    got, got_r = check.run_op(ops, case.op, case.key, meta(x), meta(w), meta(res), {n: meta(v) for n, v in kw.items()})
    assert got.data.device.type == "meta"
    for a, b in ((got.data, want.data), (got.scale, want.scale)) + (((got_r, want_r),) if want_r is not None else ()):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
    assert got.orig_dtype == want.orig_dtype and got.orig_shape == want.orig_shape


# ---------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad():
    x, w, res, _ = inputs("rms+res", kFp8DynamicTokenSym, m=4, k=256)
    wt, ws = fp8_weight(N, 256, kFp8DynamicTokenSym)
    return SimpleNamespace(x=x, w=w, res=res, s=torch.tensor([0.02]), wt=wt, ws=ws,
                           qa=ops.quantize(x, kFp8DynamicTokenSym))


TOK = kFp8DynamicTokenSym
#: what -> (call on the ``bad`` fixture, error type, message pattern)
BAD_CALLS = {
    "non-contiguous": (lambda b: ops.quantize(b.x.t().contiguous().t(), TOK), BridgeError, "contiguous"),
    "strided slice": (lambda b: ops.quantize(b.x[:, ::2], TOK), BridgeError, "contiguous"),
    "weight on another device": (lambda b: ops.rms_norm_quant(b.x, b.w.to("meta"), TOK), BridgeError, "is on meta"),
    "int input": (lambda b: ops.quantize(b.x.to(torch.int32), TOK), QuantLayoutError, "dtype"),
    "f64 input": (lambda b: ops.quantize(b.x.double(), TOK), QuantLayoutError, "dtype"),
    "no rows": (lambda b: ops.quantize(b.x[:0], TOK), QuantLayoutError, "one element"),
    "weight shape": (lambda b: ops.rms_norm_quant(b.x, b.w[:128], TOK), QuantLayoutError, "shape"),
    "residual dtype": (lambda b: ops.rms_norm_quant(b.x, b.w, TOK, residual=b.res.float()), QuantLayoutError,
                       "residual"),
    "key is a string": (lambda b: ops.quantize(b.x, str(TOK)), TypeError, "QuantKey"),
    "no key": (lambda b: ops.quantize(b.x), TypeError, "QuantKey"),
    "K not a multiple of the group": (lambda b: ops.quantize(b.x[:, :192].contiguous(), kFp8Dynamic128Sym),
                                      QuantLayoutError, "multiple"),
    "odd SiLU width": (lambda b: ops.silu_and_mul_quant(b.x[:, :255].contiguous(), TOK), QuantLayoutError, "even"),
    "static key without scale": (lambda b: ops.quantize(b.x, kFp8StaticTensorSym), QuantLayoutError, "static"),
    "static scale shape": (lambda b: ops.quantize(b.x, ALL_KEYS["kFp8StaticTokenSym"], scale=b.s), QuantLayoutError,
                           "shape"),
    "scale for a dynamic key": (lambda b: ops.quantize(b.x, TOK, scale=b.s), QuantLayoutError, "dynamic"),
    "NVFP4 without global scale": (lambda b: ops.quantize(b.x, kNvfp4Dynamic), QuantLayoutError, "global_scale"),
    "global scale for fp8": (lambda b: ops.quantize(b.x, TOK, global_scale=1.0), QuantLayoutError, "global_scale"),
    "key the producers lack": (lambda b: ops.quantize(b.x, QuantKey("int8", ScaleDesc("float32", False, (1, 128)))),
                               QuantLayoutError, "per-token"),
    "weight not fp8": (lambda b: ops.scaled_mm(b.qa, b.wt.float(), b.ws, input_quant_key=TOK), QuantLayoutError,
                       "float8_e4m3fn"),
    "K mismatch": (lambda b: ops.scaled_mm(b.qa, b.wt[:, :128].contiguous(), b.ws, input_quant_key=TOK),
                   QuantLayoutError, "does not match"),
    "consumer key the kernel lacks": (
        lambda b: ops.scaled_mm(b.x, b.wt, b.ws, input_quant_key=ALL_KEYS["kFp8Dynamic64Sym"]), QuantLayoutError,
        "consumer"),
    "raw op with a bad key string": (lambda b: torch.ops.quantact.quantize(b.x, "kFp8Nope", None, None, None),
                                     ValueError, "not a QuantKey"),
}


@pytest.mark.parametrize("what", list(BAD_CALLS))
def test_bad_inputs_raise_clear_errors(what, bad):
    call, err, match = BAD_CALLS[what]
    with pytest.raises(err, match=match):
        call(bad)


@pytest.mark.parametrize("what", list(BAD_CALLS))
def test_bad_inputs_raise_after_good_calls_cached_their_plans(what, bad, monkeypatch):
    """The per-call plans (checks done once per argument metadata) never let a bad call through:
    after good calls of every op with the same key and shapes, each bad call still raises."""
    monkeypatch.setattr(ops, "DIRECT_EAGER", True)
    ops.quantize(bad.x, TOK)
    ops.rms_norm_quant(bad.x, bad.w, TOK, residual=bad.res)
    ops.silu_and_mul_quant(bad.x, TOK)
    ops.scaled_mm(bad.qa, bad.wt, bad.ws, input_quant_key=TOK)
    call, err, match = BAD_CALLS[what]
    with pytest.raises(err, match=match):
        call(bad)


def test_plans_follow_the_metadata_of_the_same_tensor(monkeypatch):
    """A plan is keyed by type, shape, dtype, device and contiguity of every tensor: the same tensor
    object transposed in place (same shape, other strides) or re-typed misses it and is checked."""
    monkeypatch.setattr(ops, "DIRECT_EAGER", True)
    x = torch.randn(128, 128).bfloat16()
    ops.quantize(x, TOK)
    x.t_()  # same object, same shape, now column-major
    with pytest.raises(BridgeError, match="contiguous"):
        ops.quantize(x, TOK)
    with pytest.raises(BridgeError, match="contiguous"):
        torch.ops.quantact.quantize(x, str(TOK), None, None, None)
    x.t_()
    ops.quantize(x, TOK)
    x.data = x.data.to(torch.int32)
    with pytest.raises(QuantLayoutError, match="dtype"):
        ops.quantize(x, TOK)
    # validate() checks each metadata combination once, and a new one again
    qa = ops.quantize(torch.randn(4, 256).bfloat16(), TOK)
    qa.validate()
    qa.data = qa.data[:2]
    with pytest.raises(QuantLayoutError):
        qa.validate()


def test_known_plans_skip_the_wrapper_steps_and_nothing_else(monkeypatch, bad):
    """A plain eager producer call whose key object and argument metadata already have a plan goes
    straight to it (``_known_plan``); anything else (another key object, scales, a layer) takes the
    full path, whose checks and errors stay (the BAD_CALLS after good calls test the errors)."""
    import copy

    monkeypatch.setattr(ops, "DIRECT_EAGER", True)
    want = ops.quantize(bad.x, TOK)
    want_rms = ops.rms_norm_quant(bad.x, bad.w, TOK, residual=bad.res)
    full = []
    resolve = ops._resolve
    monkeypatch.setattr(ops, "_resolve", lambda *a: full.append(a[0]) or resolve(*a))
    got = ops.quantize(bad.x, TOK)
    got_rms = ops.rms_norm_quant(bad.x, bad.w, TOK, residual=bad.res)
    assert full == []
    for a, b in ((got.data, want.data), (got.scale, want.scale), (got_rms[0].data, want_rms[0].data),
                 (got_rms[1], want_rms[1])):
        np.testing.assert_array_equal(raw(a), raw(b))
    ops.rms_norm_quant(bad.x, bad.w, TOK, residual=bad.res, eps=1e-5)  # another eps: another plan
    ops.quantize(bad.x, copy.deepcopy(TOK))  # an equal key, another object
    ops.quantize(bad.x, TOK, scale_ub=torch.tensor([10.0]))
    assert len(full) == 3


def test_scaled_mm_known_plans_keep_the_activation_checks(monkeypatch, bad):
    """A ``scaled_mm`` call whose activation object carries the very key object given, with metadata
    a plan already checked, skips ``as_quantized_activation`` and the plan's checks; an activation
    whose fields changed in any way those read (data, scale, orig_shape, orig_dtype, key) takes the
    full path again, with its errors, and an equal key object of another identity gives the same bits."""
    import copy
    import dataclasses

    monkeypatch.setattr(ops, "DIRECT_EAGER", True)
    want = ops.scaled_mm(bad.qa, bad.wt, bad.ws, input_quant_key=TOK)
    ops.scaled_mm(bad.qa, bad.wt, bad.ws, input_quant_key=TOK)  # the second call stores the known plan
    full = []
    check = ops.as_quantized_activation
    monkeypatch.setattr(ops, "as_quantized_activation", lambda *a: full.append(1) or check(*a))
    got = ops.scaled_mm(bad.qa, bad.wt, bad.ws, input_quant_key=TOK)
    assert full == []
    np.testing.assert_array_equal(raw(got), raw(want))
    qa = bad.qa
    with pytest.raises(QuantLayoutError):
        ops.scaled_mm(dataclasses.replace(qa, data=qa.data[:2]), bad.wt, bad.ws, input_quant_key=TOK)
    with pytest.raises(QuantLayoutError):
        ops.scaled_mm(dataclasses.replace(qa, scale=qa.scale[:2]), bad.wt, bad.ws, input_quant_key=TOK)
    with pytest.raises(QuantLayoutError):
        ops.scaled_mm(dataclasses.replace(qa, orig_shape=torch.Size((2, 256))), bad.wt, bad.ws, input_quant_key=TOK)
    with pytest.raises(QuantLayoutError, match="orig_dtype"):
        ops.scaled_mm(dataclasses.replace(qa, orig_dtype=torch.int32), bad.wt, bad.ws, input_quant_key=TOK)
    with pytest.raises(QuantKeyMismatchError):
        ops.scaled_mm(dataclasses.replace(qa, quant_key=kFp8DynamicTensorSym), bad.wt, bad.ws, input_quant_key=TOK)
    with pytest.raises(QuantKeyMismatchError):
        ops.scaled_mm(qa, bad.wt, bad.ws, input_quant_key=kFp8DynamicTensorSym)
    with pytest.raises(QuantLayoutError, match="torch tensors"):
        ops.scaled_mm(dataclasses.replace(qa, data=raw(qa.data)), bad.wt, bad.ws, input_quant_key=TOK)
    n = len(full)
    other = copy.deepcopy(TOK)
    y = ops.scaled_mm(dataclasses.replace(qa, quant_key=other), bad.wt, bad.ws, input_quant_key=other)
    np.testing.assert_array_equal(raw(y), raw(want))
    assert len(full) == n + 1
    y32 = ops.scaled_mm(dataclasses.replace(qa, orig_dtype=torch.float32), bad.wt, bad.ws, input_quant_key=TOK)
    assert y32.dtype == torch.float32


def test_unaligned_cpu_inputs_are_copied_with_a_warning_on_every_path(monkeypatch):
    """A CPU tensor that is not 64-byte aligned cannot be shared with XLA: the lean import refuses it,
    and the call crosses through ``tensors_to_jax`` instead, which copies with a ``BridgeCopyWarning``
    -- on the first call (plan made) and on later calls (known plan) alike, with the aligned bits."""
    monkeypatch.setattr(ops, "DIRECT_EAGER", True)
    x, w, res, _ = inputs("rms+res", TOK, m=4, k=256)
    def unaligned(t):
        buf = torch.empty(t.numel() + 64, dtype=t.dtype)
        u = buf[1:1 + t.numel()].view(t.shape).copy_(t)  # 2 bytes past an aligned start
        assert u.data_ptr() % 64
        return u

    ux, ures = unaligned(x), unaligned(res)
    want = ops.quantize(x, TOK)
    want_rms = ops.rms_norm_quant(x, w, TOK, residual=res)
    for _ in range(3):
        with pytest.warns(bridge.BridgeCopyWarning):
            same_activation(ops.quantize(ux, TOK), want)
        with pytest.warns(bridge.BridgeCopyWarning):
            qa, r = ops.rms_norm_quant(x, w, TOK, residual=ures)
        same_activation(qa, want_rms[0])
        np.testing.assert_array_equal(raw(r), raw(want_rms[1]))


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ops, "PLAN_CACHE_SIZE", 3)
    ops.clear_plan_cache()
    for m in range(1, 9):
        ops.quantize(torch.randn(m, 128).bfloat16(), TOK)
        assert len(ops._plans) <= 3
    ops.clear_plan_cache()


def test_run_refuses_capture_and_switches_device_with_mocked_cuda(monkeypatch):
    """The CUDA branch of a call, with torch's CUDA entry points mocked (runs on CPU): CUDA graph
    capture is refused, and on another current device the call runs under ``torch.cuda.device``
    of the input's."""
    plan = ops._Plan(None, 1, torch.device("cpu"), (), ())
    seen = []
    fake = SimpleNamespace(_cuda_getDevice=lambda: 1, _cuda_isCurrentStreamCapturing=lambda: True)
    monkeypatch.setattr(ops, "_C", fake)
    monkeypatch.setattr(ops, "_call", lambda p, x, a: seen.append("call") or ("out",))
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        ops._run(plan, None, ())
    assert seen == []
    fake._cuda_isCurrentStreamCapturing = lambda: False
    assert ops._run(plan, None, ()) == ("out",)

    class Device:
        def __init__(self, index):
            seen.append(("device", index))

        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Device)
    fake._cuda_getDevice = lambda: 0
    assert ops._run(plan, None, ()) == ("out",)
    assert seen == ["call", ("device", 1), "enter", "call", "exit"]


# ---------------------------------------------------------------- the key string through the op schema
LAYOUTS = {
    1: [ScaleLayout.ROW_MAJOR],
    64: [ScaleLayout.ROW_MAJOR, ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA, ScaleLayout.PACKED_UE8M0],
}


@st.composite
def keys(draw):
    fmt = draw(st.sampled_from(list(QuantFormat)))
    static, sym = draw(st.booleans()), draw(st.booleans())
    if fmt in (QuantFormat.NVFP4, QuantFormat.MXFP8, QuantFormat.MXFP4):
        g = 16 if fmt == QuantFormat.NVFP4 else 32
        sdt = "float8_e4m3fn" if fmt == QuantFormat.NVFP4 else "float8_e8m0fnu"
        lay = draw(st.sampled_from([ScaleLayout.SWIZZLED_128x4, ScaleLayout.ROW_MAJOR]))
        scale = ScaleDesc(sdt, static, (1, g), lay)
        dtype = "uint8" if fmt != QuantFormat.MXFP8 else "float8_e4m3fn"
        s2 = ScaleDesc("float32", True, (-1, -1)) if fmt == QuantFormat.NVFP4 else None
        return QuantKey(dtype, scale, s2, sym)
    gs = draw(st.sampled_from([(-1, -1), (1, -1), (-1, 1), (1, 64), (1, 128), (128, 128)]))
    per_group = GroupShape(*gs).is_per_group()
    lay = draw(st.sampled_from(LAYOUTS[64] if per_group else LAYOUTS[1]))
    ue8m0 = draw(st.booleans()) if per_group else False
    dtype = "int8" if fmt == QuantFormat.INT8 else "float8_e4m3fn"
    return QuantKey(dtype, ScaleDesc("float32", static, gs, lay, ue8m0), None, sym)


@settings(max_examples=200, deadline=None)
@given(keys())
def test_parse_quant_key_round_trip(key):
    assert parse_quant_key(str(key)) == key
    assert ops._key_str(key) == str(key) == ops._key_str(key)  # eager: computed once, then looked up
    fields = (*ops._scale_fields(key.scale), *ops._scale_fields(key.scale2))
    assert ops._key_str_of(key.dtype, key.symmetric, *fields) == str(key)  # the compile-safe str


def test_parse_quant_key_names_and_errors():
    assert all(parse_quant_key(n) is k for n, k in ALL_KEYS.items())
    for text in ("", "kFp8", str(kFp8Dynamic128Sym)[:-1], str(kFp8Dynamic128Sym).replace("128))", "128),row_major)")):
        with pytest.raises(ValueError):
            parse_quant_key(text)


# ---------------------------------------------------------------- zero copies
@pytest.fixture(params=["lean", "public"])
def dlpack_path(request):
    """Run a test through the lean DLPack path (jaxlib's calls directly) and through the public one."""
    prev = bridge.set_lean_dlpack(request.param == "lean")
    ops.clear_view_cache()
    yield request.param
    bridge.set_lean_dlpack(prev)
    ops.clear_view_cache()


def _record_crossings(monkeypatch, device: torch.device) -> list:
    """Wrap the ops' bridge calls; returns the list of (source pointer, result pointer, shape) per tensor.

    Where the lean DLPack path is verified for ``device`` the ops make its calls themselves (and the
    bridge's own lean path makes the same ones), so the lean API is wrapped: every tensor -> capsule
    -> array import and array -> capsule -> tensor export is recorded. Otherwise (the public path)
    the ops' ``tensors_to_jax`` / ``arrays_to_torch`` are wrapped.

    ``device`` must be the tensors' own device (``x.device``): the ops look their endpoint up by it.
    An index-less ``torch.device("cuda")`` is another dictionary key (``cuda != cuda:0``) whose probe
    fails (the stream calls need an index), so probing it wraps the public path while the ops, once
    their first call has probed ``cuda:0``, cross through the lean API unrecorded. Callers check the
    number of crossings, so a path the recorder misses fails the test."""
    assert isinstance(device, torch.device) and (device.type != "cuda" or device.index is not None), device
    crossings = []
    if bridge._endpoint(device) is not None:  # probe first: the probe's own crossings are not the ops'
        imp, exp, t2d, d2t = bridge.lean_api()
        pending_in, pending_out = [], []

        def t2d_rec(t):
            pending_in.append((t.data_ptr(), tuple(t.shape)))
            return t2d(t)

        def imp_rec(cap, *a, **kw):
            out = imp(cap, *a, **kw)
            src, shape = pending_in.pop()
            crossings.append((src, out.unsafe_buffer_pointer(), shape))
            return out

        def exp_rec(a, *args, **kw):
            pending_out.append((a.unsafe_buffer_pointer(), tuple(a.shape)))
            return exp(a, *args, **kw)

        def d2t_rec(cap):
            out = d2t(cap)
            src, shape = pending_out.pop()
            crossings.append((src, out.data_ptr(), shape))
            return out

        monkeypatch.setitem(bridge._lean_state, "api", bridge._LeanAPI(imp_rec, exp_rec, t2d_rec, d2t_rec))
        return crossings

    def rec(fn, src_ptr, dst_ptr):
        def wrapped(vs, **kw):
            out = fn(vs, **kw)
            crossings.extend((src_ptr(v), dst_ptr(o), tuple(v.shape)) for v, o in zip(vs, out) if v is not None)
            return out
        return wrapped

    jptr = lambda a: a.unsafe_buffer_pointer()
    tptr = lambda t: t.data_ptr()
    monkeypatch.setattr(ops, "tensors_to_jax", rec(bridge.tensors_to_jax, tptr, jptr))
    monkeypatch.setattr(ops, "arrays_to_torch", rec(bridge.arrays_to_torch, jptr, tptr))
    return crossings


@pytest.mark.parametrize("device", DEVICES)
def test_zero_copy_pointer_equality(device, dlpack_path, monkeypatch):
    """Every tensor crossing into the kernel and every output crossing back keeps its buffer pointer,
    the activation's data/scale and ``scaled_mm``'s output are the kernel's output buffers, and no
    crossing goes unrecorded (counted per call), on the full and the known-plan ``scaled_mm`` path."""
    x, w, res, kw = inputs("rms+res", kNvfp4Dynamic, device=device)
    wt, ws = fp8_weight(N, K, kFp8DynamicTokenSym, device=device)
    crossings = _record_crossings(monkeypatch, x.device)
    # the "lean" run records the lean path (else both runs would test the public one)
    assert bridge.lean_dlpack_status()["devices"][str(x.device)] is (dlpack_path == "lean")
    qa, r = ops.rms_norm_quant(x, w, kNvfp4Dynamic, residual=res, **kw)
    assert len(crossings) == 4 + 3  # x, weight, residual, global scale in; data, scale, residual out
    assert all(a == b for a, b, _ in crossings), crossings
    outs = [c[1] for c in crossings[-3:]]
    assert [qa.data.data_ptr(), qa.scale.data_ptr(), r.data_ptr()] == outs
    full = []
    check = ops.as_quantized_activation
    monkeypatch.setattr(ops, "as_quantized_activation", lambda *a: full.append(1) or check(*a))
    for call in range(2):  # the second call takes the known-plan path (_mm_known_plan), and reuses the weight views
        n0, f0 = len(crossings), len(full)
        q8 = ops.quantize(x, kFp8DynamicTokenSym)
        assert len(crossings) == n0 + 1 + 2, crossings[n0:]  # x in; data, scale out
        assert [q8.data.data_ptr(), q8.scale_storage().data_ptr()] == [c[1] for c in crossings[-2:]]
        n1 = len(crossings)
        y = ops.scaled_mm(q8, wt, ws, input_quant_key=kFp8DynamicTokenSym)
        srcs = [q8.data.data_ptr(), q8.scale_storage().data_ptr()] + ([wt.data_ptr(), ws.data_ptr()] if call == 0 else [])
        assert [c[0] for c in crossings[n1:-1]] == srcs, crossings[n1:]  # every input crossed, recorded
        # y crossed last, recorded: the exported JAX buffer's pointer is y's (no copy anywhere after the kernel)
        assert crossings[-1][1:] == (y.data_ptr(), tuple(y.shape)) and len(crossings) == n1 + len(srcs) + 1
        assert call == 0 or len(full) == f0  # the second skipped as_quantized_activation: the known plan ran
    assert all(a == b for a, b, _ in crossings), crossings


@pytest.mark.parametrize("device", DEVICES)
def test_lean_and_public_dlpack_paths_agree(device):
    """The lean path (jaxlib's DLPack calls, one stream sync per call) gives the public path's bits."""
    x, w, res, kw = inputs("rms+res", kNvfp4Dynamic, device=device)
    wt, ws = fp8_weight(N, K, kFp8DynamicTokenSym, device=device)
    got = {}
    for lean in (True, False):
        prev = bridge.set_lean_dlpack(lean)
        ops.clear_view_cache()
        try:
            qa, r = ops.rms_norm_quant(x, w, kNvfp4Dynamic, residual=res, **kw)
            q8 = ops.silu_and_mul_quant(torch.cat([x, res], -1), kFp8Dynamic128Sym)
            y = ops.scaled_mm(ops.quantize(x, kFp8DynamicTokenSym), wt, ws, input_quant_key=kFp8DynamicTokenSym)
            got[lean] = [raw(t) for t in (qa.data, qa.scale, r, q8.data, q8.scale, y)]
            assert bridge.lean_dlpack_status()["devices"][str(x.device)] is lean
        finally:
            bridge.set_lean_dlpack(prev)
    for a, b in zip(got[True], got[False], strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- eager calls without the dispatcher
def _all_ops(x, w, res, wt, ws):
    qa, r = ops.rms_norm_quant(x, w, kFp8DynamicTokenSym, residual=res)
    q128 = ops.silu_and_mul_quant(torch.cat([x, res], -1), kFp8Dynamic128Sym)
    qs = ops.quantize(x, kFp8StaticTensorSym, scale=0.05)
    y = ops.scaled_mm(qa, wt, ws, input_quant_key=kFp8DynamicTokenSym)
    return [qa.data, qa.scale, r, q128.data, q128.scale, qs.data, qs.scale, y]


def test_direct_eager_calls_match_the_dispatcher(monkeypatch):
    """Plain eager wrappers run the op's implementation directly; the bits are the custom op's."""
    x, w, res, _ = inputs("rms+res", kFp8DynamicTokenSym)
    wt, ws = fp8_weight(N, K, kFp8DynamicTokenSym)
    dispatched = []
    for name in ("_quantize_op", "_rms_norm_quant_op", "_silu_and_mul_quant_op", "_scaled_mm_op"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _op=op, _n=name: dispatched.append(_n) or _op(*a))
    monkeypatch.setattr(ops, "DIRECT_EAGER", True)  # also under QUANTACT_DIRECT_EAGER=0
    direct = _all_ops(x, w, res, wt, ws)
    assert dispatched == []
    monkeypatch.setattr(ops, "DIRECT_EAGER", False)
    via_op = _all_ops(x, w, res, wt, ws)
    assert sorted(dispatched) == ["_quantize_op", "_rms_norm_quant_op", "_scaled_mm_op", "_silu_and_mul_quant_op"]
    for a, b in zip(direct, via_op, strict=True):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
        np.testing.assert_array_equal(raw(a), raw(b))


def test_dispatcher_kept_where_something_must_see_the_op(monkeypatch):
    """Dispatch modes, the profiler and inputs that need a gradient still see ``quantact::*``."""
    monkeypatch.setattr(ops, "DIRECT_EAGER", True)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, res, _ = inputs("rms+res", kFp8DynamicTokenSym)
    wt, ws = fp8_weight(N, K, kFp8DynamicTokenSym)
    with Log() as log:
        _all_ops(x, w, res, wt, ws)
    assert {"quantact.rms_norm_quant.default", "quantact.silu_and_mul_quant.default", "quantact.quantize.default",
            "quantact.scaled_mm.default"} <= set(log.names), log.names
    with torch.profiler.profile() as prof:
        ops.quantize(x, kFp8DynamicTokenSym)
    assert any(e.name == "quantact::quantize" for e in prof.events())
    assert ops._direct(x) and not ops._direct(x, w.clone().requires_grad_())
    with torch.no_grad():
        assert ops._direct(x, w.clone().requires_grad_())
    assert not ops._direct(x.to("meta")) and not ops._direct(x, w.as_subclass(type("Sub", (torch.Tensor,), {})))
    # with a weight that requires grad, the op's autograd kernel runs: backward names the op
    out = ops.rms_norm_quant(x.float().requires_grad_(), w.float(), kFp8DynamicTokenSym, residual=res.float())[1]
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no autograd"):
        out.sum().backward()


# ---------------------------------------------------------------- the view cache of weights
def _mm(x, w, ws, bias=None):
    return ops.scaled_mm(x, w, ws, bias=bias, input_quant_key=kFp8DynamicTokenSym)


def _mm_ref(x, w, ws, bias=None):
    """The same op with nothing cached (fresh clones: other addresses)."""
    return ops.scaled_mm(x, w.clone(), ws.clone(), bias=None if bias is None else bias.clone(),
                         input_quant_key=kFp8DynamicTokenSym)


def test_weight_views_are_cached_and_reused(monkeypatch):
    ops.clear_view_cache()
    x = inputs("quant", kFp8DynamicTokenSym)[0]
    w, ws = fp8_weight(N, K, kFp8DynamicTokenSym)
    bias = torch.randn(N).bfloat16()
    first = _mm(x, w, ws, bias)
    assert len(ops._views) == 3  # weight, weight_scale, bias
    crossings = _record_crossings(monkeypatch, x.device)
    second = _mm(x, w, ws, bias)
    imported = [shape for _, _, shape in crossings[:-1]]
    assert imported == [tuple(x.shape)], imported  # only the activation crosses again
    np.testing.assert_array_equal(raw(first), raw(second))
    np.testing.assert_array_equal(raw(second), raw(_mm_ref(x, w, ws, bias)))


def test_in_place_weight_update_is_seen():
    """An in-place update bumps the tensor's version: the next call imports the weight again and
    computes with the new values (the same result as a fresh, uncached weight)."""
    ops.clear_view_cache()
    x = inputs("quant", kFp8DynamicTokenSym)[0]
    w, ws = fp8_weight(N, K, kFp8DynamicTokenSym)
    w2, _ = fp8_weight(N, K, kFp8DynamicTokenSym, seed=7)
    before = _mm(x, w, ws)
    w.copy_(w2)
    ws.mul_(3)
    after = _mm(x, w, ws)
    assert not np.array_equal(raw(before), raw(after))
    np.testing.assert_array_equal(raw(after), raw(_mm_ref(x, w2, ws)))  # uncached tensors with the new values


def test_view_cache_drops_entries_with_their_tensors_and_is_bounded(monkeypatch):
    ops.clear_view_cache()
    x = inputs("quant", kFp8DynamicTokenSym)[0]
    w, ws = fp8_weight(N, K, kFp8DynamicTokenSym)
    _mm(x, w, ws)
    assert len(ops._views) == 2
    del w, ws
    gc.collect()
    assert len(ops._views) == 0  # the views (and the torch storage they hold) went with the weights
    monkeypatch.setattr(ops, "VIEW_CACHE_SIZE", 3)
    weights = [fp8_weight(N, K, kFp8DynamicTokenSym, seed=s) for s in range(4)]
    for w, ws in weights:
        _mm(x, w, ws)
        assert len(ops._views) <= 3
    w, ws = weights[-1]
    np.testing.assert_array_equal(raw(_mm(x, w, ws)), raw(_mm_ref(x, w, ws)))  # evicted or not: same bits
    # a view of a cached weight hits (same memory, same version counter) and lives as long as the base
    cached = len(ops._views)
    _mm(x, w.view(torch.uint8).view(torch.float8_e4m3fn), ws)
    assert len(ops._views) == cached


def test_cli_check(capsys, monkeypatch):
    assert cli.main(["check", "--keys", "kFp8DynamicTokenSym,kNvfp4Dynamic", "--ops", "quant,rms+res"]) == 0
    out = capsys.readouterr().out
    assert "4 cases: 4 bit-exact" in out and "kNvfp4Dynamic" in out and "rms+res" in out
    bad = check.Row("quant", "kFp8DynamicTokenSym", (M, K), "bfloat16", "3/9 bytes", "=", "-", "MISMATCH")
    monkeypatch.setattr(check, "run_case", lambda *a, **k: bad)
    assert cli.main(["check", "--keys", "kFp8DynamicTokenSym", "--ops", "quant"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


# ---------------------------------------------------------------- GPU only: streams, CUDA graphs
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_streams_ordered_without_host_sync():
    """On a side stream made current: a torch kernel writes the input after a long spin, the op runs,
    a torch kernel consumes the output -- no synchronize in between. JAX must wait for the write
    (else it reads stale input) and torch must wait for JAX (else the clone reads an unwritten
    buffer). Each result is compared with a synchronised rerun of the same op."""
    key = kFp8DynamicTokenSym
    shape = (8192, 4096)  # big enough that the kernel takes a while, so a missing wait shows
    srcs = [torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(i)).bfloat16()
            for i in range(4)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    results = []
    with torch.cuda.stream(side):
        for src in srcs:
            x = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
            torch.cuda._sleep(50_000_000)  # keep the side stream busy (tens of ms)
            x.copy_(src)
            qa = ops.quantize(x, key)
            results.append((x, qa.data.view(torch.uint8).clone(), qa.scale.clone()))
    torch.cuda.synchronize()
    for x, data, scale in results:
        want = ops.quantize(x, key)
        torch.cuda.synchronize()
        assert torch.equal(data, want.data.view(torch.uint8)) and torch.equal(scale, want.scale)
    same_activation(want, tr.quantize(x.cpu(), key))  # and the synchronised run is the reference's


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_streams_order_every_input_with_one_wait_per_call():
    """The lean path makes JAX wait for torch once per call, through the activation's import; the
    weight, its scale and the bias (imported as ready, or taken from the view cache) must still be
    read after torch's writes queued before the call: on a busy side stream, write all of them, call
    scaled_mm, clone the result -- no synchronize -- and compare with a synchronised rerun."""
    key = kFp8DynamicTokenSym
    m, k, n = 4096, 4096, 4096
    w_src = [fp8_weight(n, k, key, seed=s, device="cuda") for s in range(3)]
    x_src = torch.randn(m, k, device="cuda").bfloat16()
    w, ws = (torch.empty_like(t) for t in w_src[0])
    bias = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    ops.scaled_mm(x_src, w_src[0][0], w_src[0][1], input_quant_key=key)  # compile outside the timed part
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    results = []
    with torch.cuda.stream(side):
        for i, (wv, wsv) in enumerate(w_src):
            torch.cuda._sleep(50_000_000)
            w.copy_(wv)
            ws.copy_(wsv)
            bias.fill_(float(i))
            results.append(ops.scaled_mm(x_src, w, ws, bias=bias, input_quant_key=key).clone())
            torch.cuda._sleep(50_000_000)  # the next writes must not overtake this call's reads
    torch.cuda.synchronize()
    for i, ((wv, wsv), got) in enumerate(zip(w_src, results, strict=True)):
        want = ops.scaled_mm(x_src, wv.clone(), wsv.clone(), bias=torch.full_like(bias, float(i)), input_quant_key=key)
        torch.cuda.synchronize()
        assert torch.equal(got, want), i


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_is_refused():
    x = torch.randn(16, K, device="cuda").bfloat16()
    ops.quantize(x, kFp8DynamicTokenSym)  # compiled outside the capture
    torch.cuda.synchronize()
    err = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        try:
            ops.quantize(x, kFp8DynamicTokenSym)
        except RuntimeError as e:
            err = e
    assert err is not None and "CUDA graph capture" in str(err)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_torch_compile_reduce_overhead_leaves_ops_out_of_cuda_graphs():
    block = Block("cuda")
    compiled = torch.compile(block, mode="reduce-overhead")
    x, res = (torch.randn(8, K, device="cuda").bfloat16() for _ in range(2))
    for _ in range(3):  # warm-up runs, then the (would-be) graph replay
        _compare_compiled(compiled, block, x, res)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_jax_runs_on_the_tensors_gpu():
    x = torch.randn(4, K, device=f"cuda:{torch.cuda.device_count() - 1}").bfloat16()
    qa = ops.quantize(x, kFp8DynamicTokenSym)
    assert qa.data.device == x.device and qa.scale.device == x.device
    assert to_jax(qa.data).devices() == {jax.devices("gpu")[torch.cuda.device_count() - 1]}
