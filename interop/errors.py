"""Typed errors of the contract. Raised explicitly (never ``assert``), so they
fire under ``python -O`` too."""


class QuantContractError(Exception):
    """Base class: a quantized activation, key or scale breaks the contract."""


class QuantKeyMismatchError(QuantContractError, TypeError):
    """A ``QuantizedActivation`` reached a consumer that expects another key."""


class QuantLayoutError(QuantContractError, ValueError):
    """Data or scale shape/dtype contradicts the key, its layout or ``orig_shape``."""


class QuantShardingError(QuantContractError, ValueError):
    """A sharding that a quantized activation's scale layout (or an op's reduction) cannot follow."""


class NoInputQuantKeyError(QuantContractError, AttributeError):
    """A layer exposes no input quantization key (its kernel cannot consume one)."""


class BridgeError(QuantContractError, ValueError):
    """A tensor cannot cross the DLPack bridge (strides, device, dtype)."""
