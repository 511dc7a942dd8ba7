"""Attention paths: one way each of computing attention from identical q, k, v (DESIGN §2).

    from driftscope import paths
    attn = paths.get_path("sage2-fp8")        # impl "auto": the compiled kernel on CUDA, the emulator on the CPU
    out_BxHqxTqxD = attn(q, k, v, causal=True)
    attn.impl, attn.family, attn.fallback_reason, attn.description   # what ran, and why

Every path takes q [B,Hq,Tq,D], k and v [B,Hkv,Tk,D] (GQA: Hq a multiple of Hkv, k/v not expanded), `causal` and
`scale` (default 1/sqrt(D)), returns [B,Hq,Tq,D] in q's dtype and never modifies its inputs.

| path                   | family | computation (the upstream entry point it models)                               |
| fp32                   | -      | SDPA in float32 from the same inputs (the oracle)                               |
| fp16                   | -      | SDPA in the inputs' half dtype (fp16 or bf16; fp32 inputs compute in fp32)      |
| sage8, sage8-nosmooth  | 1.0.6  | `sageattn`: per-block INT8 Q/K, fp16 P.V (Triton); smooth-K on / off            |
| sage2-triton(-nosmooth)| 2.x    | `sageattn_qk_int8_pv_fp16_triton` (sageattn on sm86); smooth-K on / off         |
| sage2-fp8(-nosmooth)   | 2.x    | `sageattn_qk_int8_pv_fp8_cuda_sm90`, fp32+fp32 (sageattn on sm90, Hopper)       |
| sage2-fp8-ada          | 2.x    | `sageattn_qk_int8_pv_fp8_cuda`, fp32+fp16 (sageattn on sm89, Ada)               |
| sage2-fp16-ampere      | 2.x    | `sageattn_qk_int8_pv_fp16_cuda`, fp32 (sageattn on sm80, A100)                  |

Sage implementations (`impl`): "kernel" (the installed sageattention's compiled kernels, CUDA tensors), "interpret"
(its Triton code under TRITON_INTERPRET=1, CPU tensors, slow; Triton paths of the installed family only), "emulate"
(driftscope's vectorized model, any device, every path), "auto". With `get_path(..., device=...)` "auto" resolves at
once ("kernel" for a CUDA device, else "emulate"); without a device it resolves on each call from q's device.
1.0.6 and 2.x share the import name `sageattention`, so one environment has one family (`installed_sage()`); a
"kernel" or "interpret" request that the installed package cannot serve (the other family, an entry point not built,
a card without the kernel's instructions) runs the emulator instead: `.impl` reports what ran, `.fallback_reason`
why, and a KernelFallbackWarning is issued once per path and reason. `default_quant_path(device)` names the path that
the installed sageattention's own `sageattn` runs on a device.

Kernel rules handled here, before sageattention's asserts (which vanish under -O) could see the inputs:
- 1.0.6 smooths k in place: its kernel gets a copy. 2.x never modifies its inputs.
- causal with Tq == 1 (decode) runs the non-causal kernel over all keys, for every sage path; 1 < Tq < Tk (chunked
  prefill) raises ChunkedPrefillError (1.0.6's and 2.x's Triton causal kernels assert q_len == kv_len, 2.x's CUDA
  kernels align the causal mask top-left, which drops keys the query should see); fp32/fp16 handle both with a
  bottom-right aligned mask.
- head_dim: 1.0.6 takes 64, 96 or 128; 2.x pads any head_dim up to 128 (to 64 or 128) and refuses more
  (UnsupportedHeadDimError). 2.x takes fp16 and bf16 inputs only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from . import installed as _installed
from . import reference
from .catalog import SAGE2_MAX_HEAD_DIM, SAGE_PATHS, SUPPORTED_HEAD_DIMS, SagePath, check_head_dim
from .errors import (AttentionInputError, ChunkedPrefillError, PathError, UnknownPathError, UnsupportedDeviceError,
                     UnsupportedHeadDimError)
from .installed import InstalledSage, default_quant_path, installed_sage
from .sage_emulate import quantize_per_block

PATH_NAMES = ("fp32", "fp16") + tuple(SAGE_PATHS)
SAGE_IMPLS = ("auto", "kernel", "interpret", "emulate")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelFallbackWarning(UserWarning):
    """A requested kernel or interpreter could not run, so the path ran driftscope's emulator."""


