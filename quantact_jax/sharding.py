"""Sharding rules for ``QuantizedActivation``, and the producers and consumer under ``shard_map``.

A data sharding splits the activation's 2-D view ``[M, K]`` (``M`` = the flattened leading
dims) into row blocks and K blocks. The scale must follow it so that every shard's slice of
the global scale storage is exactly the scale storage of its own data shard; then the
global activation is the single-device one, and each shard can be handled by the unsharded
kernels. Per scale layout (storage shapes from :mod:`interop.layout`, ``g`` = group size):

=====================  ================================  =============  ==================  =============
scale                  storage                           rows split     K split             scale spec
=====================  ================================  =============  ==================  =============
per-tensor             ``(1,)``                          any            any                 replicated
per-token              ``[M, 1]``                        any            any (replicated)    ``(rows, -)``
per-channel (static)   ``[1, K]``                        any (repl.)    any                 ``(-, K)``
blocks ``gr x gc``     ``[M/gr, K/gc]``                  ``gr | M/n``   ``gc | K/n``        ``(rows, K)``
group, row-major       ``[M, G]``                        any            ``g | K/n``         ``(rows, K)``
group, col-major       ``[G, M]``                        any            ``g | K/n``         ``(K, rows)``
group, TMA-aligned     ``[G, round_up(M, 4)]``           ``4 | M/n``    ``g | K/n``         ``(K, rows)``
group, packed UE8M0    ``[G/4, round_up(M, 4)]``         ``4 | M/n``    ``4g | K/n``        ``(K, rows)``
group, swizzled 128x4  ``[round_up(M,128), round_up(G,4)]``  ``128 | M/n``  rejected        ``(rows, -)``
=====================  ================================  =============  ==================  =============

Padded layouts pad the *global* ``M``; a row shard that is not a multiple of the padding
quantum would need padding inside the global array, so it is rejected. Swizzled scales store
each 128-row tile as ``[G/4 column tiles, 32, 4, 4]``: a K shard's 4-group column tiles are
interleaved with the other shards' inside every row tile, which no ``PartitionSpec`` of the
``[Mp, Gp]`` storage can select, so a K split is rejected (gather K first, or keep the
K-sharded activation local to one ``shard_map`` body). Leading dims may be sharded only where
each shard's rows stay one contiguous block of ``M`` (e.g. ``P("dp", None, None)`` on
``[B, S, K]``, or ``P("x", "y", None)`` when ``B`` equals the ``"x"`` size).

The Pallas kernels are custom calls that XLA cannot partition (on a GPU, ``jit`` over sharded
inputs would gather them and run the whole kernel on every device), so the ``sharded_*`` ops
below wrap them in ``shard_map``; they work eagerly and inside ``jit`` (inputs are resharded to
the requested spec). What the ops do across shards:

- dynamic per-tensor keys take the global amax with ``lax.pmax`` (exact in any order: bit-exact);
- dynamic per-token keys and RMSNorm need whole rows: a K split is rejected (a cross-shard sum of
  squares would add in another order than the single-device tree, so bits would differ);
- ``sharded_silu_and_mul_quant`` with a K split reads shard ``i`` of ``x [..., 2d]`` as
  ``[gate_i | up_i]`` (the layout a column-parallel gate/up projection produces, see
  :func:`quantact_jax.tp.interleave_gate_up`);
- ``sharded_scaled_mm`` with K split runs each shard's partial GEMM to f32 (scales applied) and
  sums the partials with ``lax.psum`` in ``reduce_dtype`` (f32 by default), then adds the bias once
  and casts. The single-device kernel adds K blocks in sequence, so this is a different summation
  order: equal up to f32 rounding of the reduction, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from interop.errors import QuantShardingError
from interop.keys import GroupShape, QuantKey, ScaleLayout
from interop.layout import data_storage, rows_cols
from quantact_jax import consumers, producers
from quantact_jax import reference as ref
from quantact_jax.activation import QuantizedActivation, as_quantized_activation
from quantact_jax.consumers import MatmulConfig
from quantact_jax.producers import ProducerConfig

Axes = tuple[str, ...]
AxisEntry = str | tuple[str, ...] | None


def _axes(entry: Any) -> Axes:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
        return entry
    raise QuantShardingError(f"unsupported PartitionSpec entry {entry!r}: use None, a mesh axis name or a tuple "
                             "of names")


def _entry(axes: Axes) -> AxisEntry:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _size(mesh: Mesh, axes: Axes) -> int:
    shape = dict(mesh.shape)
    for a in axes:
        if a not in shape:
            raise QuantShardingError(f"mesh axis {a!r} is not in the mesh {tuple(shape)}")
    return math.prod(shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How a data ``PartitionSpec`` splits an activation's ``[M, K]`` view, and the matching scale spec."""

    data_spec: P  # full rank, one entry per data dim
    scale_spec: P
    row_axes: Axes  # mesh axes splitting M, major to minor
    k_axes: Axes
    row_parts: int
    k_parts: int
    local_orig_shape: tuple[int, ...]  # each shard's orig_shape

    @property
    def axes(self) -> Axes:
        """Every mesh axis the data is split over."""
        return self.row_axes + self.k_axes


