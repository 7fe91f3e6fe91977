"""quantact for JAX: the pytree ``QuantizedActivation``, Pallas producers and consumer, jnp references,
``QuantLinear`` and the fused decoder MLP block."""

from interop.keys import *  # noqa: F401,F403  (keys and constants, shared with torch)
from quantact_jax.activation import (QuantizedActivation, as_quantized_activation, expose_input_quant_key,
                                     get_input_quant_key, get_input_quant_scales)
from quantact_jax.consumers import MatmulConfig, scaled_mm
from quantact_jax.layers import QuantLinear
from quantact_jax.mlp import MLPBlock, make_block  # mlp() stays in its module: `quantact_jax.mlp` is the module
from quantact_jax.producers import ProducerConfig, quantize, rms_norm_quant, silu_and_mul_quant

__all__ = ["QuantizedActivation", "as_quantized_activation", "expose_input_quant_key", "get_input_quant_key",
           "get_input_quant_scales", "MatmulConfig", "scaled_mm", "ProducerConfig", "quantize", "rms_norm_quant", "silu_and_mul_quant",
           "QuantLinear", "MLPBlock", "make_block"]
