"""Attention paths: one way each of computing attention from identical q, k, v (DESIGN §2).

    from driftscope import paths
    attn = paths.get_path("sage8")            # impl "auto": the compiled kernel on CUDA, the emulator on the CPU
    out_BxHqxTqxD = attn(q, k, v, causal=True)

Every path takes q [B,Hq,Tq,D], k and v [B,Hkv,Tk,D] (GQA: Hq a multiple of Hkv, k/v not expanded), `causal` and
`scale` (default 1/sqrt(D)), returns [B,Hq,Tq,D] in q's dtype and never modifies its inputs.

| path             | computation                                                                  |
| fp32             | SDPA in float32 from the same inputs (the oracle)                            |
| fp16             | SDPA in the inputs' half dtype (fp16 or bf16; fp32 inputs compute in fp32)   |
| sage8            | SageAttention 1.0.6 8-bit, smooth-K on                                       |
| sage8-nosmooth   | the same, smooth-K off                                                       |

Sage implementations (`impl`): "kernel" (compiled Triton, CUDA tensors), "interpret" (the same Triton code under
TRITON_INTERPRET=1, CPU tensors, slow), "emulate" (driftscope's vectorized model, any device), "auto". With
`get_path(..., device=...)` "auto" resolves at once ("kernel" for a CUDA device, else "emulate"); without a device it
resolves on each call from q's device, and `.impl` reports the last resolution (before any call: "kernel" if CUDA is
available, else "emulate").

Kernel hazards handled here, before sageattention's asserts (which vanish under -O) could see the inputs:
- k is smoothed in place by `sageattn`: the kernel gets a copy.
- causal with Tq == 1 (decode) runs the non-causal kernel over all keys; 1 < Tq < Tk (chunked prefill) raises
  ChunkedPrefillError; the fp32/fp16 paths handle both with a bottom-right aligned mask.
- head_dim must be 64, 96 or 128 (UnsupportedHeadDimError otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference
from .sage_emulate import quantize_per_block
from .sage_emulate import sage_emulate as _emulate

PATH_NAMES = ("fp32", "fp16", "sage8", "sage8-nosmooth")
SAGE_IMPLS = ("auto", "kernel", "interpret", "emulate")
SUPPORTED_HEAD_DIMS = (64, 96, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["PATH_NAMES", "SAGE_IMPLS", "SUPPORTED_HEAD_DIMS", "AttentionPath", "get_path", "check_head_dim",
           "quantize_per_block", "PathError", "UnknownPathError", "UnsupportedHeadDimError",
           "ChunkedPrefillError", "AttentionInputError"]


class PathError(ValueError):
    """Base of every input error raised by the attention paths."""


class UnknownPathError(PathError):
    """An unknown path name or sage implementation."""


class UnsupportedHeadDimError(PathError):
    """head_dim outside SUPPORTED_HEAD_DIMS for a sage path."""


class ChunkedPrefillError(PathError):
    """causal attention with 1 < q_len < kv_len on a sage path (the causal kernel needs q_len == kv_len)."""


class AttentionInputError(PathError):
    """Inputs of the wrong rank, dtype, device or shape."""


def check_head_dim(head_dim: int, model_name: str | None = None) -> None:
    """Raise UnsupportedHeadDimError unless SageAttention 1.0.6 supports `head_dim`."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        who = f"model {model_name!r} has head_dim {head_dim}" if model_name else f"head_dim {head_dim}"
        raise UnsupportedHeadDimError(
            f"{who}, but SageAttention 1.0.6 supports head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))} only")


