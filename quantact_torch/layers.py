"""Quantized linear layer for PyTorch: :class:`QuantLinear`, the mirror of ``quantact_jax.layers``.

Same entries, checks (:func:`interop.weights.plan_linear`), keys and key/scale exposure as the JAX
layer, with vLLM's ``apply_weights(x, bias)`` semantics:

- a ``QuantizedActivation`` is checked against the layer's key (``QuantKeyMismatchError``), never
  re-quantized; a plain tensor is quantized with the layer's key by the torch reference quantizer;
- the matmul is the torch reference consumer (:func:`quantact_torch.reference.scaled_mm`,
  dequantize-then-f32-matmul, bit-faithful to the jnp reference up to the f32 sum order) on CPU and
  for NVFP4 and block-scaled weights; on CUDA, fp8 per-tensor / per-token activations with
  per-tensor / per-channel weights go through ``torch._scaled_mm`` (cuBLASLt), as vLLM's
  ``Fp8LinearOp`` does (tensor-wise scales, or row-wise scales for a bf16 output, K and N
  multiples of 16). ``use_scaled_mm=False`` keeps the reference consumer on CUDA too: cuBLASLt's
  accumulation is the vendor's (it moved a block's output by 1% rel L2 from the f32 references on an
  H100), so the op-order comparisons run the torch block with the reference consumer.

This module does not import jax, except to convert JAX arrays handed to the loader.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from interop.dtypes import canonical_dtype, torch_dtype
from interop.errors import NoInputQuantKeyError, QuantLayoutError
from interop.keys import InputQuantScales, QuantFormat, QuantKey, ScaleDirection
from interop.layers import expose_input_quant_key
from interop.weights import (
    ENTRIES,
    WEIGHT_PER_CHANNEL,
    WEIGHT_PER_TENSOR,
    check_names,
    plan_linear,
    select_entries,
)
from quantact_torch import reference
from quantact_torch.activation import QuantizedActivation, as_quantized_activation


class ScaledMMKernel:
    """The consumer a :class:`QuantLinear` runs; ``input_quant_key`` is what it advertises (``None``
    for a layer built with ``accepts_quantized=False``)."""

    def __init__(self, input_quant_key: QuantKey | None):
        self.input_quant_key = input_quant_key

    def input_quant_scales(self, layer: QuantLinear) -> InputQuantScales:
        """Static input scale (dequantisation direction) and NVFP4 input global scale
        (quantisation direction, ``448 * 6 / amax``)."""
        return InputQuantScales(input_scale=layer.input_scale, global_scale=layer.input_global_scale,
                                global_scale_direction=ScaleDirection.QUANT)


_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32}


def to_torch_tensor(value: Any) -> torch.Tensor:
    """A torch tensor of a loader input: torch as is, NumPy (ml_dtypes fp8/bf16 included, copied
    so torch owns writable memory), Python numbers as f32, JAX arrays through the bridge (copied:
    torch may write into its buffers, e.g. ``load_state_dict``)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (int, float)):
        return torch.tensor(value, dtype=torch.float32)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        from interop.bridge import to_torch

        return to_torch(value, copy=True)
    a = np.array(value, copy=True)
    name = canonical_dtype(a.dtype)
    if a.dtype.kind == "V" or name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"):
        # torch.from_numpy does not know ml_dtypes: share the bits through a same-size integer view
        return torch.from_numpy(a.view(_NP_BITS[a.dtype.itemsize])).view(torch_dtype(name))
    return torch.from_numpy(a)


