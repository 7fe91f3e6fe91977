"""Shapes the contract implies: data and scale storage for a key and an ``orig_shape``.

Everything here is plain Python on ints and canonical dtype names, shared by
the JAX and torch sides so both check the same rule.

Conventions (vLLM's): a tensor of shape ``orig_shape = (*lead, K)`` is viewed
as 2-D ``[M, K]`` with ``M = prod(lead)``. ``data`` keeps the leading dims:
``(*lead, K)`` for 1-byte formats, ``(*lead, K // 2)`` uint8 for packed fp4.
Scales are described on the 2-D view.
"""

from __future__ import annotations

import math
from typing import Sequence

from interop.errors import QuantLayoutError
from interop.keys import GroupShape, QuantKey, ScaleDesc, ScaleLayout


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def cdiv(x: int, m: int) -> int:
    return (x + m - 1) // m


def rows_cols(orig_shape: Sequence[int]) -> tuple[int, int]:
    """``(M, K)`` of the 2-D view."""
    if len(orig_shape) < 1:
        raise QuantLayoutError("orig_shape must have at least one dimension")
    return math.prod(orig_shape[:-1]), int(orig_shape[-1])


def logical_scale_shape(desc: ScaleDesc, m: int, k: int) -> tuple[int, int]:
    """``[M_groups, K_groups]``: one entry per group of ``desc.group_shape``."""
    gr, gc = desc.group_shape
    gr = m if gr == -1 else gr
    gc = k if gc == -1 else gc
    return cdiv(m, max(gr, 1)) if m else 0, cdiv(k, max(gc, 1))


def scale_storage_shape(desc: ScaleDesc, m: int, k: int) -> tuple[int, ...]:
    """Shape of the stored (contiguous) scale array for an ``[M, K]`` tensor."""
    gs = desc.group_shape
    if gs.is_per_tensor():
        return (1,)
    rows, groups = logical_scale_shape(desc, m, k)
    lay = desc.layout
    if lay == ScaleLayout.ROW_MAJOR:
        return (rows, groups)
    if lay == ScaleLayout.COL_MAJOR:
        return (groups, rows)
    if lay == ScaleLayout.COL_MAJOR_TMA:
        return (groups, round_up(rows, 4))
    if lay == ScaleLayout.PACKED_UE8M0:
        return (cdiv(groups, 4), round_up(rows, 4))
    if lay == ScaleLayout.SWIZZLED_128x4:
        return (round_up(rows, 128), round_up(groups, 4))
    raise AssertionError(lay)


def data_storage(key: QuantKey, orig_shape: Sequence[int]) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of ``data`` for ``key`` and ``orig_shape``."""
    k = int(orig_shape[-1])
    if key.is_fp4:
        if k % 2:
            raise QuantLayoutError(f"packed fp4 needs an even last dimension, got orig_shape {tuple(orig_shape)}")
        return (*orig_shape[:-1], k // 2), "uint8"
    return tuple(orig_shape), key.dtype


def check_k_divisible(key: QuantKey, k: int) -> None:
    """Per-group keys need K divisible by the group (vLLM requires it)."""
    g = key.group_size
    if g is not None and k % g:
        raise QuantLayoutError(f"{key}: K={k} is not a multiple of the group size {g}")


def describe(shape: Sequence[int], dtype: str) -> str:
    return f"{tuple(int(s) for s in shape)} {dtype}"


def check_storage(key: QuantKey, orig_shape: Sequence[int], orig_dtype: str,
                  data_shape: Sequence[int], data_dtype: str,
                  scale_shape: Sequence[int], scale_dtype: str) -> None:
    """Raise ``QuantLayoutError`` naming both sides if data/scale contradict the key.

    ``scale_shape`` is the *storage* shape (JAX array shape; for torch, the shape
    of the contiguous storage behind vLLM's view, see ``quantact_torch``).
    """
    from interop.dtypes import FLOAT_INPUT_DTYPES

    if orig_dtype not in FLOAT_INPUT_DTYPES:
        raise QuantLayoutError(f"orig_dtype must be one of {FLOAT_INPUT_DTYPES}, got {orig_dtype}")
    m, k = rows_cols(orig_shape)
    check_k_divisible(key, k)
    want_shape, want_dtype = data_storage(key, orig_shape)
    if tuple(data_shape) != tuple(want_shape) or data_dtype != want_dtype:
        raise QuantLayoutError(
            f"{key}: data is {describe(data_shape, data_dtype)}, but orig_shape {tuple(orig_shape)} "
            f"needs {describe(want_shape, want_dtype)}")
    want_s = scale_storage_shape(key.scale, m, k)
    want_sd = key.scale.storage_dtype
    if tuple(scale_shape) != want_s or scale_dtype != want_sd:
        raise QuantLayoutError(
            f"{key}: scale is {describe(scale_shape, scale_dtype)}, but layout {key.scale.layout} "
            f"for [M={m}, K={k}] needs {describe(want_s, want_sd)}")


def swizzle_index(rows_padded: int, groups_padded: int):
    """Permutation for the 128x4 swizzle, as a NumPy index array.

    ``swizzled.reshape(-1) = logical.reshape(Mp/128, 4, 32, Gp/4, 4)
    .transpose(0, 3, 2, 1, 4).reshape(-1)``: ``perm[i]`` is the flat logical
    index stored at flat storage position ``i``.
    """
    import numpy as np

    idx = np.arange(rows_padded * groups_padded).reshape(rows_padded // 128, 4, 32, groups_padded // 4, 4)
    return idx.transpose(0, 3, 2, 1, 4).reshape(-1)


__all__ = [
    "GroupShape", "round_up", "cdiv", "rows_cols", "logical_scale_shape", "scale_storage_shape",
    "data_storage", "check_k_divisible", "check_storage", "swizzle_index",
]
