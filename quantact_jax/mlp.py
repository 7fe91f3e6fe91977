"""The decoder MLP block with pre-quantized activations, in JAX:

    residual add + RMSNorm -> quant -> gate/up QuantLinear [2I, H] -> SiLU-and-mul -> quant -> down QuantLinear [H, I]

:func:`mlp` returns ``(out, residual)`` like vLLM's decoder layers. Each producer is chosen from the
*next* layer's exposed key: when the layer exposes one, the fused Pallas producer
(``rms_norm_quant(..., layer=gate_up)``, ``silu_and_mul_quant(..., layer=down)``) emits the
``QuantizedActivation`` the layer consumes as is; when it exposes none, the block takes the plain
path: the unquantized op in vLLM's unfused op order, then the layer quantizes its input itself.

The plain path is vLLM's unfused one, op for op: ``fused_add_rms_norm`` adds the residual in the
activation dtype T and norms the rounded sum; ``SiluAndMul`` computes ``T(T(silu(g)) * up)``.
vLLM's *static* fp8 fused kernels keep exactly this order, so for static keys the fused block is
bit-identical to the plain one. Its *dynamic* fused kernels (per-token, per-group, NVFP4) add the
residual and form SiLU-and-mul in f32 without the intermediate T rounding, so there the two differ
by the rounding of those intermediates (bound: :func:`unfused_rtol`).

:func:`mlp_unfused` is the plain path for every layer (the comparison reference), on the layers' own
GEMM or on XLA's fp8 dot. :func:`make_block` builds a block with seeded random weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from interop.keys import (
    QuantFormat,
    QuantKey,
    ScaleLayout,
    kFp8DynamicTokenSym,
    kNvfp4Dynamic,
)
from interop.layers import get_input_quant_key
from interop.weights import (
    WEIGHT_BLOCK_128,
    WEIGHT_NVFP4,
    WEIGHT_PER_CHANNEL,
    WEIGHT_PER_TENSOR,
    weight_key_for_input,
)
from quantact_jax import consumers, mosaic_gate_up, producers, reference
from quantact_jax.activation import QuantizedActivation
from quantact_jax.layers import QuantLinear, to_jax_array

NORM = "post_attention_layernorm.weight"
GATE_UP = "mlp.gate_up_proj."
DOWN = "mlp.down_proj."


@dataclasses.dataclass(frozen=True)
class MLPBlock:
    """RMSNorm weight ``[H]`` (in the activation dtype), gate/up ``[2I, H]`` (rows ``[gate | up]``),
    down ``[H, I]``; a registered pytree (``eps`` static)."""

    norm_weight: jax.Array
    gate_up: QuantLinear
    down: QuantLinear
    eps: float = 1e-6

    @property
    def hidden(self) -> int:
        return int(self.norm_weight.shape[0])

    @property
    def intermediate(self) -> int:
        return self.down.in_features

    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        return mlp(self, x, residual)

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """vLLM names: ``post_attention_layernorm.weight``, ``mlp.gate_up_proj.*``, ``mlp.down_proj.*``."""
        return {prefix + NORM: np.asarray(self.norm_weight), **self.gate_up.state_dict(prefix + GATE_UP),
                **self.down.state_dict(prefix + DOWN)}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, prefix: str = "",
                        input_quant_key: QuantKey | None = None, backend: str = "auto",
                        interpret: bool | None = None, eps: float = 1e-6) -> MLPBlock:
        """Load a block saved by :meth:`state_dict` (or a vLLM-style checkpoint with merged
        ``gate_up_proj``); ``input_quant_key`` applies to both layers (default: inferred per layer)."""
        def layer(p: str) -> QuantLinear:
            return QuantLinear.from_state_dict(state_dict, prefix=prefix + p, input_quant_key=input_quant_key,
                                               backend=backend, interpret=interpret)

        return cls(to_jax_array(state_dict[prefix + NORM]), layer(GATE_UP), layer(DOWN), eps)


jax.tree_util.register_dataclass(MLPBlock, data_fields=["norm_weight", "gate_up", "down"], meta_fields=["eps"])


def silu_and_mul(h: jax.Array) -> jax.Array:
    """vLLM's unfused ``SiluAndMul``: ``T(T(silu(g)) * up)`` of ``h [..., 2I] = [gate | up]``, in T."""
    y = reference.silu_and_mul(h, rounded=True)  # f32 values already rounded to T
    return y.astype(h.dtype).reshape(*h.shape[:-1], h.shape[-1] // 2)


#: Relative L2 distance allowed between two forms of the block that differ only in the f32 sum
#: order of their GEMMs (Pallas tiles, XLA's dot, BLAS / cuBLASLt): a GEMM output moves by at most
#: one bf16 ulp, which can flip the next fp8 code (or a scale) for a few outputs.
SUM_ORDER_RTOL = 1e-3


def unfused_rtol(key: QuantKey) -> float:
    """Relative L2 distance allowed between the fused and the plain (unfused) block.

    0 for static keys (same op order: bit-exact). Dynamic keys quantize f32 values where the plain
    path first rounds to T (2**-9 relative for bf16): a code moves by at most one step, so the two
    blocks differ by about one quantization error, at most half a step: 2**-4 relative for e4m3,
    2**-2 for e2m1 (NVFP4).
    """
    if key.scale.static:
        return 0.0
    return 2.0 ** -2 if key.is_fp4 else 2.0 ** -4


def _silu_epilogue_applies(gate_up: QuantLinear, down: QuantLinear, a: Any) -> bool:
    """Whether :func:`mlp`'s ``silu_epilogue`` can run: a Hopper GPU, fp8 per-token / per-tensor
    activations into per-channel / per-tensor gate/up weights without bias, a dynamic per-token fp8
    key for the down layer, shapes :func:`mosaic_gate_up.supports` takes."""
    if not isinstance(a, QuantizedActivation) or gate_up.bias is not None or gate_up.backend != "pallas":
        return False
    if gate_up.interpret or not consumers._is_hopper():
        return False
    ak, dk = a.quant_key, down.input_key
    m = int(np.prod(a.orig_shape[:-1]))
    gs = ak.scale.group_shape
    return (ak.format == QuantFormat.FP8 and (gs.is_per_token() or gs.is_per_tensor())
            and gate_up.weight_key in (WEIGHT_PER_CHANNEL, WEIGHT_PER_TENSOR) and dk.format == QuantFormat.FP8
            and not dk.scale.static and dk.scale.group_shape.is_per_token() and get_input_quant_key(down) is not None
            and mosaic_gate_up.supports(m, *gate_up.weight.shape))


def mlp(block: MLPBlock, x: jax.Array, residual: jax.Array | None = None, *,
        fused: bool = True, silu_epilogue: bool = False) -> tuple[jax.Array, jax.Array]:
    """The block on ``x [..., H]``; returns ``(out [..., H], residual)`` where ``residual`` is
    ``x + residual`` (``x`` when no residual is given), as vLLM's decoder layers pass it on.

    ``fused=True`` picks the fused producer wherever the next layer exposes a key; ``fused=False``
    takes the plain path for both layers. ``silu_epilogue=True`` (experimental, opt-in: not yet run
    on a GPU) computes SiLU-and-mul in the gate/up GEMM's epilogue where it applies
    (:mod:`quantact_jax.mosaic_gate_up`, then one quantization pass,
    :func:`producers.quantize_given_row_amax`); elsewhere it changes nothing.
    """
    gate_up, down = block.gate_up, block.down
    if fused and get_input_quant_key(gate_up) is not None:
        a, res = producers.rms_norm_quant(x, block.norm_weight, layer=gate_up, residual=residual, eps=block.eps,
                                          interpret=gate_up.interpret)
    else:
        n, res = reference.rms_norm(x, block.norm_weight, block.eps, residual, add_in_f32=False)
        a = n.reshape(x.shape)
    if fused and silu_epilogue and _silu_epilogue_applies(gate_up, down, a):
        k = a.orig_shape[-1]
        h, amax = mosaic_gate_up.gate_up_silu(a.data.reshape(-1, k), gate_up.weight, a.scale, gate_up.weight_scale,
                                              a.orig_dtype)
        y = producers.quantize_given_row_amax(h, amax, down.input_key, orig_dtype=a.orig_dtype)
        return down(y).reshape(x.shape), (x if res is None else res)
    h = gate_up(a)
    if fused and get_input_quant_key(down) is not None:
        y = producers.silu_and_mul_quant(h, layer=down, interpret=down.interpret)
    else:
        y = silu_and_mul(h)
    return down(y), (x if res is None else res)


def mlp_unfused(block: MLPBlock, x: jax.Array, residual: jax.Array | None = None, *,
                gemm: Literal["layer", "xla"] = "layer") -> tuple[jax.Array, jax.Array]:
    """The plain path for both layers: jnp RMSNorm and SiLU-and-mul in vLLM's unfused op order, each
    layer quantizing its input itself; ``gemm="xla"`` runs the GEMMs as XLA fp8 dots instead of the
    layers' own backend (fp8 layers only)."""
    if gemm == "xla":
        block = dataclasses.replace(block, gate_up=block.gate_up.with_backend("xla"),
                                    down=block.down.with_backend("xla"))
    elif gemm != "layer":
        raise ValueError(f"gemm must be 'layer' or 'xla', got {gemm!r}")
    return mlp(block, x, residual, fused=False)


# ---------------------------------------------------------------- seeded random blocks
_quantize = jax.jit(reference.quantize, static_argnames=("key",))  # eager dispatch costs seconds for NVFP4


def _quantize_weight(w: np.ndarray, wkey: QuantKey, act_amax: float, input_key: QuantKey) -> dict[str, np.ndarray]:
    """State-dict entries of an f32 weight quantized with ``wkey`` (scales from its amax) and, for a
    static input key or NVFP4, the input scale calibrated from ``act_amax``."""
    n, k = w.shape
    with jax.default_device(jax.devices("cpu")[0]):
        if wkey == WEIGHT_NVFP4:
            gs = np.float32(448 * 6 / np.abs(w).max())
            qa = _quantize(jnp.asarray(w), key=kNvfp4Dynamic.with_layout(ScaleLayout.ROW_MAJOR), global_scale=gs)
            return {"weight": np.asarray(qa.data), "weight_scale": np.asarray(qa.scale),
                        "weight_global_scale": np.array([gs], np.float32),
                        "input_global_scale": np.array([448 * 6 / act_amax], np.float32)}
        a = np.abs(w)
        if wkey == WEIGHT_PER_CHANNEL:
            amax = a.max(axis=1, keepdims=True)
        elif wkey == WEIGHT_BLOCK_128:
            nb, kb = -(-n // 128), -(-k // 128)
            pad = np.zeros((nb * 128, kb * 128), np.float32)
            pad[:n, :k] = a
            amax = pad.reshape(nb, 128, kb, 128).max(axis=(1, 3))
        else:
            amax = a.max().reshape(1)
        ws = (amax / 448).astype(np.float32)
        out = {"weight": np.asarray(_quantize(jnp.asarray(w), key=wkey, scale=ws).data), "weight_scale": ws}
    if input_key.scale.static:
        out["input_scale"] = np.array([act_amax / 448], np.float32)
    return out


def make_block(hidden: int, intermediate: int, *, key: QuantKey = kFp8DynamicTokenSym, seed: int = 0,
               dtype: Any = jnp.bfloat16, backend: str = "auto", interpret: bool | None = None,
               eps: float = 1e-6) -> MLPBlock:
    """A block with seeded random weights (``N(0, 1/fan_in)``, RMSNorm weight ``1 + N(0, 0.01)``),
    quantized with the weight scheme vLLM pairs with ``key`` (per-token -> per-channel, per-tensor ->
    per-tensor, 1x128 groups -> 128x128 blocks, NVFP4 -> NVFP4 16-blocks). Static input scales and
    NVFP4 input global scales are calibrated on a seeded batch run through the f32 block.
    Deterministic for a given seed on every platform (NumPy's generator, CPU quantization)."""
    rng = np.random.default_rng(seed)
    norm_w = (1 + 0.1 * rng.standard_normal(hidden, dtype=np.float32))
    w1 = rng.standard_normal((2 * intermediate, hidden), dtype=np.float32) / np.float32(math.sqrt(hidden))
    w2 = rng.standard_normal((hidden, intermediate), dtype=np.float32) / np.float32(math.sqrt(intermediate))
    # calibration: amax of both GEMM inputs on a seeded batch through the f32 block
    xc = rng.standard_normal((64, hidden), dtype=np.float32)
    n = xc / np.sqrt(np.mean(xc * xc, axis=1, keepdims=True) + eps) * norm_w
    g, u = np.split(n @ w1.T, 2, axis=1)
    y = g / (1 + np.exp(-g)) * u
    wkey = weight_key_for_input(key)
    sd = {NORM: np.asarray(jnp.asarray(norm_w, dtype))}
    for prefix, w, act in ((GATE_UP, w1, n), (DOWN, w2, y)):
        sd.update({prefix + name: v for name, v in
                   _quantize_weight(w, wkey, float(np.abs(act).max()), key).items()})
    return MLPBlock.from_state_dict(sd, input_quant_key=key, backend=backend, interpret=interpret, eps=eps)


def is_fp8_block(block: MLPBlock) -> bool:
    """Whether both layers have fp8 weights (the XLA fp8 dot applies)."""
    return all(layer.weight_key.format == QuantFormat.FP8 for layer in (block.gate_up, block.down))


__all__ = ["SUM_ORDER_RTOL", "MLPBlock", "is_fp8_block", "make_block", "mlp", "mlp_unfused", "silu_and_mul",
           "unfused_rtol"]
