"""The decoder MLP block in PyTorch, the reference for ``quantact_jax.mlp``:

    residual add + RMSNorm -> quant -> gate/up QuantLinear [2I, H] -> SiLU-and-mul -> quant -> down QuantLinear [H, I]

Same structure and rules as the JAX block: the fused producer (the torch reference's
``rms_norm_quant`` / ``silu_and_mul_quant``, vLLM's fused op order) where the next layer exposes a
key, the plain path (vLLM's unfused ``fused_add_rms_norm`` / ``SiluAndMul`` order, then the layer
quantizes its input) where it exposes none, or everywhere with ``fused=False``. Loads the
vLLM-named state dict ``quantact_jax.mlp.MLPBlock.state_dict()`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from interop.keys import QuantKey, ScaleDirection
from interop.layers import get_input_quant_key, get_input_quant_scales
from quantact_torch import reference
from quantact_torch.layers import QuantLinear, to_torch_tensor

NORM = "post_attention_layernorm.weight"
GATE_UP = "mlp.gate_up_proj."
DOWN = "mlp.down_proj."


def producer_kwargs(layer: Any) -> dict[str, Any]:
    """``key``, ``scale`` and ``global_scale`` (quantisation direction) a producer feeding ``layer``
    takes, from the layer's exposed key and scales."""
    scales = get_input_quant_scales(layer)
    gs = scales.global_scale
    if gs is not None and scales.global_scale_direction == ScaleDirection.DEQUANT:
        gs = reference.true_div(1.0, gs)
    return {"key": get_input_quant_key(layer, required=True), "scale": scales.input_scale, "global_scale": gs}


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """vLLM's unfused ``SiluAndMul``: ``T(T(silu(g)) * up)`` of ``h [..., 2I] = [gate | up]``, in T."""
    return reference.silu_and_mul(h, rounded=True).to(h.dtype).reshape(*h.shape[:-1], h.shape[-1] // 2)


class MLPBlock(torch.nn.Module):
    """RMSNorm weight ``[H]`` (a buffer in the activation dtype), ``gate_up`` ``[2I, H]``, ``down``
    ``[H, I]``. ``forward(x, residual)`` returns ``(out, residual)`` like vLLM's decoder layers."""

    def __init__(self, norm_weight: Any, gate_up: QuantLinear, down: QuantLinear, eps: float = 1e-6):
        super().__init__()
        self.register_buffer("norm_weight", to_torch_tensor(norm_weight))
        self.gate_up, self.down, self.eps = gate_up, down, float(eps)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, prefix: str = "",
                        input_quant_key: QuantKey | None = None, eps: float = 1e-6,
                        use_scaled_mm: bool = True) -> MLPBlock:
        """Load ``post_attention_layernorm.weight``, ``mlp.gate_up_proj.*``, ``mlp.down_proj.*``
        (``use_scaled_mm``: see :class:`~quantact_torch.layers.QuantLinear`)."""
        def layer(p: str) -> QuantLinear:
            return QuantLinear.from_state_dict(state_dict, prefix=prefix + p, input_quant_key=input_quant_key,
                                               use_scaled_mm=use_scaled_mm)

        return cls(state_dict[prefix + NORM], layer(GATE_UP), layer(DOWN), eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *,
                fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if fused and get_input_quant_key(self.gate_up) is not None:
            a, res = reference.rms_norm_quant(x, self.norm_weight, residual=residual, eps=self.eps,
                                              **producer_kwargs(self.gate_up))
        else:
            n, res = reference.rms_norm(x, self.norm_weight, self.eps, residual, add_in_f32=False)
            a = n.reshape(x.shape)
        h = self.gate_up(a)
        y = (reference.silu_and_mul_quant(h, **producer_kwargs(self.down))
             if fused and get_input_quant_key(self.down) is not None else silu_and_mul(h))
        return self.down(y), (x if res is None else res)


__all__ = ["MLPBlock", "producer_kwargs", "silu_and_mul"]
