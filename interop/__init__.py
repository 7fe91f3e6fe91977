"""Framework-neutral quantization contract shared by ``quantact_jax`` and ``quantact_torch``.

Imports neither jax nor torch at import time. The DLPack bridge lives in
:mod:`interop.bridge` (imports both lazily).
"""

from interop.dtypes import canonical_dtype, dtype_abbr
from interop.errors import (BridgeError, NoInputQuantKeyError, QuantContractError,
                            QuantKeyMismatchError, QuantLayoutError)
from interop.keys import *  # noqa: F401,F403  (GroupShape, ScaleDesc, QuantKey, constants)
from interop.keys import (ALL_KEYS, GroupShape, InputQuantScales, QuantFormat, QuantKey,
                          ScaleDesc, ScaleDirection, ScaleLayout)
from interop.layout import (check_storage, data_storage, logical_scale_shape, rows_cols,
                            scale_storage_shape)


def __getattr__(name: str):
    # to_jax / to_torch without importing jax or torch until used
    if name in ("to_jax", "to_torch"):
        from interop import bridge

        return getattr(bridge, name)
    raise AttributeError(name)


__version__ = "0.1.0"
