"""SageAttention 2.x's own kernels: compiled (`kernel`, CUDA) or, for its Triton path, under Triton's interpreter.

`kernel` calls the installed 2.x entry points with exactly the arguments that 2.2.0's `sageattn` passes
(`sageattention/core.py`): tensor_layout "HND", is_causal, sm_scale, return_lse=False, and pv_accum_dtype "fp32+fp32"
(sm90), "fp32+fp16" (sm89) or "fp32" (sm80); smooth_k=False for the -nosmooth paths. 2.x never modifies its inputs
(smoothing, padding and the V cast make new tensors), and each entry point calls `torch.cuda.set_device(v.device)`:
the call runs inside `torch.cuda.device(q.device)`, which restores the caller's current device afterwards.

`interpret` (sage2-triton* on CPU tensors) loads upstream's `sageattention/triton/quant_per_block.py`,
`attn_qk_int8_per_block.py` and `attn_qk_int8_per_block_causal.py` from the installed package's files (importing the
package would load its CUDA extensions) with TRITON_INTERPRET=1, and repeats the wrapper's steps: head_dim zero-padded
to 64/128, smooth-K mean handed to the quantizer, V cast to fp16 for bf16 inputs, output sliced back.
Inputs are validated by the caller (`driftscope.paths`); upstream's own checks are asserts.

Checked on an NVIDIA H100 (torch 2.11, triton 3.6, SageAttention built from upstream d1a57a5 for sm90): all six
paths run through this binding with head_dim 64/96/128, fp16/bf16, decode and prefill, leave q, k, v and the current
device unchanged, and reproduce the reference outputs of tests/data/sa2_ref_subset.h5 (computed on an H200) bit for
bit. The interpreter path (triton >= 3.9, so not on that machine) was run on the CPU with upstream's Triton files
from the same commit: bitwise equal to `sage_emulate(..., pad_keys=False, flavor="interpret")` on the subset's cases
(but one element in 2,700 of a 64-token prefill).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from . import sage_triton
from . import installed

# path -> (2.x entry point, the extra keyword arguments sageattn passes)
CALLS = {
    "sage2-triton": ("sageattn_qk_int8_pv_fp16_triton", {}),
    "sage2-triton-nosmooth": ("sageattn_qk_int8_pv_fp16_triton", {"smooth_k": False}),
    "sage2-fp8": ("sageattn_qk_int8_pv_fp8_cuda_sm90", {"pv_accum_dtype": "fp32+fp32"}),
    "sage2-fp8-nosmooth": ("sageattn_qk_int8_pv_fp8_cuda_sm90", {"pv_accum_dtype": "fp32+fp32", "smooth_k": False}),
    "sage2-fp8-ada": ("sageattn_qk_int8_pv_fp8_cuda", {"pv_accum_dtype": "fp32+fp16"}),
    "sage2-fp16-ampere": ("sageattn_qk_int8_pv_fp16_cuda", {"pv_accum_dtype": "fp32"}),
}
# the compute capability each entry point's kernel needs (the sm90 kernel uses wgmma: Hopper only)
MIN_CAPABILITY = {"sageattn_qk_int8_pv_fp16_triton": (8, 0), "sageattn_qk_int8_pv_fp16_cuda": (8, 0),
                  "sageattn_qk_int8_pv_fp8_cuda": (8, 9), "sageattn_qk_int8_pv_fp8_cuda_sm90": (9, 0)}
MAX_CAPABILITY = {"sageattn_qk_int8_pv_fp8_cuda_sm90": (9, 0)}

_interpreted: SimpleNamespace | None = None


@functools.lru_cache(maxsize=None)
def capability_problem(function: str, device: torch.device) -> str | None:
    """Why `function`'s kernel cannot run on CUDA `device`, or None if it can."""
    cap = torch.cuda.get_device_capability(device)
    lo, hi = MIN_CAPABILITY.get(function, (0, 0)), MAX_CAPABILITY.get(function, (99, 99))
    if lo <= cap <= hi:
        return None
    return f"{function} needs compute capability sm{lo[0]}{lo[1]}{'' if hi == (99, 99) else ' exactly'}; " \
           f"{torch.cuda.get_device_name(device)} is sm{cap[0]}{cap[1]}"


