"""Tensor parallelism for :class:`~quantact_jax.layers.QuantLinear` and the MLP block, on ``shard_map``.

- **Column parallel** (:func:`column_parallel`): the weight ``[N, K]`` is split along N over the TP
  axes, the activation is replicated over them (its rows may be split over other axes); each shard
  computes its own output columns with the unsharded kernel, so the result is bit-identical to one
  device's.
- **Row parallel** (:func:`row_parallel`): the weight is split along K, the activation along K in
  the same way (its scales follow by the rules of :mod:`quantact_jax.sharding`); each shard's
  partial product (scales applied, no bias) comes out in ``reduce_dtype`` and is summed with
  ``lax.psum``; the bias is added once after the sum, then the sum is cast to the output dtype.
  The default ``reduce_dtype`` is **f32**: the partials are the kernel's f32 accumulators, so the sum
  rounds once to the output dtype, as on one device (vLLM all-reduces partials already rounded to
  bf16: half the traffic, but every partial and the sum each round to 8 bits). The summation order
  still differs from one device's sequential K loop, so results agree up to f32 rounding of the
  reduction (and, after the cast, can differ by one output ulp where that rounding tips it).
- **MLP block** (:func:`tp_mlp`): RMSNorm -> quant (rows only, replicated over TP) -> gate/up column
  parallel -> SiLU-and-mul -> quant (local to each shard) -> down row parallel, in one ``shard_map``
  with one all-reduce. The merged gate/up weight ``[2I, H]`` holds ``[gate | up]`` rows; a plain N
  split would give shard 0 only gate rows, so :func:`interleave_gate_up` reorders the rows to
  ``[gate_0; up_0; gate_1; up_1; ...]`` (what vLLM's ``MergedColumnParallelLinear`` loads per rank)
  and each shard's output is ``[gate_i | up_i]``, the layout SiLU-and-mul expects.

fp8 weights only (NVFP4 layers run on the jnp reference backend and are not sharded yet).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from interop.errors import NoInputQuantKeyError, QuantShardingError
from interop.keys import QuantFormat, QuantKey
from interop.layers import get_input_quant_key
from interop.weights import WEIGHT_BLOCK_128, WEIGHT_PER_CHANNEL
from quantact_jax import mlp as mlp_mod
from quantact_jax import producers, reference
from quantact_jax.activation import QuantizedActivation, as_quantized_activation
from quantact_jax.layers import QuantLinear
from quantact_jax.mlp import MLPBlock
from quantact_jax.sharding import (
    Axes,
    AxisEntry,
    _axes,
    _entry,
    _size,
    place,
    producer_axis_name,
    shard_map_call,
    shard_plan,
    sharded_gemm,
    sharded_quantize,
    weight_specs,
)

REPLICATED = P()


# ------------------------------------------------------------------ layers
def linear_specs(layer: QuantLinear, mesh: Mesh, *, n_axes: AxisEntry = None, k_axes: AxisEntry = None) -> QuantLinear:
    """A ``QuantLinear`` of ``PartitionSpec``s (same static fields, so it matches the layer's tree):
    the weight and its scale split over ``n_axes`` (N) and ``k_axes`` (K), the bias over ``n_axes``,
    input and global scales replicated."""
    if layer.weight_key.format != QuantFormat.FP8:
        raise QuantShardingError(f"tensor parallelism takes fp8 weights, not {layer.weight_key}")
    n_ax, k_ax = _axes(n_axes), _axes(k_axes)
    w, ws = weight_specs(layer.weight_key, *layer.weight.shape, n_ax, k_ax, mesh)

    def rep(v: Any) -> P | None:
        return None if v is None else P()

    return dataclasses.replace(layer, weight=w, weight_scale=ws, bias=None if layer.bias is None else P(_entry(n_ax)),
                               input_scale=rep(layer.input_scale), weight_global_scale=rep(layer.weight_global_scale),
                               input_global_scale=rep(layer.input_global_scale))


def linear_shardings(layer: QuantLinear, mesh: Mesh, *, n_axes: AxisEntry = None,
                     k_axes: AxisEntry = None) -> QuantLinear:
    """:func:`linear_specs` as ``NamedSharding``s, for ``jax.device_put(layer, ...)`` or ``jit``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), linear_specs(layer, mesh, n_axes=n_axes, k_axes=k_axes))