def _validate(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionInputError(f"{name} must be a 4-D tensor [B, heads, tokens, head_dim]; got {got}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise AttentionInputError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype=}, {k.dtype=}, "
                                  f"{v.dtype=}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v must be on one device; got {q.device=}, {k.device=}, {v.device=}")
    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if tuple(v.shape) != tuple(k.shape) or Bk != B or Dk != D or Hq % Hkv != 0 or min(Tq, Tk) < 1:
        raise AttentionInputError(
            "expected q [B,Hq,Tq,D] and k, v [B,Hkv,Tk,D] with Hq a multiple of Hkv and Tq, Tk >= 1; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _resolve_causal(q, k, causal: bool, sage: bool) -> bool:
    Tq, Tk = q.shape[2], k.shape[2]
    if not causal or Tq == 1:
        return False  # decode: the last query sees every key
    if Tq > Tk:
        raise AttentionInputError(f"causal attention needs q_len <= kv_len; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Tq < Tk and sage:
        raise ChunkedPrefillError(
            f"chunked prefill (1 < q_len < kv_len: q {tuple(q.shape)}, k {tuple(k.shape)}) is not supported by "
            "SageAttention 1.0.6's causal kernel, which needs q_len == kv_len; prefill the prompt in one call")
    return True


def _default_impl(device) -> str:
    if device is None:
        return "kernel" if torch.cuda.is_available() else "emulate"
    return "kernel" if torch.device(device).type == "cuda" else "emulate"


@dataclass(frozen=True)
class AttentionPath:
    """One attention path. Call it as path(q, k, v, causal=..., scale=None)."""

    name: str  # one of PATH_NAMES
    requested: str  # the impl asked for: "sdpa" for fp32/fp16, else one of SAGE_IMPLS
    _last: list = field(default_factory=list, repr=False, compare=False)  # auto: the last resolved impl

    @property
    def is_sage(self) -> bool:
        return self.name.startswith("sage8")

    @property
    def impl(self) -> str:
        """The resolved implementation: "sdpa", "kernel", "interpret" or "emulate"."""
        if self.requested != "auto":
            return self.requested
        return self._last[-1] if self._last else _default_impl(None)

    def __call__(self, q, k, v, *, causal: bool, scale: float | None = None) -> torch.Tensor:
        _validate(q, k, v)
        if q.device.type == "cpu" and q.shape[0] > 1:
            # batch-invariant by construction: a row of a lockstep batch is bitwise equal to that row run alone
            # (torch's CPU kernels pick other blockings for other batch sizes, e.g. fp32 SDPA at q_len 1)
            return torch.cat([self._one(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal, scale) for i in range(q.shape[0])])
        return self._one(q, k, v, causal, scale)

    def _one(self, q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
        if not self.is_sage:
            _resolve_causal(q, k, causal, sage=False)  # shape check only; SDPA handles every causal case
            return (reference.fp32 if self.name == "fp32" else reference.fp16)(q, k, v, causal=causal, scale=scale)
        check_head_dim(q.shape[-1])
        is_causal = _resolve_causal(q, k, causal, sage=True)
        smooth_k = self.name == "sage8"
        impl = self.requested
        if impl == "auto":
            impl = _default_impl(q.device)
            self._last[:] = [impl]
        if impl == "emulate":
            return _emulate(q, k, v, causal=is_causal, scale=scale, smooth_k=smooth_k)
        if impl == "kernel" and not q.is_cuda:
            raise AttentionInputError(f"the sage 'kernel' implementation needs CUDA tensors; got {q.device=}")
        if impl == "interpret" and q.device.type != "cpu":
            raise AttentionInputError(f"the sage 'interpret' implementation needs CPU tensors; got {q.device=}")
        from . import sage_triton  # imports sageattention lazily, in the right Triton mode
        return sage_triton.sage_forward(q, k, v, causal=is_causal, scale=scale, smooth_k=smooth_k, mode=impl)


def get_path(name: str, impl: str = "auto", device: str | torch.device | None = None) -> AttentionPath:
    """The attention path `name` (one of PATH_NAMES); `impl` picks the sage implementation (ignored for fp32/fp16)."""
    if name not in PATH_NAMES:
        raise UnknownPathError(f"unknown attention path {name!r}; known paths: {', '.join(PATH_NAMES)}")
    if impl not in SAGE_IMPLS:
        raise UnknownPathError(f"unknown sage implementation {impl!r}; known: {', '.join(SAGE_IMPLS)}")
    if not name.startswith("sage8"):
        return AttentionPath(name, "sdpa")
    if impl == "auto" and device is not None:
        impl = _default_impl(device)
    return AttentionPath(name, impl)
