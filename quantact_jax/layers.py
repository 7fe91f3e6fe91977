"""Quantized linear layers for plain JAX: :class:`QuantLinear`, a frozen pytree.

A ``QuantLinear`` holds a quantized weight ``[N, K]`` (K-major, like ``torch.nn.Linear.weight``), its
scales, an optional bias, and the key it quantizes its input with. Its *kernel*
(:class:`ScaledMMKernel`) advertises that key and the scales a producer needs through
``expose_input_quant_key``, so a fused producer feeding it reads ``get_input_quant_key(layer)`` /
``get_input_quant_scales(layer)`` (or takes ``layer=``) and never the layer's attributes.

Calling the layer:

- with a ``QuantizedActivation``: checked against the key (``QuantKeyMismatchError`` on a mismatch,
  ``QuantLayoutError`` on bad shapes), never re-quantized;
- with a plain array: the layer quantizes it with its own key (the plain path).

Backends (the ``backend`` field):

- ``"pallas"``: :func:`quantact_jax.consumers.scaled_mm`: the Pallas fp8 GEMM (per-tensor, per-token x
  per-channel, 1x128 x 128x128 blocks), and for NVFP4 / MX weights the Pallas GEMM that dequantises
  K tiles in registers (:mod:`quantact_jax.dequant_gemm`; Hopper has no block-scaled MMA); plain
  inputs are quantized by the Pallas producer.
- ``"xla"``: XLA's fp8 ``dot_general`` with the same scale epilogue (:func:`xla_scaled_mm`); the
  unfused peer.
- ``"reference"``: :func:`quantact_jax.reference.scaled_mm`, dequantize-then-f32-matmul in jnp (every
  scheme; the specification the other two are tested against).

``"auto"`` (the default of the constructors) picks ``"pallas"`` where it applies (fp8 as above; NVFP4 /
MX activations with row-major or swizzled_128x4 scales), else ``"reference"``. MX layers (``WEIGHT_MXFP8`` /
``WEIGHT_MXFP4`` from :mod:`interop.weights`) are built with the raw constructor: the state-dict loader
takes fp8 and NVFP4 entries only.
Weights load from vLLM / compressed-tensors state dicts (see :mod:`interop.weights` for the entries
and checks) given as NumPy arrays, JAX arrays or torch tensors (torch through the zero-copy DLPack
bridge: the bridge's read-only rule applies to those tensors).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.dtypes import jax_dtype
from interop.errors import NoInputQuantKeyError, QuantLayoutError
from interop.keys import (
    InputQuantScales,
    QuantFormat,
    QuantKey,
    ScaleDirection,
    ScaleLayout,
)
from interop.layers import expose_input_quant_key
from interop.layout import rows_cols
from interop.weights import (
    ENTRIES,
    WEIGHT_BLOCK_128,
    WEIGHT_PER_CHANNEL,
    WEIGHT_PER_TENSOR,
    plan_linear,
    select_entries,
)
from quantact_jax import consumers, dequant_gemm, exact, producers, reference
from quantact_jax.activation import QuantizedActivation, as_quantized_activation

F32 = jnp.float32
BACKENDS = ("pallas", "xla", "reference")
HIGHEST = jax.lax.Precision.HIGHEST


def pallas_supports(input_key: QuantKey, weight_key: QuantKey) -> bool:
    """Whether the Pallas consumer takes this activation/weight pairing (fp8: per-tensor or per-token
    activations with per-tensor/per-channel weights, row-major 1x128 groups with 128x128 blocks;
    NVFP4 / MX: :func:`quantact_jax.dequant_gemm.supports`)."""
    if input_key.format in dequant_gemm.FORMATS:
        return dequant_gemm.supports(input_key, weight_key)
    if input_key.format != QuantFormat.FP8:
        return False
    gs = input_key.scale.group_shape
    if gs.is_per_tensor() or gs.is_per_token():
        return weight_key in (WEIGHT_PER_TENSOR, WEIGHT_PER_CHANNEL)
    return (input_key.group_size == 128 and input_key.scale.layout == ScaleLayout.ROW_MAJOR
            and not input_key.scale.ue8m0 and weight_key == WEIGHT_BLOCK_128)


def xla_scaled_mm(qa: QuantizedActivation, weight: jax.Array, weight_scale: jax.Array, weight_key: QuantKey, *,
                  bias: jax.Array | None = None, out_dtype: Any = None) -> jax.Array:
    """XLA's fp8 x fp8 -> f32 ``dot_general`` on ``[N, K]`` weights with vLLM's scale epilogue:
    ``sa * (sb * acc) (+ bias)`` (per-tensor / per-token x per-tensor / per-channel), or
    ``sum_kb sa[m, kb] * sb[n // 128, kb] * dot_kb`` (1x128 groups, any scale layout, x 128x128 blocks).
    Same math as the Pallas consumer; the f32 sums run in XLA's order.

    The dots run at ``Precision.HIGHEST``: at ``DEFAULT`` XLA:GPU lowers an fp8 dot to cuBLASLt with
    *fast accumulation* (no promotion of the tensor core's ~14-bit accumulator; openxla/xla#6599),
    which moved the block's outputs by up to 1.6% (rel L2) from the Pallas/Triton path on an H100.
    HIGHEST keeps the fp8 operands and asks for promoted (f32) accumulation; on CPU it changes nothing.
    Measured on an H100 with jax 0.11.2: HIGHEST does *not* change this (the block-scaled case still
    differs by 1.5% rel L2), so on GPU this backend is a vendor fast-accumulation GEMM."""
    key = qa.quant_key
    if key.format != QuantFormat.FP8 or weight.dtype != jnp.float8_e4m3fn:
        raise QuantLayoutError(f"xla_scaled_mm takes fp8 activations and weights, got {key} and {weight.dtype}")
    m, k = rows_cols(qa.orig_shape)
    n = weight.shape[0]
    a = qa.data.reshape(m, k)
    if key.group_size == 128:
        if weight_key != WEIGHT_BLOCK_128:
            raise QuantLayoutError("1x128-group activations need 128x128-block weight scales")
        kb = k // 128
        sa = reference.unlayout_scales(qa.scale, key.scale.layout, m, kb).astype(F32)  # [M, KB]
        sb = jnp.repeat(jnp.asarray(weight_scale, F32), 128, axis=0)[:n]  # [N, KB]
        parts = jax.lax.dot_general(a.reshape(m, kb, 128), weight.reshape(n, kb, 128), (((2,), (2,)), ((1,), (1,))),
                                    precision=HIGHEST, preferred_element_type=F32)  # [KB, M, N]
        acc = jnp.sum(sa.T[:, :, None] * (sb.T[:, None, :] * parts), axis=0)
    elif key.scale.group_shape.is_per_tensor() or key.scale.group_shape.is_per_token():
        acc = jax.lax.dot_general(a, weight, (((1,), (1,)), ((), ())), precision=HIGHEST,
                                  preferred_element_type=F32)
        acc = qa.scale.astype(F32).reshape(-1, 1) * (jnp.asarray(weight_scale, F32).reshape(1, -1) * acc)
    else:
        raise QuantLayoutError(f"xla_scaled_mm takes per-tensor, per-token or 1x128-group activations, got {key}")
    if bias is not None:
        acc = acc + jnp.asarray(bias, F32)
    return round_out(acc, qa.orig_dtype if out_dtype is None else out_dtype).reshape(*qa.orig_shape[:-1], n)


def round_out(acc: jax.Array, dtype: Any) -> jax.Array:
    """``acc.astype(dtype)`` that XLA cannot skip: inside one ``jit``, XLA:CPU drops an f32 -> bf16
    -> f32 convert pair (excess precision) and would feed the next op the unrounded f32 GEMM output,
    so a jnp GEMM followed by jnp SiLU would differ from the same ops run separately."""
    return exact.round_to(acc, dtype).astype(dtype)


@dataclasses.dataclass(frozen=True)
class ScaledMMKernel:
    """The consumer a :class:`QuantLinear` runs. ``input_quant_key`` is what it advertises: the
    layer's key, or ``None`` when the layer is built not to accept pre-quantized input."""

    backend: str
    input_quant_key: QuantKey | None

    def input_quant_scales(self, layer: QuantLinear) -> InputQuantScales:
        """Static input scale (dequantisation direction) and NVFP4 input global scale
        (quantisation direction, ``448 * 6 / amax``, as compressed-tensors stores it)."""
        return InputQuantScales(input_scale=layer.input_scale, global_scale=layer.input_global_scale,
                                global_scale_direction=ScaleDirection.QUANT)


def to_jax_array(value: Any) -> jax.Array:
    """A JAX array of a loader input: torch tensors through the zero-copy bridge (CUDA tensors stay
    where they are; CPU tensors go to JAX's default device), anything else by ``jnp.asarray``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        from interop.bridge import BridgeCopyWarning, to_jax

        with warnings.catch_warnings():  # loading may copy (an unaligned CPU buffer): nothing to warn about
            warnings.simplefilter("ignore", BridgeCopyWarning)
            a = to_jax(value.detach().contiguous())
        if value.device.type == "cpu" and jax.default_backend() != "cpu":
            a = jax.device_put(a, jax.devices()[0])  # host tensors land on JAX's default device, as NumPy ones do
        return a
    return jnp.asarray(value)


def _as_array(value: Any) -> Any:
    """Python numbers as f32 NumPy scalars (so ``create(..., input_scale=0.02)`` works); arrays as is."""
    return np.float32(value) if isinstance(value, (int, float)) else value


@dataclasses.dataclass(frozen=True)
class QuantLinear:
    """``y = x @ dequant(weight).T (+ bias)`` with a quantized weight; a registered JAX pytree.

    Array fields are pytree leaves; ``input_key``, ``weight_key``, ``backend``, ``accepts_quantized``
    and ``interpret`` are static. Build with :meth:`from_state_dict` or :meth:`create` (they check
    shapes and dtypes); the raw constructor trusts its arguments.

    ``input_key`` is the key the layer quantizes plain inputs with. ``accepts_quantized=False`` builds
    a layer whose kernel advertises no key (``get_input_quant_key(layer) is None``): it only takes
    plain arrays, and producers must not feed it a ``QuantizedActivation`` (the plain path).
    """

    weight: jax.Array
    weight_scale: jax.Array
    bias: jax.Array | None
    input_scale: jax.Array | None
    weight_global_scale: jax.Array | None
    input_global_scale: jax.Array | None
    input_key: QuantKey
    weight_key: QuantKey
    backend: str = "pallas"
    accepts_quantized: bool = True
    interpret: bool | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "pallas" and not pallas_supports(self.input_key, self.weight_key):
            raise QuantLayoutError(f"the Pallas consumer does not take {self.input_key} with weight scheme "
                                   f"{self.weight_key} (fp8 per-tensor/per-token x per-tensor/per-channel, or "
                                   "row-major 1x128 groups x 128x128 blocks; NVFP4 / MX with row-major or "
                                   "swizzled_128x4 scales); use backend='reference'")
        if self.backend == "xla" and self.weight_key.format != QuantFormat.FP8:
            raise QuantLayoutError(f"the XLA fp8 dot takes fp8 weights, not {self.weight_key}; use backend='reference'")
        expose_input_quant_key(self, self.kernel)

    # ---- construction
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, prefix: str = "",
                        input_quant_key: QuantKey | None = None, backend: str = "auto",
                        accepts_quantized: bool = True, interpret: bool | None = None) -> QuantLinear:
        """Load ``{prefix}weight``, ``weight_scale``, ``input_scale``, ``bias``, NVFP4
        ``weight_global_scale`` / ``input_global_scale`` (NumPy, JAX or torch values). Shapes and
        dtypes are checked by :func:`interop.weights.plan_linear` (``QuantLayoutError`` naming the
        entry); scales are widened to f32. ``backend="auto"``: Pallas where it applies (fp8 and NVFP4
        activations with the layouts its kernels read), else the jnp reference."""
        entries = {name: _as_array(v) for name, v in select_entries(state_dict, prefix).items()}
        plan = plan_linear(entries, input_quant_key=input_quant_key, what=prefix)
        if backend == "auto":
            backend = "pallas" if pallas_supports(plan.input_key, plan.weight_key) else "reference"
        arrays = {name: to_jax_array(entries[name]).astype(jax_dtype(plan.dtypes[name])).reshape(plan.shapes[name])
                  for name in plan.shapes}
        return cls(**{name: arrays.get(name) for name in ENTRIES}, input_key=plan.input_key,
                   weight_key=plan.weight_key, backend=backend, accepts_quantized=accepts_quantized,
                   interpret=interpret)

    @classmethod
    def create(cls, weight: Any, weight_scale: Any, *, bias: Any = None, input_scale: Any = None,
               weight_global_scale: Any = None, input_global_scale: Any = None,
               input_quant_key: QuantKey | None = None, backend: str = "auto", accepts_quantized: bool = True,
               interpret: bool | None = None) -> QuantLinear:
        """:meth:`from_state_dict` of the given arrays (``None`` entries left out)."""
        given = {"weight": weight, "weight_scale": weight_scale, "bias": bias, "input_scale": input_scale,
                     "weight_global_scale": weight_global_scale, "input_global_scale": input_global_scale}
        return cls.from_state_dict({k: v for k, v in given.items() if v is not None},
                                   input_quant_key=input_quant_key, backend=backend,
                                   accepts_quantized=accepts_quantized, interpret=interpret)

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The layer as vLLM-named NumPy arrays (fp8 as ml_dtypes), loadable by either framework."""
        return {prefix + name: np.asarray(getattr(self, name)) for name in ENTRIES
                if getattr(self, name) is not None}

    def with_backend(self, backend: str) -> QuantLinear:
        """The same weights on another backend (``"pallas"``, ``"xla"``, ``"reference"``)."""
        return dataclasses.replace(self, backend=backend)

    # ---- properties
    @property
    def kernel(self) -> ScaledMMKernel:
        return ScaledMMKernel(self.backend, self.input_key if self.accepts_quantized else None)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1]) * (2 if self.weight_key.is_fp4 else 1)

    # ---- forward
    def quantize_input(self, x: jax.Array) -> QuantizedActivation:
        """Quantize a plain input with the layer's key and scales (the Pallas producer for the
        Pallas backend, the bit-identical jnp reference otherwise)."""
        kw = {"scale": self.input_scale, "global_scale": self.input_global_scale}
        if self.backend == "pallas":
            return producers.quantize(x, self.input_key, interpret=self.interpret, **kw)
        return reference.quantize(x, self.input_key, **kw)

    def __call__(self, x: QuantizedActivation | jax.Array, *, out_dtype: Any = None) -> jax.Array:
        """``[..., K] -> [..., N]`` in ``out_dtype`` (default: the activation's original dtype)."""
        if isinstance(x, QuantizedActivation) and self.input_quant_key is None:
            raise NoInputQuantKeyError(
                f"this QuantLinear was built with accepts_quantized=False and exposes no input key, but received "
                f"an activation quantized as {x.quant_key}; pass the plain array")
        qa = as_quantized_activation(x, self.input_key)
        if qa is None:
            qa = self.quantize_input(jnp.asarray(x))
        if qa.orig_shape[-1] != self.in_features:
            raise QuantLayoutError(f"input has K={qa.orig_shape[-1]}, but the weight is "
                                   f"[N={self.out_features}, K={self.in_features}]")
        if self.backend == "pallas":
            return consumers.scaled_mm(qa, self.weight, self.weight_scale, bias=self.bias, out_dtype=out_dtype,
                                       input_quant_key=self.input_key, weight_key=self.weight_key,
                                       interpret=self.interpret, input_global_scale=self.input_global_scale,
                                       weight_global_scale=self.weight_global_scale)
        if self.backend == "xla":
            return xla_scaled_mm(qa, self.weight, self.weight_scale, self.weight_key, bias=self.bias,
                                 out_dtype=out_dtype)
        out = reference.scaled_mm(qa, self.weight, self.weight_scale, self.weight_key, bias=self.bias,
                                  out_dtype=F32, global_scale_a=self.input_global_scale,
                                  global_scale_w=self.weight_global_scale)
        return round_out(out, qa.orig_dtype if out_dtype is None else out_dtype)

    def __repr__(self) -> str:
        return (f"QuantLinear(in={self.in_features}, out={self.out_features}, input_key={self.input_key}, "
                f"weight_key={self.weight_key}, backend={self.backend!r}, bias={self.bias is not None}, "
                f"exposes={self.input_quant_key is not None})")


jax.tree_util.register_dataclass(
    QuantLinear, data_fields=list(ENTRIES),
    meta_fields=["input_key", "weight_key", "backend", "accepts_quantized", "interpret"])


__all__ = ["BACKENDS", "QuantLinear", "ScaledMMKernel", "pallas_supports", "round_out", "to_jax_array", "xla_scaled_mm"]
