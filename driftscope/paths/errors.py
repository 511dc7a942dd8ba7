"""The attention paths' input errors (re-exported by `driftscope.paths`): one sentence naming the bad value."""
from driftscope.errors import DriftscopeError


# ValueError kept as a base so that callers' `except ValueError` still catch it
class PathError(DriftscopeError, ValueError):
    """Base of every input error raised by the attention paths."""


class UnknownPathError(PathError):
    """An unknown path name or sage implementation."""


class UnsupportedHeadDimError(PathError):
    """A head_dim that the path's SageAttention version does not support."""


class ChunkedPrefillError(PathError):
    """causal attention with 1 < q_len < kv_len on a sage path (the causal kernels need q_len == kv_len)."""


class AttentionInputError(PathError):
    """Inputs of the wrong rank, dtype, device or shape."""


class UnsupportedDeviceError(PathError):
    """A device for which the installed sageattention has no kernel that a driftscope path models."""