__all__ = ["PATH_NAMES", "SAGE_IMPLS", "SAGE_PATHS", "SUPPORTED_HEAD_DIMS", "SAGE2_MAX_HEAD_DIM", "AttentionPath",
           "SagePath", "get_path", "check_head_dim", "installed_sage", "InstalledSage", "default_quant_path",
           "quantize_per_block", "KernelFallbackWarning", "PathError", "UnknownPathError", "UnsupportedHeadDimError",
           "ChunkedPrefillError", "AttentionInputError", "UnsupportedDeviceError"]


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


def _resolve_causal(q, k, causal: bool, spec: SagePath | None) -> bool:
    Tq, Tk = q.shape[2], k.shape[2]
    if not causal or Tq == 1:
        return False  # decode: the last query sees every key
    if Tq > Tk:
        raise AttentionInputError(f"causal attention needs q_len <= kv_len; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Tq < Tk and spec is not None:
        shapes = f"1 < q_len < kv_len: q {tuple(q.shape)}, k {tuple(k.shape)}"
        if spec.family == "1.0.6":
            raise ChunkedPrefillError(
                f"chunked prefill ({shapes}) is not supported by SageAttention 1.0.6's causal kernel, which needs "
                "q_len == kv_len; prefill the prompt in one call")
        raise ChunkedPrefillError(
            f"chunked prefill ({shapes}) is not supported by SageAttention 2.x ({spec.name}): its Triton causal kernel "
            "asserts q_len == kv_len and its CUDA kernels align the causal mask top-left, dropping keys the queries "
            "should see; prefill the prompt in one call")
    return True


def _kernel_problem(spec: SagePath, impl: str, device: torch.device | None) -> str | None:
    """Why `impl` ("kernel" or "interpret") of `spec` cannot run here, or None if it can."""
    sage = _installed.installed_sage()
    if sage is None:
        return "sageattention is not installed"
    if sage.family != spec.family:
        return (f"the installed sageattention is {sage.version} ({sage.family}), and {spec.name} models "
                f"SageAttention {spec.family}")
    if impl == "interpret" and not spec.triton:
        return f"{spec.name} models a CUDA kernel ({spec.function}), which has no Triton code to interpret"
    if spec.family == "2.x" and spec.function not in sage.functions:
        return f"sageattention {sage.version} was built without {spec.function}"
    if impl == "kernel" and spec.family == "2.x" and device is not None and device.type == "cuda":
        from . import sage2_kernel

        return sage2_kernel.capability_problem(spec.function, device)
    return None


_warned: set = set()


def _warn_once(name: str, reason: str) -> None:
    if (name, reason) not in _warned:
        _warned.add((name, reason))
        warnings.warn(f"{name}: running driftscope's emulator instead of the kernel: {reason}", KernelFallbackWarning,
                      stacklevel=4)


@dataclass(frozen=True)
class AttentionPath:
    """One attention path. Call it as path(q, k, v, causal=..., scale=None)."""

    name: str  # one of PATH_NAMES
    requested: str  # the impl asked for: "sdpa" for fp32/fp16, else one of SAGE_IMPLS
    _last: list = field(default_factory=list, repr=False, compare=False)  # the last (impl, fallback_reason)

    @property
    def spec(self) -> SagePath | None:
        """What this sage path models (None for fp32/fp16)."""
        return SAGE_PATHS.get(self.name)

    @property
    def is_sage(self) -> bool:
        return self.name in SAGE_PATHS

    @property
    def family(self) -> str:
        """"1.0.6" or "2.x" for the sage paths (the sageattention release it models), "reference" for fp32/fp16."""
        return self.spec.family if self.is_sage else "reference"

    @property
    def impl(self) -> str:
        """What runs (ran, after a call): "sdpa", "kernel", "interpret" or "emulate"."""
        return self._resolution()[0]

    @property
    def fallback_reason(self) -> str | None:
        """Why a requested kernel or interpreter was replaced by the emulator; None when nothing was replaced."""
        return self._resolution()[1]

    @property
    def description(self) -> str:
        """One line for logs and run files: the path, what it models and what runs."""
        if not self.is_sage:
            return f"{self.name}: torch SDPA ({'float32' if self.name == 'fp32' else 'the inputs dtype'})"
        spec, (impl, reason) = self.spec, self._resolution()
        text = f"{self.name}: SageAttention {spec.family} {spec.function} ({spec.summary}); impl {impl}"
        return text + (f" (fallback: {reason})" if reason else "")

    def _resolution(self, device: torch.device | None = None) -> tuple[str, str | None]:
        if self.requested == "sdpa":
            return "sdpa", None
        if device is None and self._last:
            return self._last[-1]
        req = self.requested
        if req == "auto":
            cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
            if not cuda:
                return "emulate", None
            req = "kernel"
        if req == "emulate":
            return "emulate", None
        problem = _kernel_problem(self.spec, req, device)
        return ("emulate", problem) if problem else (req, None)

    def __call__(self, q, k, v, *, causal: bool, scale: float | None = None) -> torch.Tensor:
        _validate(q, k, v)
        if q.device.type == "cpu" and q.shape[0] > 1:
            # batch-invariant by construction: a row of a lockstep batch is bitwise equal to that row run alone
            # (torch's CPU kernels pick other blockings for other batch sizes, e.g. fp32 SDPA at q_len 1)
            return torch.cat([self._one(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal, scale) for i in range(q.shape[0])])
        return self._one(q, k, v, causal, scale)

    def _one(self, q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
        spec = self.spec
        if spec is None:
            _resolve_causal(q, k, causal, None)  # shape check only; SDPA handles every causal case
            return (reference.fp32 if self.name == "fp32" else reference.fp16)(q, k, v, causal=causal, scale=scale)
        check_head_dim(q.shape[-1], path=self.name)
        if spec.family == "2.x" and q.dtype not in (torch.float16, torch.bfloat16):
            raise AttentionInputError(f"SageAttention 2.x ({self.name}) takes fp16 or bf16 inputs; got {q.dtype}")
        is_causal = _resolve_causal(q, k, causal, spec)
        impl, reason = self._resolution(q.device)
        self._last[:] = [(impl, reason)]
        if reason:
            _warn_once(self.name, reason)
        if impl == "emulate":
            return spec.emulate(q, k, v, causal=is_causal, scale=scale, smooth_k=spec.smooth_k)
        if impl == "kernel" and not q.is_cuda:
            raise AttentionInputError(f"the sage 'kernel' implementation needs CUDA tensors; got {q.device=}")
        if impl == "interpret" and q.device.type != "cpu":
            raise AttentionInputError(f"the sage 'interpret' implementation needs CPU tensors; got {q.device=}")
        if spec.family == "1.0.6":
            from . import sage_triton  # imports sageattention lazily, in the right Triton mode

            return sage_triton.sage_forward(q, k, v, causal=is_causal, scale=scale, smooth_k=spec.smooth_k, mode=impl)
        from . import sage2_kernel

        return sage2_kernel.sage2_forward(self.name, q, k, v, causal=is_causal, scale=scale, mode=impl)


def get_path(name: str, impl: str = "auto", device: str | torch.device | None = None) -> AttentionPath:
    """The attention path `name` (one of PATH_NAMES); `impl` picks the sage implementation (ignored for fp32/fp16)."""
    if name not in PATH_NAMES:
        raise UnknownPathError(f"unknown attention path {name!r}; known paths: {', '.join(PATH_NAMES)}")
    if impl not in SAGE_IMPLS:
        raise UnknownPathError(f"unknown sage implementation {impl!r}; known: {', '.join(SAGE_IMPLS)}")
    if name not in SAGE_PATHS:
        return AttentionPath(name, "sdpa")
    if impl == "auto" and device is not None:
        impl = "kernel" if torch.device(device).type == "cuda" else "emulate"
    return AttentionPath(name, impl)