def _consumer(layer: QuantLinear) -> QuantLinear:
    """The layer taking its own (already quantized) input, also when built ``accepts_quantized=False``."""
    return layer if layer.accepts_quantized else dataclasses.replace(layer, accepts_quantized=True)


def _quantize_input(layer: QuantLinear, v: jax.Array, axis_name: Axes | None) -> QuantizedActivation:
    """``layer.quantize_input`` with a cross-shard amax where a dynamic per-tensor key needs one."""
    if axis_name is None:
        return layer.quantize_input(v)
    return producers.quantize(v, layer.input_key, scale=layer.input_scale, global_scale=layer.input_global_scale,
                              interpret=layer.interpret, axis_name=axis_name)


def sharded_linear(layer: QuantLinear, x: QuantizedActivation | jax.Array, mesh: Mesh, spec: P = REPLICATED, *,
                   n_axes: AxisEntry = None, out_dtype: Any = None, reduce_dtype: Any = jnp.float32) -> jax.Array:
    """``layer(x)`` with ``x`` sharded as ``spec`` (rows: data parallel; K: row parallel, summed over
    the K axes in ``reduce_dtype``) and the weight's N split over ``n_axes`` (column parallel).

    A plain ``x`` is quantized with the layer's key by :func:`~quantact_jax.sharding.sharded_quantize`
    (the layer's own quantization, with a cross-shard amax for dynamic per-tensor keys).
    """
    if isinstance(x, QuantizedActivation):
        if layer.input_quant_key is None:
            raise NoInputQuantKeyError("this QuantLinear was built with accepts_quantized=False; pass the plain array")
        qa = as_quantized_activation(x, layer.input_key)
    else:
        qa = sharded_quantize(x, layer.input_key, mesh, spec, scale=layer.input_scale,
                              global_scale=layer.input_global_scale, interpret=layer.interpret)
    plan = shard_plan(layer.input_key, qa.orig_shape, spec, mesh)
    n_ax = _axes(n_axes)
    weights = dataclasses.replace(layer, bias=None)

    def mm(qa_l: QuantizedActivation, lay: QuantLinear, b: jax.Array | None, dtype: Any) -> jax.Array:
        return _consumer(dataclasses.replace(lay, bias=b))(qa_l, out_dtype=dtype)

    return sharded_gemm(qa, plan, mesh, n_ax, weights, linear_specs(weights, mesh, n_axes=n_ax, k_axes=plan.k_axes),
                        layer.bias, mm, out_dtype=jnp.dtype(qa.orig_dtype if out_dtype is None else out_dtype),
                        reduce_dtype=reduce_dtype)


def column_parallel(layer: QuantLinear, x: QuantizedActivation | jax.Array, mesh: Mesh, spec: P = REPLICATED, *,
                    tp_axis: AxisEntry = "tp", out_dtype: Any = None) -> jax.Array:
    """Column-parallel ``layer(x)``: N split over ``tp_axis``, ``x`` replicated over it (``spec`` may
    split its rows over other axes, not K). Output ``[..., N]`` sharded on N; bit-identical to one device."""
    shape = x.orig_shape if isinstance(x, QuantizedActivation) else jnp.shape(x)
    if shard_plan(layer.input_key, shape, spec, mesh).k_parts > 1:
        raise QuantShardingError(f"column parallel takes the whole K per shard; {spec} splits it")
    return sharded_linear(layer, x, mesh, spec, n_axes=tp_axis, out_dtype=out_dtype)


def row_parallel(layer: QuantLinear, x: QuantizedActivation | jax.Array, mesh: Mesh, spec: P, *,
                 out_dtype: Any = None, reduce_dtype: Any = jnp.float32) -> jax.Array:
    """Row-parallel ``layer(x)``: ``x``'s K split as ``spec``'s last entry (the TP axes), the weight's K
    the same way; partials summed with ``lax.psum`` in ``reduce_dtype`` (see the module docstring).
    Output ``[..., N]`` replicated over the TP axes."""
    return sharded_linear(layer, x, mesh, spec, out_dtype=out_dtype, reduce_dtype=reduce_dtype)