def _scale_spec(key: QuantKey, row_axes: Axes, k_axes: Axes, n_rows: int, n_k: int, m_loc: int, k_loc: int) -> P:
    desc = key.scale
    gs, lay = desc.group_shape, desc.layout
    if gs.is_per_tensor():
        return P(None)
    gr, gc = gs
    why = None
    if n_rows > 1 and gr > 1 and m_loc % gr:
        why = f"each row shard holds {m_loc} rows, which cuts its {gr}-row scale blocks"
    elif n_k > 1 and gc > 1 and k_loc % gc:
        why = f"each K shard is {k_loc} wide, not a multiple of the {gc}-element scale group"
    elif n_rows > 1 and lay in (ScaleLayout.COL_MAJOR_TMA, ScaleLayout.PACKED_UE8M0) and m_loc % 4:
        why = f"layout {lay} pads M to a multiple of 4, so each row shard must hold a multiple of 4 rows, not {m_loc}"
    elif n_k > 1 and lay == ScaleLayout.PACKED_UE8M0 and k_loc % (4 * gc):
        why = (f"packed UE8M0 holds 4 groups per int32 word, so each K shard must be a multiple of {4 * gc} "
               f"wide, not {k_loc}")
    elif n_rows > 1 and lay == ScaleLayout.SWIZZLED_128x4 and m_loc % 128:
        why = f"swizzled scales are stored in 128-row tiles, so each row shard must hold a multiple of 128 rows, not {m_loc}"
    elif n_k > 1 and lay == ScaleLayout.SWIZZLED_128x4:
        why = ("swizzled scales interleave the 4-group column tiles of all K shards inside every 128-row tile, "
               "so no sharding of the scale storage follows a K split; shard rows only (or gather K)")
    if why:
        raise QuantShardingError(f"{key}: cannot shard its scale like the data ({why})")
    rows = _entry(row_axes) if gr != -1 else None
    ks = _entry(k_axes) if gc != -1 else None
    return P(ks, rows) if lay in (ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA, ScaleLayout.PACKED_UE8M0) \
        else P(rows, ks)


