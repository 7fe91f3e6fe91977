"""The quantization contract: ``GroupShape``, ``ScaleDesc``, ``QuantKey`` and vLLM's constants.

Mirrors ``vllm/model_executor/layers/quantization/utils/quant_utils.py`` (same
fields, value equality, hashing and ``str()``), with two additions vLLM leaves
as TODOs:

1. ``ScaleDesc.layout`` (and ``ue8m0``): how the scale tensor is laid out and
   padded in memory is part of the key, so a producer writing column-major
   scales never feeds a consumer that reads row-major ones.
2. ``InputQuantScales``: the scales a consumer exposes next to its key (static
   input scale, NVFP4 global scale) with the direction the producer applies
   them in.

Dtypes are stored by canonical name (see :mod:`interop.dtypes`), so keys built
from torch, JAX/NumPy or string dtypes compare and hash equal.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from typing import Any, ClassVar, NamedTuple

from interop.dtypes import canonical_dtype, dtype_abbr


class _GroupShape(NamedTuple):
    row: int
    col: int


class GroupShape(_GroupShape):
    """Shape of the element group one scale covers; ``-1`` means the full extent.

    Applies to the 2-D view ``[M, K]`` of a tensor (leading dims flattened into M).
    """

    PER_TENSOR: ClassVar[GroupShape]
    PER_TOKEN: ClassVar[GroupShape]
    PER_CHANNEL: ClassVar[GroupShape]

    def is_per_tensor(self) -> bool:
        return self.row == -1 and self.col == -1

    def is_per_token(self) -> bool:
        return self.row == 1 and self.col == -1

    def is_per_channel(self) -> bool:
        return self.row == -1 and self.col == 1

    def is_per_group(self) -> bool:
        return self.row == 1 and self.col >= 1


GroupShape.PER_TENSOR = GroupShape(-1, -1)
GroupShape.PER_TOKEN = GroupShape(1, -1)
GroupShape.PER_CHANNEL = GroupShape(-1, 1)


class ScaleLayout(enum.Enum):
    """How a scale tensor is stored. ``[M, G]`` is the logical scale matrix
    (M tokens, G = groups along K). The *storage* shape is what a JAX array
    holds (JAX has no strides); the torch mirror holds vLLM's strided view of
    the same bytes (see ``interop.layout``)."""

    ROW_MAJOR = "row_major"  # storage [M, G]
    COL_MAJOR = "col_major"  # storage [G, M] (M contiguous); torch view [M, G], strides (1, M)
    COL_MAJOR_TMA = "col_major_tma"  # storage [G, round_up(M, 4)], pad rows zero
    PACKED_UE8M0 = "packed_ue8m0"  # int32 storage [ceil(G/4), round_up(M, 4)]; byte i of word j = group 4j+i
    SWIZZLED_128x4 = "swizzled_128x4"  # storage [round_up(M,128), round_up(G,4)] in the 128x4 tile order

    def __str__(self) -> str:
        return self.value


def default_layout(dtype: str, group_shape: GroupShape) -> ScaleLayout:
    """The layout vLLM's kernels produce when none is named: swizzled for the
    block-scaled formats (NVFP4: fp8 scales per 16; MX: e8m0 scales per 32),
    row-major otherwise."""
    if group_shape.is_per_group() and (
        (dtype == "float8_e4m3fn" and group_shape.col == 16)
        or (dtype == "float8_e8m0fnu" and group_shape.col == 32)
    ):
        return ScaleLayout.SWIZZLED_128x4
    return ScaleLayout.ROW_MAJOR


@dataclasses.dataclass(frozen=True, init=False)
class ScaleDesc:
    """One scaling factor: its dtype, static or dynamic, group shape, and (beyond
    vLLM) its memory layout and whether values are rounded up to powers of two
    (UE8M0, DeepGEMM style) while stored as f32.

    ``str()`` equals vLLM's when the layout is the default and ``ue8m0`` is off.
    """

    dtype: str
    static: bool
    group_shape: GroupShape
    layout: ScaleLayout
    ue8m0: bool

    def __init__(self, dtype: Any, static: bool, group_shape: tuple[int, int],
                 layout: ScaleLayout | str | None = None, ue8m0: bool = False):
        dt = canonical_dtype(dtype)
        gs = GroupShape(*group_shape)
        lay = default_layout(dt, gs) if layout is None else ScaleLayout(layout)
        if lay == ScaleLayout.PACKED_UE8M0:
            ue8m0 = True
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "static", bool(static))
        object.__setattr__(self, "group_shape", gs)
        object.__setattr__(self, "layout", lay)
        object.__setattr__(self, "ue8m0", bool(ue8m0))
        self._validate()

    def _validate(self) -> None:
        r, c = self.group_shape
        if r == 0 or c == 0 or r < -1 or c < -1:
            raise ValueError(f"invalid group shape {self.group_shape}")
        if self.layout in (ScaleLayout.COL_MAJOR, ScaleLayout.COL_MAJOR_TMA,
                           ScaleLayout.PACKED_UE8M0) and not self.group_shape.is_per_group():
            raise ValueError(f"layout {self.layout} needs a per-token-group scale, got {self.group_shape}")
        if self.layout == ScaleLayout.PACKED_UE8M0 and self.dtype != "float32":
            raise ValueError("packed UE8M0 scales are described as float32 values rounded to powers of two")
        if self.layout == ScaleLayout.SWIZZLED_128x4 and not self.group_shape.is_per_group():
            raise ValueError("swizzled 128x4 scales need a per-token-group scale")
        if self.ue8m0 and self.dtype != "float32":
            raise ValueError("ue8m0 rounding applies to float32 scales; use dtype float8_e8m0fnu for MX")

    def with_layout(self, layout: ScaleLayout | str, ue8m0: bool | None = None) -> ScaleDesc:
        return ScaleDesc(self.dtype, self.static, self.group_shape, layout,
                         self.ue8m0 if ue8m0 is None else ue8m0)

    @property
    def storage_dtype(self) -> str:
        """dtype of the stored scale tensor (int32 words for packed UE8M0)."""
        return "int32" if self.layout == ScaleLayout.PACKED_UE8M0 else self.dtype

    def __str__(self) -> str:
        gs = self.group_shape
        g = "per_tensor" if gs == GroupShape.PER_TENSOR else (
            "per_token" if gs == GroupShape.PER_TOKEN else str(gs))
        extra = ""
        if self.layout != default_layout(self.dtype, gs):
            extra += f",{self.layout}"
        if self.ue8m0 and self.layout != ScaleLayout.PACKED_UE8M0:
            extra += ",ue8m0"
        return f"{dtype_abbr(self.dtype)},{'static' if self.static else 'dynamic'},{g}{extra}"


class QuantFormat(enum.Enum):
    """The element format a key describes (derived, not a field)."""

    FP8 = "fp8"
    INT8 = "int8"
    NVFP4 = "nvfp4"
    MXFP8 = "mxfp8"
    MXFP4 = "mxfp4"


@dataclasses.dataclass(frozen=True, init=False)
class QuantKey:
    """Identifies a quantization scheme: quantized dtype, scale(s), symmetry.

    ``dtype`` is the stored element dtype; packed fp4 is ``uint8`` as in vLLM
    (two e2m1 codes per byte, element 2i in the low nibble).
    """

    dtype: str
    scale: ScaleDesc
    scale2: ScaleDesc | None
    symmetric: bool

    def __init__(self, dtype: Any, scale: ScaleDesc, scale2: ScaleDesc | None = None,
                 symmetric: bool = True):
        object.__setattr__(self, "dtype", canonical_dtype(dtype))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "scale2", scale2)
        object.__setattr__(self, "symmetric", bool(symmetric))
        self.format  # validates the combination

    @property
    def format(self) -> QuantFormat:
        d, sd = self.dtype, self.scale.dtype
        if d == "float8_e4m3fn":
            return QuantFormat.MXFP8 if sd == "float8_e8m0fnu" else QuantFormat.FP8
        if d == "int8":
            return QuantFormat.INT8
        if d == "uint8" and sd == "float8_e4m3fn":
            return QuantFormat.NVFP4
        if d == "uint8" and sd == "float8_e8m0fnu":
            return QuantFormat.MXFP4
        raise ValueError(f"unsupported quantized dtype / scale dtype pair: {d} / {sd}")

    @property
    def is_fp4(self) -> bool:
        return self.format in (QuantFormat.NVFP4, QuantFormat.MXFP4)

    @property
    def group_size(self) -> int | None:
        """Elements per scale along K for per-token-group keys, else None."""
        gs = self.scale.group_shape
        return gs.col if gs.is_per_group() else None

    def with_layout(self, layout: ScaleLayout | str, ue8m0: bool | None = None) -> QuantKey:
        """The same key with another scale layout (e.g. column-major for DeepGEMM)."""
        return QuantKey(self.dtype, self.scale.with_layout(layout, ue8m0), self.scale2, self.symmetric)

    def __str__(self) -> str:
        scale2 = f"scale2({self.scale2})," if self.scale2 else ""
        return (f"QuantKey({dtype_abbr(self.dtype)},scale({self.scale}),{scale2}"
                f"{'a' if not self.symmetric else ''}symmetric)")


class ScaleDirection(enum.Enum):
    """How a producer applies a scale a consumer exposes."""

    DEQUANT = "dequant"  # x ~= q * s: the producer divides by s (or multiplies by 1/s)
    QUANT = "quant"  # q ~= x * s: the producer multiplies by s (NVFP4 global scale 448*6/amax)


@dataclasses.dataclass(frozen=True)
class InputQuantScales:
    """The scales a consumer exposes next to its input key, so producers never
    read kernel-specific layer attributes. Values are arrays of either framework.

    - ``input_scale``: static input scale (``DEQUANT`` direction), shape ``(1,)``
      for per-tensor (or the key's static scale shape).
    - ``global_scale``: NVFP4 second-level scale, in ``global_scale_direction``.
    """

    input_scale: Any = None
    global_scale: Any = None
    global_scale_direction: ScaleDirection = ScaleDirection.QUANT


# ---- vLLM's constants ---------------------------------------------------------------
FP8_DTYPE = "float8_e4m3fn"
FP4_DTYPE = "uint8"  # packed e2m1 pairs, as vLLM
INT8_DTYPE = "int8"

kStaticTensorScale = ScaleDesc("float32", True, GroupShape.PER_TENSOR)
kDynamicTensorScale = ScaleDesc("float32", False, GroupShape.PER_TENSOR)
kStaticTokenScale = ScaleDesc("float32", True, GroupShape.PER_TOKEN)
kDynamicTokenScale = ScaleDesc("float32", False, GroupShape.PER_TOKEN)
kStaticChannelScale = ScaleDesc("float32", True, GroupShape.PER_CHANNEL)
kDynamic128Scale = ScaleDesc("float32", False, GroupShape(1, 128))
kDynamic64Scale = ScaleDesc("float32", False, GroupShape(1, 64))
kStatic128BlockScale = ScaleDesc("float32", True, GroupShape(128, 128))
kNvfp4DynamicGroupScale = ScaleDesc(FP8_DTYPE, False, GroupShape(1, 16))
kNvfp4StaticGroupScale = ScaleDesc(FP8_DTYPE, True, GroupShape(1, 16))
kMxDynamicGroupScale = ScaleDesc("float8_e8m0fnu", False, GroupShape(1, 32))
kMxStaticGroupScale = ScaleDesc("float8_e8m0fnu", True, GroupShape(1, 32))

kFp8StaticTensorSym = QuantKey(FP8_DTYPE, kStaticTensorScale)
kFp8DynamicTensorSym = QuantKey(FP8_DTYPE, kDynamicTensorScale)
kFp8StaticTokenSym = QuantKey(FP8_DTYPE, kStaticTokenScale)
kFp8DynamicTokenSym = QuantKey(FP8_DTYPE, kDynamicTokenScale)
kFp8StaticChannelSym = QuantKey(FP8_DTYPE, kStaticChannelScale)
kFp8Dynamic128Sym = QuantKey(FP8_DTYPE, kDynamic128Scale)
kFp8Dynamic64Sym = QuantKey(FP8_DTYPE, kDynamic64Scale)
kFp8Static128BlockSym = QuantKey(FP8_DTYPE, kStatic128BlockScale)
kNvfp4Dynamic = QuantKey(FP4_DTYPE, kNvfp4DynamicGroupScale, scale2=kStaticTensorScale)
kNvfp4Static = QuantKey(FP4_DTYPE, kNvfp4StaticGroupScale, scale2=kStaticTensorScale)
kNvfp4Quant = kNvfp4Dynamic  # vLLM's older name
kMxfp8Dynamic = QuantKey(FP8_DTYPE, kMxDynamicGroupScale)
kMxfp8Static = QuantKey(FP8_DTYPE, kMxStaticGroupScale)
kMxfp4Dynamic = QuantKey(FP4_DTYPE, kMxDynamicGroupScale)
kMxfp4Static = QuantKey(FP4_DTYPE, kMxStaticGroupScale)
kInt8StaticTensorSym = QuantKey(INT8_DTYPE, kStaticTensorScale)
kInt8StaticChannelSym = QuantKey(INT8_DTYPE, kStaticChannelScale)
kInt8DynamicTokenSym = QuantKey(INT8_DTYPE, kDynamicTokenScale)

#: Every named key, by its vLLM constant name.
ALL_KEYS: dict[str, QuantKey] = {
    name: value for name, value in list(globals().items())
    if name.startswith("k") and isinstance(value, QuantKey) and name != "kNvfp4Quant"
}


# ---- parsing ``str(key)`` back -------------------------------------------------------
_SCALE_RE = r"(\w+),(static|dynamic),(per_tensor|per_token|GroupShape\(row=(-?\d+), col=(-?\d+)\))((?:,\w+)*)"
_KEY_RE = re.compile(rf"QuantKey\((\w+),scale\({_SCALE_RE}\),(?:scale2\({_SCALE_RE}\),)?(a?symmetric)\)")


def _parse_scale(abbr: str, kind: str, gs: str, row: str | None, col: str | None, extras: str) -> ScaleDesc:
    group = {"per_tensor": GroupShape.PER_TENSOR, "per_token": GroupShape.PER_TOKEN}.get(gs)
    flags = [f for f in extras.split(",") if f]
    layouts = [f for f in flags if f != "ue8m0"]
    if len(layouts) > 1:
        raise ValueError(f"more than one scale layout in {extras!r}")
    return ScaleDesc(canonical_dtype(abbr), kind == "static", group or (int(row), int(col)),
                     layouts[0] if layouts else None, ue8m0="ue8m0" in flags)


@functools.lru_cache(maxsize=1024)
def parse_quant_key(text: str) -> QuantKey:
    """Inverse of ``str(QuantKey)`` (vLLM's format plus the layout/ue8m0 extras); also accepts a
    constant name from :data:`ALL_KEYS` (``"kFp8DynamicTokenSym"``).

    Used where a key must travel as a string, e.g. through a ``torch.library`` custom op schema.
    Raises ``ValueError`` for text that is not exactly the string of some key.
    """
    if text in ALL_KEYS:
        return ALL_KEYS[text]
    mt = _KEY_RE.fullmatch(text)
    if mt is None:
        raise ValueError(f"not a QuantKey string or constant name: {text!r}")
    g = mt.groups()
    key = QuantKey(canonical_dtype(g[0]), _parse_scale(*g[1:7]), _parse_scale(*g[7:13]) if g[7] else None,
                   symmetric=g[13] == "symmetric")
    if str(key) != text:  # e.g. a redundant default layout spelled out
        raise ValueError(f"{text!r} is not in canonical form; the key it names prints as {key}")
    return key