def sage2_forward(name: str, q, k, v, *, causal: bool, scale: float | None, mode: str) -> torch.Tensor:
    """Path `name` (a key of CALLS) on validated HND inputs q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]; mode "kernel" (CUDA
    tensors) or "interpret" (sage2-triton* on CPU tensors). `causal` must already be resolved (decode -> False)."""
    function, extra = CALLS[name]
    if mode == "interpret":
        return _interpret(q, k, v, causal, scale, extra.get("smooth_k", True))
    sa = importlib.import_module("sageattention")
    fn = getattr(sa, function, None) or getattr(importlib.import_module("sageattention.core"), function)
    with torch.cuda.device(q.device):
        out = fn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="HND", is_causal=causal,
                 sm_scale=scale, return_lse=False, **extra)
    return out.contiguous()


def _load_interpreted() -> SimpleNamespace:
    """The 2.x Triton quantizer and attention kernels, interpreted, loaded from the installed package's files."""
    global _interpreted
    if _interpreted is not None:
        return _interpreted
    sage = installed.installed_sage()
    if sage is None or sage.family != "2.x":
        raise sage_triton.SageUnavailableError(
            "the 'interpret' implementation of the sage2-triton paths needs SageAttention 2.x installed (built from "
            f"source); found {'none' if sage is None else 'sageattention ' + sage.version}")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit decorates, i.e. when the files below load
    import triton
    import triton.language as tl
    if sage_triton._version_tuple(triton.__version__) < sage_triton.MIN_TRITON_INTERPRET:
        raise sage_triton.SageUnavailableError(
            f"the 'interpret' implementation needs triton >= 3.9 (found {triton.__version__})")
    if not sage_triton._is_interpreted(tl.max):
        raise sage_triton.SageModeError(
            "triton was imported before TRITON_INTERPRET=1 was set in this process, so the 'interpret' "
            "implementation cannot run; set TRITON_INTERPRET=1 in the environment before starting Python")
    folder = Path(next(iter(importlib.util.find_spec("sageattention").submodule_search_locations))) / "triton"
    mods = {}
    for stem in ("quant_per_block", "attn_qk_int8_per_block", "attn_qk_int8_per_block_causal"):
        spec = importlib.util.spec_from_file_location(f"driftscope_sage2_triton.{stem}", folder / f"{stem}.py")
        mods[stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[stem])
    _interpreted = SimpleNamespace(per_block_int8=mods["quant_per_block"].per_block_int8,
                                   attn_false=mods["attn_qk_int8_per_block"].forward,
                                   attn_true=mods["attn_qk_int8_per_block_causal"].forward)
    return _interpreted


def _interpret(q, k, v, causal, scale, smooth_k) -> torch.Tensor:
    """sageattn_qk_int8_pv_fp16_triton's steps (core.py) around the interpreted kernels."""
    fns = _load_interpreted()
    dtype, D = q.dtype, q.shape[-1]
    padded = 64 if D < 64 else 128 if 64 < D < 128 else D
    q, k, v = (torch.nn.functional.pad(t, (0, padded - D)).contiguous() for t in (q, k, v))
    km = k.mean(dim=2, keepdim=True) if smooth_k else None
    v = v.to(torch.float16)
    sm_scale = 1.0 / (D ** 0.5) if scale is None else scale
    q8, qs, k8, ks = fns.per_block_int8(q, k, km=km, sm_scale=sm_scale, tensor_layout="HND")
    if causal:  # the causal kernel reads one k_scale past its buffer: read 0.0 there (see sage_triton)
        o, _ = fns.attn_true(q8, k8, v, qs, sage_triton._with_zero_slack(ks), tensor_layout="HND", output_dtype=dtype)
    else:
        o, _ = fns.attn_false(q8, k8, v, qs, ks, tensor_layout="HND", output_dtype=dtype)
    return o[..., :D].contiguous()