def interleave_gate_up(layer: QuantLinear, parts: int) -> QuantLinear:
    """Reorder a merged gate/up layer's rows ``[gate | up]`` to ``[gate_0; up_0; ...; gate_{p-1}; up_{p-1}]``
    (weight, per-channel or 128-row-block scales, bias), so that an even N split over ``parts`` shards
    gives shard ``i`` the pair ``[gate_i; up_i]``."""
    n = layer.out_features
    inter = n // 2
    if n % 2 or inter % parts:
        raise QuantShardingError(f"gate/up with {n} rows does not split into {parts} gate/up pairs")
    if layer.weight_key.format != QuantFormat.FP8:
        raise QuantShardingError(f"tensor parallelism takes fp8 weights, not {layer.weight_key}")

    def perm(rows: int, unit: int) -> np.ndarray:  # rows in units of `unit` weight rows
        return np.arange(rows).reshape(2, parts, inter // parts // unit).transpose(1, 0, 2).reshape(-1)

    ws = layer.weight_scale
    if layer.weight_key == WEIGHT_PER_CHANNEL:
        ws = ws[perm(n, 1)]
    elif layer.weight_key == WEIGHT_BLOCK_128:
        if (inter // parts) % 128:
            raise QuantShardingError(f"128x128 weight blocks: each shard's gate (and up) rows ({inter // parts}) "
                                     "must be a multiple of 128")
        ws = ws[perm(n // 128, 128)]
    bias = None if layer.bias is None else layer.bias[perm(n, 1)]
    return dataclasses.replace(layer, weight=layer.weight[perm(n, 1)], weight_scale=ws, bias=bias)


# ------------------------------------------------------------------ MLP block
@dataclasses.dataclass(frozen=True)
class TPMLPBlock:
    """An :class:`~quantact_jax.mlp.MLPBlock` laid out for tensor parallelism over ``tp_axes``
    (``parts`` shards): gate/up rows interleaved by :func:`interleave_gate_up`, so it is *not* a
    valid single-device block. Build with :func:`shard_mlp_block`; a registered pytree."""

    block: MLPBlock
    tp_axes: tuple[str, ...]
    parts: int


jax.tree_util.register_dataclass(TPMLPBlock, data_fields=["block"], meta_fields=["tp_axes", "parts"])


def _block_specs(block: MLPBlock, mesh: Mesh, tp: Axes) -> MLPBlock:
    return dataclasses.replace(block, norm_weight=P(), gate_up=linear_specs(block.gate_up, mesh, n_axes=tp),
                               down=linear_specs(block.down, mesh, k_axes=tp))


def shard_mlp_block(block: MLPBlock, mesh: Mesh, tp_axis: AxisEntry = "tp") -> TPMLPBlock:
    """Interleave gate/up for the TP axes and place every weight with its TP sharding (gate/up split
    on N, down on K, the RMSNorm weight replicated)."""
    tp = _axes(tp_axis)
    if not tp:
        raise QuantShardingError("name the tensor-parallel mesh axes")
    parts = _size(mesh, tp)
    b = dataclasses.replace(block, gate_up=interleave_gate_up(block.gate_up, parts))
    b = place(b, _block_specs(b, mesh, tp), mesh)
    return TPMLPBlock(b, tp, parts)


def _down_axis_name(key: QuantKey, plan: Any, shard_local_scales: bool) -> Axes | None:
    try:
        return producer_axis_name("silu", key, plan)
    except QuantShardingError as e:
        if shard_local_scales and not key.scale.static and key.scale.group_shape.is_per_token():
            return None
        raise QuantShardingError(
            f"{e}. Under TP each shard holds a K slice of the down projection's input; vLLM quantizes each "
            "slice per token on its own (shard-local scales: a different quantization than one device's). "
            "Pass shard_local_scales=True to accept that, or use a per-group or per-tensor key") from None


def tp_mlp(tp_block: TPMLPBlock, x: jax.Array, mesh: Mesh, spec: P = REPLICATED, *, residual: jax.Array | None = None,
           fused: bool = True, reduce_dtype: Any = jnp.float32, shard_local_scales: bool = False
           ) -> tuple[jax.Array, jax.Array]:
    """:func:`quantact_jax.mlp.mlp` with tensor parallelism: returns ``(out [..., H], residual)``.

    ``x [..., H]`` (and ``residual``) sharded as ``spec``: rows over any non-TP axes, H whole. Each TP
    shard norms and quantizes the (replicated) rows, runs its gate/up columns, SiLU-and-mul and the
    down projection's quantization on its slice ``I/tp``, and its partial down product; one
    ``psum`` over the TP axes in ``reduce_dtype`` (f32) sums them. Everything before the psum is
    bit-identical to one device (dynamic per-tensor keys take a cross-shard amax); the sum differs by
    its order (see the module docstring). A dynamic per-token down key needs whole rows of the
    intermediate activation, which no shard has: rejected unless ``shard_local_scales=True`` (vLLM's
    per-shard scales). Run it under ``jit``: outside it, ``shard_map`` dispatches the plain path's jnp ops
    one by one."""
    block, tp = tp_block.block, tp_block.tp_axes
    if _size(mesh, tp) != tp_block.parts:
        raise QuantShardingError(f"the block was laid out for {tp_block.parts} shards, the mesh has {_size(mesh, tp)} "
                                 f"over {tp}")
    x = jnp.asarray(x)
    gu, dn = block.gate_up, block.down
    spec = P(*spec, *([None] * (x.ndim - len(spec))))
    if set(tp) & {a for e in spec for a in _axes(e)}:
        raise QuantShardingError(f"{spec} uses the TP axes {tp}: the block's input is replicated over them")
    plan_x = shard_plan(gu.input_key, x.shape, spec, mesh)
    ax_norm = producer_axis_name("rms", gu.input_key, plan_x)
    mid_spec = P(*spec[:-1], _entry(tp))
    plan_y = shard_plan(dn.input_key, (*x.shape[:-1], dn.in_features), mid_spec, mesh)
    ax_down = _down_axis_name(dn.input_key, plan_y, shard_local_scales)
    use_norm_q = fused and get_input_quant_key(gu) is not None
    use_silu_q = fused and get_input_quant_key(dn) is not None
    weights = dataclasses.replace(block, down=dataclasses.replace(dn, bias=None))

    def body(x_l, res_l, blk, down_bias):
        g, d = blk.gate_up, blk.down
        if use_norm_q:
            a, res = producers.rms_norm_quant(x_l, blk.norm_weight, layer=g, residual=res_l, eps=blk.eps,
                                              interpret=g.interpret, axis_name=ax_norm)
        else:  # the plain path (mlp.mlp's): vLLM's unfused RMSNorm, then the layer's own quantization
            n, res = reference.rms_norm(x_l, blk.norm_weight, blk.eps, res_l, add_in_f32=False)
            a = _quantize_input(g, n.reshape(x_l.shape), ax_norm)
        h = _consumer(g)(a)  # [..., 2I/tp] = [gate_i | up_i]
        if use_silu_q:
            y = producers.silu_and_mul_quant(h, layer=d, interpret=d.interpret, axis_name=ax_down)
        else:
            y = _quantize_input(d, mlp_mod.silu_and_mul(h), ax_down)
        out = jax.lax.psum(_consumer(d)(y, out_dtype=reduce_dtype), tp)
        if down_bias is not None:  # once, after the sum
            out = out + down_bias.astype(reduce_dtype)
        return out.astype(x_l.dtype), (x_l if res is None else res)

    return shard_map_call(body, mesh, (x, residual, weights, dn.bias),
                          (spec, None if residual is None else spec, _block_specs(weights, mesh, tp),
                           None if dn.bias is None else P()), (spec, spec))

__all__ = ["TPMLPBlock", "column_parallel", "interleave_gate_up", "linear_shardings", "linear_specs", "row_parallel",
           "shard_mlp_block", "sharded_linear", "tp_mlp"]
