"""Canonical dtype names shared by JAX, NumPy and PyTorch.

A key built from ``torch.float8_e4m3fn`` must equal the key built from
``jnp.float8_e4m3fn`` or the string ``"float8_e4m3fn"``, so the contract stores
dtypes by canonical *name* (NumPy/ml_dtypes spelling). This module imports
neither jax nor torch: it recognises their dtype objects by duck typing.
"""

from __future__ import annotations

from typing import Any

# name -> (torch.fx abbreviation used by vLLM's QuantKey.__str__, itemsize in bytes)
_DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("f32", 4),
    "float16": ("f16", 2),
    "bfloat16": ("bf16", 2),
    "float64": ("f64", 8),
    "float8_e4m3fn": ("f8e4m3fn", 1),
    "float8_e5m2": ("f8e5m2", 1),
    "float8_e8m0fnu": ("f8e8m0fnu", 1),
    "float4_e2m1fn": ("f4e2m1fn", 1),  # unpacked (JAX) fp4; packed fp4 travels as uint8
    "int8": ("i8", 1),
    "uint8": ("u8", 1),
    "int16": ("i16", 2),
    "int32": ("i32", 4),
    "int64": ("i64", 8),
    "bool": ("b8", 1),
}

_ALIASES = {
    "fp32": "float32", "f32": "float32", "float": "float32",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "f8e4m3fn": "float8_e4m3fn",
    "e5m2": "float8_e5m2", "f8e5m2": "float8_e5m2",
    "e8m0": "float8_e8m0fnu", "ue8m0": "float8_e8m0fnu", "f8e8m0fnu": "float8_e8m0fnu",
    "i8": "int8", "u8": "uint8", "i32": "int32", "bool_": "bool",
}

FLOAT_INPUT_DTYPES = ("float32", "float16", "bfloat16")


def canonical_dtype(dtype: Any) -> str:
    """Return the canonical name of a torch, JAX/NumPy or string dtype.

    Raises ``TypeError`` for anything that is not a dtype the contract knows.
    """
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).removeprefix("torch.")  # torch.float8_e4m3fn -> float8_e4m3fn
    else:
        # NumPy dtype, ml_dtypes scalar type, jnp.float8_e4m3fn (a scalar type), np.float32 ...
        name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None)
        if name is None:
            try:  # e.g. jnp.dtype-like objects without .name
                import numpy as np

                name = np.dtype(dtype).name
            except TypeError:
                name = None
    if name is None:
        raise TypeError(f"not a dtype: {dtype!r}")
    name = _ALIASES.get(name, name)
    if name not in _DTYPES:
        raise TypeError(f"dtype {dtype!r} is not supported by the quantact contract "
                        f"(known: {', '.join(sorted(_DTYPES))})")
    return name


def dtype_abbr(dtype: Any) -> str:
    """vLLM's (torch.fx) short name, e.g. ``f8e4m3fn``, used by ``str(QuantKey)``."""
    return _DTYPES[canonical_dtype(dtype)][0]


def itemsize(dtype: Any) -> int:
    return _DTYPES[canonical_dtype(dtype)][1]


def numpy_dtype(dtype: Any):
    """The NumPy dtype (ml_dtypes for fp8/fp4/bf16) of a canonical name."""
    import ml_dtypes
    import numpy as np

    name = canonical_dtype(dtype)
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def torch_dtype(dtype: Any):
    """The torch dtype of a canonical name (imports torch)."""
    import torch

    name = canonical_dtype(dtype)
    out = getattr(torch, name, None)
    if out is None:
        raise TypeError(f"torch {torch.__version__} has no dtype {name}")
    return out


def jax_dtype(dtype: Any):
    """The JAX dtype of a canonical name (imports jax)."""
    import jax.numpy as jnp

    name = canonical_dtype(dtype)
    out = getattr(jnp, name, None)
    if out is None:
        raise TypeError(f"this jax has no dtype {name}")
    return jnp.dtype(out)