class QuantLinear(torch.nn.Module):
    """``y = x @ dequant(weight).T (+ bias)`` with a quantized weight ``[N, K]`` (``[N, K/2]`` uint8
    for NVFP4). All tensors are buffers with vLLM's names, so ``state_dict()`` is a vLLM-style dict.

    ``weight`` and ``weight_scale`` are required (a missing one is reported like any other state-dict
    error). ``input_quant_key`` (default: inferred from the weights as vLLM does, see
    :func:`interop.weights.plan_linear`) is the key plain inputs are quantized with and, unless
    ``accepts_quantized=False``, the key the layer exposes to producers.
    """

    def __init__(self, weight: Any = None, weight_scale: Any = None, *, bias: Any = None, input_scale: Any = None,
                 weight_global_scale: Any = None, input_global_scale: Any = None,
                 input_quant_key: QuantKey | None = None, accepts_quantized: bool = True, use_scaled_mm: bool = True,
                 what: str = ""):
        super().__init__()
        given = {"weight": weight, "weight_scale": weight_scale, "bias": bias, "input_scale": input_scale,
                     "weight_global_scale": weight_global_scale, "input_global_scale": input_global_scale}
        tensors = {name: to_torch_tensor(v) for name, v in given.items() if v is not None}
        plan = plan_linear(tensors, input_quant_key=input_quant_key, what=what)
        for name in ENTRIES:
            t = tensors.get(name)
            if t is not None:
                t = t.to(torch_dtype(plan.dtypes[name])).reshape(plan.shapes[name])
            self.register_buffer(name, t)
        self.input_key: QuantKey = plan.input_key
        self.weight_key: QuantKey = plan.weight_key
        self.accepts_quantized = bool(accepts_quantized)
        self.use_scaled_mm = bool(use_scaled_mm)  # torch._scaled_mm on CUDA where it applies
        expose_input_quant_key(self, self.kernel)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, prefix: str = "",
                        input_quant_key: QuantKey | None = None, accepts_quantized: bool = True,
                        use_scaled_mm: bool = True) -> QuantLinear:
        """Load ``{prefix}weight`` (or ``weight_packed``), ``weight_scale``, ``input_scale``, ``bias``,
        ``weight_global_scale``, ``input_global_scale`` from torch tensors, NumPy or JAX arrays;
        ``QuantLayoutError`` naming the entry on a wrong shape or dtype."""
        entries = select_entries(state_dict, prefix)
        check_names(entries, prefix)
        return cls(**entries, input_quant_key=input_quant_key, accepts_quantized=accepts_quantized,
                   use_scaled_mm=use_scaled_mm, what=prefix)

    @property
    def kernel(self) -> ScaledMMKernel:
        return ScaledMMKernel(self.input_key if self.accepts_quantized else None)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1]) * (2 if self.weight_key.is_fp4 else 1)

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() replace the buffers: expose the new ones
        out = super()._apply(fn, recurse)
        expose_input_quant_key(self, self.kernel)
        return out

    def quantize_input(self, x: torch.Tensor) -> QuantizedActivation:
        """Quantize a plain input with the layer's key and scales (torch reference quantizer)."""
        return reference.quantize(x, self.input_key, scale=self.input_scale, global_scale=self.input_global_scale)

    def apply_weights(self, x: QuantizedActivation | torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """vLLM's ``LinearMethod.apply_weights``: ``[..., K] -> [..., N]`` in ``out_dtype`` (default:
        the activation's original dtype)."""
        if isinstance(x, QuantizedActivation) and self.input_quant_key is None:
            raise NoInputQuantKeyError(
                f"this QuantLinear was built with accepts_quantized=False and exposes no input key, but received "
                f"an activation quantized as {x.quant_key}; pass the plain tensor")
        qa = as_quantized_activation(x, self.input_key)
        if qa is None:
            qa = self.quantize_input(x)
        if qa.orig_shape[-1] != self.in_features:
            raise QuantLayoutError(f"input has K={qa.orig_shape[-1]}, but the weight is "
                                   f"[N={self.out_features}, K={self.in_features}]")
        out_dtype = qa.orig_dtype if out_dtype is None else out_dtype
        if qa.data.is_cuda and self.use_scaled_mm:
            out = self._scaled_mm(qa, bias, out_dtype)
            if out is not None:
                return out
        return reference.scaled_mm(qa, self.weight, self.weight_scale, self.weight_key, bias=bias,
                                   out_dtype=out_dtype, global_scale_a=self.input_global_scale,
                                   global_scale_w=self.weight_global_scale)

    def forward(self, x: QuantizedActivation | torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.apply_weights(x, self.bias, out_dtype)

    def _scaled_mm(self, qa: QuantizedActivation, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor | None:
        """``torch._scaled_mm`` (cuBLASLt on CUDA) where it applies, else ``None``.

        Per-tensor x per-tensor: tensor-wise scales, bias in the GEMM epilogue. Otherwise row-wise
        scales (``scale_a [M, 1]``, ``scale_b [1, N]``; cuBLASLt wants a bf16 output for them), bias
        added after the GEMM (one more rounding than the reference, as in vLLM)."""
        gs = qa.quant_key.scale.group_shape
        n, k = self.weight.shape
        if (qa.quant_key.format != QuantFormat.FP8 or not (gs.is_per_tensor() or gs.is_per_token())
                or self.weight_key not in (WEIGHT_PER_TENSOR, WEIGHT_PER_CHANNEL) or k % 16 or n % 16):
            return None
        m = qa.data.numel() // k
        a = qa.data.reshape(m, k)
        sa, sb = qa.scale.float(), self.weight_scale.float()
        if gs.is_per_tensor() and self.weight_key == WEIGHT_PER_TENSOR:
            out = torch._scaled_mm(a, self.weight.t(), scale_a=sa.reshape(()), scale_b=sb.reshape(()),
                                   bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
        else:
            if out_dtype != torch.bfloat16:
                return None
            out = torch._scaled_mm(a, self.weight.t(), scale_a=sa.reshape(-1, 1).expand(m, 1).contiguous(),
                                   scale_b=sb.reshape(1, -1).expand(1, n).contiguous(), out_dtype=out_dtype)
            if bias is not None:
                out = out + bias.to(out_dtype)
        return out.reshape(*qa.orig_shape[:-1], n)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, input_key={self.input_key}, "
                f"weight_key={self.weight_key}, bias={self.bias is not None}, "
                f"exposes={self.input_quant_key is not None}, use_scaled_mm={self.use_scaled_mm}")


__all__ = ["QuantLinear", "ScaledMMKernel", "to_torch_tensor"]
