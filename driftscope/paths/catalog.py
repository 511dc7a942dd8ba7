"""What each sage path models: the upstream entry point, its family and its emulator (the registry's table).

The 1.0.6 entry point is `sageattention/core.py:sageattn` of sageattention 1.0.6; the 2.x ones are in
`sageattention/core.py` of thu-ml/SageAttention 2.2.0, with the pv_accum_dtype that 2.2.0's `sageattn` passes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from . import sage2_cuda_emulate as _cuda_emu  # modules, not their same-named functions: never shadow a submodule
from . import sage2_triton_emulate as _triton_emu
from .errors import UnsupportedHeadDimError
from .sage_emulate import sage_emulate as _emulate

SUPPORTED_HEAD_DIMS = (64, 96, 128)  # SageAttention 1.0.6
SAGE2_MAX_HEAD_DIM = 128  # SageAttention 2.x pads head_dim to 64 or 128


@dataclass(frozen=True)
class SagePath:
    """What a sage path models."""

    name: str
    family: str  # "1.0.6" or "2.x": the sageattention release family that ships the kernel
    function: str  # the upstream entry point (sageattention.core)
    smooth_k: bool
    triton: bool  # Triton kernels, so an 'interpret' implementation exists when this family is installed
    summary: str  # one line for tables and run files
    emulate: Callable = field(repr=False)  # emulate(q, k, v, *, causal, scale, smooth_k) -> out


def _sage_paths() -> dict[str, SagePath]:
    e106 = _emulate
    sm90 = functools.partial(_cuda_emu.sage2_cuda_emulate, kernel=_cuda_emu.SM90)
    tri = "per-block INT8 Q/K, fp16 P.V, fp32 accumulator (Triton)"
    fp8 = "per-thread INT8 Q/K, FP8 P and V"
    rows = [
        ("sage8", "1.0.6", "sageattn", True, True, "per-block INT8 Q/K, fp16 P.V (Triton), smooth-K", e106),
        ("sage8-nosmooth", "1.0.6", "sageattn", False, True, "the same without smooth-K", e106),
        ("sage2-triton", "2.x", "sageattn_qk_int8_pv_fp16_triton", True, True, f"{tri}, smooth-K; sm86",
         _triton_emu.sage2_triton_emulate),
        ("sage2-triton-nosmooth", "2.x", "sageattn_qk_int8_pv_fp16_triton", False, True, f"{tri}, no smooth-K",
         _triton_emu.sage2_triton_emulate),
        ("sage2-fp8", "2.x", "sageattn_qk_int8_pv_fp8_cuda_sm90", True, False,
         f"{fp8}, FP8 MMA + fp32 buffer (fp32+fp32), smooth-K; sm90", sm90),
        ("sage2-fp8-nosmooth", "2.x", "sageattn_qk_int8_pv_fp8_cuda_sm90", False, False,
         f"{fp8}, fp32+fp32, no smooth-K", sm90),
        ("sage2-fp8-ada", "2.x", "sageattn_qk_int8_pv_fp8_cuda", True, False,
         f"{fp8}, fp16 MMA accumulator + fp32 buffer (fp32+fp16), smooth-K; sm89",
         functools.partial(_cuda_emu.sage2_cuda_emulate, kernel=_cuda_emu.SM89)),
        ("sage2-fp16-ampere", "2.x", "sageattn_qk_int8_pv_fp16_cuda", True, False,
         "per-thread INT8 Q/K, fp16 P.V, fp32 accumulation (fp32), smooth-K; sm80",
         functools.partial(_cuda_emu.sage2_cuda_emulate, kernel=_cuda_emu.SM80)),
    ]
    return {r[0]: SagePath(*r) for r in rows}


SAGE_PATHS = _sage_paths()


def check_head_dim(head_dim: int, model_name: str | None = None, path: str | None = None) -> None:
    """Raise UnsupportedHeadDimError unless `path`'s SageAttention version supports `head_dim` (default: 1.0.6's)."""
    who = f"model {model_name!r} has head_dim {head_dim}" if model_name else f"head_dim {head_dim}"
    spec = SAGE_PATHS.get(path) if path else None
    if spec is not None and spec.family == "2.x":
        if not 1 <= head_dim <= SAGE2_MAX_HEAD_DIM:
            raise UnsupportedHeadDimError(
                f"{who}, but SageAttention 2.x ({path}) supports head_dim up to {SAGE2_MAX_HEAD_DIM} only "
                "(it pads smaller ones to 64 or 128)")
    elif head_dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedHeadDimError(
            f"{who}, but SageAttention 1.0.6 supports head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))} only")