def shard_plan(key: QuantKey, orig_shape: Sequence[int], data_spec: P, mesh: Mesh) -> ShardPlan:
    """Validate ``data_spec`` (the ``PartitionSpec`` of ``data``) for an activation of ``key`` and
    ``orig_shape`` on ``mesh`` and derive the scale's spec; ``QuantShardingError`` if the scale
    layout cannot follow (see the module docstring for the rules)."""
    if not isinstance(key, QuantKey):
        raise TypeError(f"key must be a QuantKey, got {key!r}")
    if not isinstance(data_spec, P):
        raise TypeError(f"data_spec must be a PartitionSpec, got {data_spec!r}")
    orig_shape = tuple(int(s) for s in orig_shape)
    data_shape, _ = data_storage(key, orig_shape)
    if len(data_spec) > len(data_shape):
        raise QuantShardingError(f"{data_spec} has more entries than data {data_shape} has dims")
    entries = [_axes(e) for e in (*data_spec, *([None] * (len(data_shape) - len(data_spec))))]
    flat = [a for e in entries for a in e]
    if len(set(flat)) != len(flat):
        raise QuantShardingError(f"{data_spec} uses a mesh axis twice")
    parts = [_size(mesh, e) for e in entries]
    for d, (size, n) in enumerate(zip(data_shape, parts)):
        if size % n:
            raise QuantShardingError(f"data dim {d} of size {size} does not split evenly into {n} shards ({data_spec})")
    lead, lead_parts = orig_shape[:-1], parts[:-1]
    lead_loc = [d // n for d, n in zip(lead, lead_parts)]
    split = [i for i, n in enumerate(lead_parts) if n > 1]
    if split and any(lead_loc[i] != 1 for i in range(split[-1])):
        raise QuantShardingError(
            f"{data_spec} on data {data_shape}: a shard's rows of the 2-D view [M, K] must be one contiguous "
            f"block, so a leading dim may be split only if every leading dim before it is split down to one "
            f"element per shard; shard the first leading dim (or reshape to [M, K] first)")
    row_axes = tuple(a for e in entries[:-1] for a in e)
    k_axes = entries[-1]
    n_rows, n_k = math.prod(lead_parts), parts[-1]
    m, k = rows_cols(orig_shape)
    m_loc, k_loc = m // n_rows, k // n_k
    scale_spec = _scale_spec(key, row_axes, k_axes, n_rows, n_k, m_loc, k_loc)
    return ShardPlan(P(*(_entry(e) for e in entries)), scale_spec, row_axes, k_axes, n_rows, n_k,
                     (*lead_loc, k_loc))


def scale_spec(key: QuantKey, orig_shape: Sequence[int], data_spec: P, mesh: Mesh) -> P:
    """The ``PartitionSpec`` of the scale storage that follows ``data_spec``."""
    return shard_plan(key, orig_shape, data_spec, mesh).scale_spec


def activation_sharding(data_sharding: NamedSharding | P, key: QuantKey, orig_shape: Sequence[int],
                        orig_dtype: Any, *, mesh: Mesh | None = None) -> QuantizedActivation:
    """The sharding pytree of a ``QuantizedActivation``: a ``QuantizedActivation`` (same static
    metadata, so it matches the activation's tree structure) whose ``data`` and ``scale`` are
    ``NamedSharding``s (given a ``NamedSharding``) or ``PartitionSpec``s (given a spec and ``mesh``).
    Use it for ``jit``'s ``in_shardings``/``out_shardings`` or ``jax.device_put``.
    """
    if isinstance(data_sharding, NamedSharding):
        if mesh is not None and mesh != data_sharding.mesh:
            raise QuantShardingError("mesh differs from the NamedSharding's mesh")
        plan = shard_plan(key, orig_shape, data_sharding.spec, data_sharding.mesh)
        data, scale = (NamedSharding(data_sharding.mesh, s) for s in (plan.data_spec, plan.scale_spec))
    else:
        if mesh is None:
            raise TypeError("pass mesh with a PartitionSpec (the axis sizes decide what is valid)")
        plan = shard_plan(key, orig_shape, data_sharding, mesh)
        data, scale = plan.data_spec, plan.scale_spec
    return QuantizedActivation(data, scale, orig_dtype, tuple(orig_shape), key)


# ------------------------------------------------------------------ producers under shard_map
def place(tree: Any, specs: Any, mesh: Mesh) -> Any:
    """``tree`` with every leaf placed as the matching ``PartitionSpec`` of ``specs`` on ``mesh``
    (``jax.device_put`` leaf by leaf; works eagerly and under ``jit``)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jax.device_put(jnp.asarray(a), NamedSharding(mesh, s))
                                        for a, s in zip(leaves, treedef.flatten_up_to(specs))])


def shard_map_call(body: Callable, mesh: Mesh, args: tuple, specs: tuple, out_specs: Any) -> Any:
    """``shard_map(body)(*args)`` with ``args`` (pytrees) sharded as ``specs`` (matching pytrees of
    ``PartitionSpec``s), each leaf first placed with its ``NamedSharding`` (a no-op when it has it, a
    reshard under ``jit``).

    The leaves cross ``shard_map`` flat and ``body`` gets its pytrees back rebuilt from the local
    leaves: shard_map's prefix matching would rebuild containers with placeholder leaves, which
    validating constructors (``QuantLinear``) refuse. ``check_vma=False``: ``pallas_call`` results
    carry no varying-mesh-axes type (jax 0.10-0.11 refuse them under the check).
    """
    leaves, treedef = jax.tree.flatten(place(args, specs, mesh))
    leaf_specs = treedef.flatten_up_to(specs)

    def flat_body(*local):
        return body(*jax.tree.unflatten(treedef, local))

    return jax.shard_map(flat_body, mesh=mesh, in_specs=tuple(leaf_specs), out_specs=out_specs,
                         check_vma=False)(*leaves)


def producer_axis_name(op: str, key: QuantKey, plan: ShardPlan) -> Axes | None:
    """Check that producer ``op`` (``"quant"``, ``"rms"``, ``"silu"``) can emit ``key`` shard by shard
    under ``plan`` (``QuantShardingError`` otherwise) and return the ``axis_name`` to pass it: the
    axes of a dynamic per-tensor key's cross-shard amax, else ``None``."""
    desc = key.scale
    if plan.k_parts > 1 and op == "rms":
        raise QuantShardingError(
            "rms_norm_quant needs whole rows: a K split would need a cross-shard sum of squares, which adds in "
            "another order than the single-device tree (bits would differ); shard rows only")
    if plan.k_parts > 1 and not desc.static and desc.group_shape.is_per_token():
        raise QuantShardingError(f"{key}: a dynamic per-token scale needs the amax of whole rows; shard rows only "
                                 "(or use a per-group key, whose groups stay inside a K shard)")
    dyn_tensor = not desc.static and desc.group_shape.is_per_tensor()
    return plan.axes if dyn_tensor and plan.axes else None


def _produce(op: str, x: jax.Array, key: QuantKey | None, mesh: Mesh, spec: P, *, layer: Any, scale: Any,
             global_scale: Any, scale_ub: Any, weight: Any = None, residual: Any = None, eps: float = 1e-6,
             config: ProducerConfig | None, interpret: bool | None
             ) -> tuple[QuantizedActivation, jax.Array | None]:
    key, scale, global_scale = producers._key_and_scales(key, layer, scale, global_scale)
    x = jnp.asarray(x)
    if x.ndim < 1 or (op == "silu" and x.shape[-1] % 2):
        raise QuantShardingError(f"{op}: bad input shape {tuple(x.shape)}")
    k = x.shape[-1] // 2 if op == "silu" else x.shape[-1]
    orig_shape = (*x.shape[:-1], k)
    plan = shard_plan(key, orig_shape, spec, mesh)
    axis_name = producer_axis_name(op, key, plan)
    desc = key.scale
    m, _ = rows_cols(orig_shape)
    names, args, specs = ["x"], [x], [plan.data_spec]

    def add(name: str, value: Any, s: P) -> None:
        names.append(name)
        args.append(value)
        specs.append(s)

    if op == "rms":
        add("weight", weight, P())
        if residual is not None:
            add("residual", residual, plan.data_spec)
    if desc.static:
        add("scale", ref.static_scale_storage(key, scale, m, k), plan.scale_spec)
    if global_scale is not None:
        add("global_scale", ref.as_f32_scalar(global_scale, "global_scale"), P())
    if scale_ub is not None:
        add("scale_ub", ref.as_f32_scalar(scale_ub, "scale_ub"), P())

    def body(*local):
        kw = dict(zip(names, local))
        xl = kw.pop("x")
        common = dict(config=config, interpret=interpret, axis_name=axis_name, **kw)
        if op == "rms":
            qa, res = producers.rms_norm_quant(xl, common.pop("weight"), key,
                                               eps=eps, **common)
            return (qa.data, qa.scale) + ((res,) if residual is not None else ())
        fn = producers.quantize if op == "quant" else producers.silu_and_mul_quant
        qa = fn(xl, key, **common)
        return qa.data, qa.scale

    out_specs = (plan.data_spec, plan.scale_spec) + ((plan.data_spec,) if residual is not None else ())
    outs = shard_map_call(body, mesh, tuple(args), tuple(specs), out_specs)
    qa = QuantizedActivation(outs[0], outs[1], x.dtype, orig_shape, key)
    return qa, (outs[2] if residual is not None else None)


def sharded_quantize(x: jax.Array, key: QuantKey | None, mesh: Mesh, spec: P, *, layer: Any = None,
                     scale: Any = None, global_scale: Any = None, scale_ub: Any = None,
                     config: ProducerConfig | None = None, interpret: bool | None = None) -> QuantizedActivation:
    """:func:`quantact_jax.producers.quantize` on ``x`` sharded as ``spec`` over ``mesh``.

    Returns the global activation, with ``data`` sharded as ``spec`` and ``scale`` as
    :func:`scale_spec`; the same bits as the single-device op. Static scales are given in
    their global storage layout. ``QuantShardingError`` for a sharding the key cannot follow.
    """
    return _produce("quant", x, key, mesh, spec, layer=layer, scale=scale, global_scale=global_scale,
                    scale_ub=scale_ub, config=config, interpret=interpret)[0]


def sharded_rms_norm_quant(x: jax.Array, weight: jax.Array, key: QuantKey | None, mesh: Mesh, spec: P, *,
                           layer: Any = None, eps: float = 1e-6, residual: jax.Array | None = None,
                           scale: Any = None, global_scale: Any = None, scale_ub: Any = None,
                           config: ProducerConfig | None = None, interpret: bool | None = None
                           ) -> tuple[QuantizedActivation, jax.Array | None]:
    """:func:`quantact_jax.producers.rms_norm_quant` with rows sharded as ``spec`` (its K entry must
    be ``None``: RMSNorm needs whole rows). Returns ``(activation, residual_out)``; same bits."""
    return _produce("rms", x, key, mesh, spec, layer=layer, scale=scale, global_scale=global_scale,
                    scale_ub=scale_ub, weight=weight, residual=residual, eps=eps, config=config,
                    interpret=interpret)


def sharded_silu_and_mul_quant(x: jax.Array, key: QuantKey | None, mesh: Mesh, spec: P, *, layer: Any = None,
                               scale: Any = None, global_scale: Any = None, scale_ub: Any = None,
                               config: ProducerConfig | None = None, interpret: bool | None = None
                               ) -> QuantizedActivation:
    """:func:`quantact_jax.producers.silu_and_mul_quant` on ``x [..., 2d]`` sharded as ``spec``.

    With a K split, shard ``i`` of ``x`` holds ``[gate_i | up_i]`` (gate/up interleaved per shard,
    as a column-parallel gate/up projection leaves them); the output is ``[..., d]`` sharded as
    ``spec``. Same bits as the single-device op on the de-interleaved ``[gate | up]``.
    """
    return _produce("silu", x, key, mesh, spec, layer=layer, scale=scale, global_scale=global_scale,
                    scale_ub=scale_ub, config=config, interpret=interpret)[0]


# ------------------------------------------------------------------ consumer under shard_map
def weight_specs(weight_key: QuantKey, n: int, k: int, n_axes: Axes, k_axes: Axes, mesh: Mesh) -> tuple[P, P]:
    """Specs of an ``[N, K]`` fp8 weight and its scale split over ``n_axes`` (N) and ``k_axes`` (K)."""
    nn, nk = _size(mesh, n_axes), _size(mesh, k_axes)
    if n % nn or k % nk:
        raise QuantShardingError(f"weight [{n}, {k}] does not split evenly into {nn} x {nk} shards")
    if weight_key == consumers.WEIGHT_PER_TENSOR:
        return P(_entry(n_axes), _entry(k_axes)), P()
    if weight_key == consumers.WEIGHT_PER_CHANNEL:
        return P(_entry(n_axes), _entry(k_axes)), P(_entry(n_axes))
    if weight_key == consumers.WEIGHT_BLOCK_128:
        if (nn > 1 and (n // nn) % 128) or (nk > 1 and (k // nk) % 128):
            raise QuantShardingError(f"128x128 weight scale blocks: each weight shard [{n // nn}, {k // nk}] must be "
                                     "a multiple of 128 along every split dim")
        return P(_entry(n_axes), _entry(k_axes)), P(_entry(n_axes), _entry(k_axes))
    raise QuantShardingError(f"unsupported weight key {weight_key}")


def sharded_gemm(qa: QuantizedActivation, plan: ShardPlan, mesh: Mesh, n_axes: Axes, operands: Any,
                 operand_specs: Any, bias: jax.Array | None, mm: Callable[..., jax.Array], *, out_dtype: Any,
                 reduce_dtype: Any = jnp.float32) -> jax.Array:
    """Run ``mm(qa_local, operands_local, bias_local, dtype)`` (one shard's GEMM) under ``shard_map``.

    ``qa`` is sharded as ``plan``, ``operands`` (a pytree: weights, scales, a layer) as
    ``operand_specs``, ``bias [N]`` over ``n_axes``. Output ``[..., N]``: rows as ``qa``, N over
    ``n_axes``. With a K split, each shard's partial (scales applied, no bias) comes out in
    ``reduce_dtype`` and is summed with ``lax.psum`` over the K axes; the bias is added once after the
    sum, then the result is cast to ``out_dtype``.
    """
    def body(d, s, ops, bias_l):
        qa_l = QuantizedActivation(d, s, qa.orig_dtype, plan.local_orig_shape, qa.quant_key)
        if not plan.k_axes:
            return mm(qa_l, ops, bias_l, out_dtype)
        out = jax.lax.psum(mm(qa_l, ops, None, reduce_dtype), plan.k_axes)
        if bias_l is not None:  # once, after the sum (the kernel's epilogue adds it to the f32 accumulator)
            out = out + bias_l.astype(reduce_dtype)
        return out.astype(out_dtype)

    return shard_map_call(body, mesh, (qa.data, qa.scale, operands, bias),
                          (plan.data_spec, plan.scale_spec, operand_specs, None if bias is None else P(_entry(n_axes))),
                          P(*plan.data_spec[:-1], _entry(n_axes)))


def sharded_scaled_mm(x: QuantizedActivation | jax.Array, weight: jax.Array, weight_scale: jax.Array, mesh: Mesh,
                      spec: P, *, input_quant_key: QuantKey, n_axes: AxisEntry = None,
                      bias: jax.Array | None = None, out_dtype: Any = None, input_scale: Any = None,
                      weight_key: QuantKey | None = None, reduce_dtype: Any = jnp.float32,
                      config: MatmulConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """:func:`quantact_jax.consumers.scaled_mm` with the activation sharded as ``spec`` over ``mesh``.

    - rows split by ``spec``: data parallel, bit-exact;
    - ``n_axes`` splits the weight's N (column parallel): output ``[..., N]`` sharded on its last
      dim, bit-exact (each output element sees the same K loop);
    - a K split in ``spec`` splits the weight's K the same way (row parallel): each shard's partial
      (scales applied) is cast to ``reduce_dtype`` (default f32, the accumulator's dtype) and summed
      with ``lax.psum``; the bias is added once after the sum, then the result is cast to
      ``out_dtype``. Equal to the single-device result up to the reduction order.

    A plain ``x`` is quantized first by :func:`sharded_quantize` (as ``scaled_mm`` does in-kernel).
    """
    if isinstance(x, QuantizedActivation):
        qa = as_quantized_activation(x, input_quant_key)
    else:
        qa = sharded_quantize(x, input_quant_key, mesh, spec, scale=input_scale, interpret=interpret)
    plan = shard_plan(input_quant_key, qa.orig_shape, spec, mesh)
    weight = jnp.asarray(weight)
    if weight.ndim != 2:
        raise QuantShardingError(f"weight must be [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    wkey = weight_key or consumers.weight_key_for(
        weight_scale, n, k, prefer_block=input_quant_key.scale.group_shape == GroupShape(1, 128))
    n_ax = _axes(n_axes)
    out_dtype = jnp.dtype(qa.orig_dtype if out_dtype is None else out_dtype)

    def mm(qa_l, ops, b, dtype):
        return consumers.scaled_mm(qa_l, *ops, bias=b, out_dtype=dtype, input_quant_key=input_quant_key,
                                   weight_key=wkey, config=config, interpret=interpret)

    return sharded_gemm(qa, plan, mesh, n_ax, (weight, jnp.asarray(weight_scale)),
                        weight_specs(wkey, n, k, n_ax, plan.k_axes, mesh), bias, mm, out_dtype=out_dtype,
                        reduce_dtype=reduce_dtype)


__all__ = [
    "ShardPlan",
    "activation_sharding",
    "place",
    "producer_axis_name",
    "scale_spec",
    "shard_map_call",
    "shard_plan",
    "sharded_gemm",
    "sharded_quantize",
    "sharded_rms_norm_quant",
    "sharded_scaled_mm",
    "sharded_silu_and_mul_quant",
    "weight_specs",
]
