"""quantact for PyTorch: vLLM's ``QuantizedActivation`` dataclass, the torch references, ``QuantLinear``
and the reference MLP block."""

from interop.keys import *  # noqa: F401,F403
from quantact_torch.activation import (QuantizedActivation, as_quantized_activation, expose_input_quant_key,
                                       get_input_quant_key, get_input_quant_scales, scale_from_storage,
                                       scale_storage)
from quantact_torch.layers import QuantLinear
from quantact_torch.mlp import MLPBlock

__all__ = ["QuantizedActivation", "as_quantized_activation", "expose_input_quant_key", "get_input_quant_key",
           "get_input_quant_scales", "scale_from_storage", "scale_storage", "QuantLinear", "MLPBlock"]
