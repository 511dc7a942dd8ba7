"""SageAttention 1.0.6's own Triton kernels: compiled on CUDA (`kernel`) or run by Triton's interpreter (`interpret`).

The interpreter is selected when `triton.jit` decorates a function, i.e. when `sageattention` is first imported, so
`TRITON_INTERPRET=1` must be in the environment before that import. This module is the only place that imports
`sageattention`, and it does so lazily: on a machine without CUDA it sets the variable itself. One process runs the
kernels in one mode only; asking for the other raises `SageModeError` (run it in a subprocess, as
`experiments/gpu_fidelity.py` does).

`sage_forward` mirrors `sageattention.sageattn` (core.py) step by step but calls the package's per-block quantizer and
attention `forward` functions directly, because `sageattn` asserts `q.is_cuda`:
    smooth k in the input dtype (k - mean over tokens, on a copy: `sageattn` does `k -= km` in place);
    v cast to fp16 for bf16/fp32 inputs;
    head_dim 96 uses the `_hd96` quantizer and `_h96` kernels.
Inputs are validated by the caller (`driftscope.paths`): sageattention's own checks are asserts.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

import torch

from driftscope.errors import DriftscopeError

MIN_TRITON_INTERPRET = (3, 9)


class SageUnavailableError(DriftscopeError, RuntimeError):
    """sageattention / triton missing, or too old for the interpreter."""


class SageModeError(DriftscopeError, RuntimeError):
    """The kernels were already imported in the other mode (compiled vs interpreted) in this process."""


_loaded: dict[str, SimpleNamespace] = {}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def load(mode: str) -> SimpleNamespace:
    """The sageattention functions for `mode` ("kernel" or "interpret"); imports sageattention on first use."""
    if mode in _loaded:
        return _loaded[mode]
    want_interp = mode == "interpret"
    already = "sageattention" in sys.modules or "sageattention.core" in sys.modules
    if want_interp and not already:
        # triton reads this knob when `triton.jit` decorates, so it still applies to modules imported from here on
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        core = importlib.import_module("sageattention.core")
    except ImportError as e:
        extra = "interpret" if want_interp else "sage"
        raise SageUnavailableError(
            f"the sage {mode!r} implementation needs sageattention==1.0.6 and triton"
            f"{'>=3.9' if want_interp else ''} (pip install 'driftscope[{extra}]'): {e}") from e
    tv = _version_tuple(triton.__version__)
    if want_interp and tv < MIN_TRITON_INTERPRET:
        raise SageUnavailableError(
            f"the 'interpret' implementation needs triton >= 3.9 (found {triton.__version__}); "
            "triton 3.6's interpreter fails on SageAttention's kernels")
    from sageattention import attn_qk_int8_per_block as nc
    is_interp = _is_interpreted(nc._attn_fwd)
    if is_interp != want_interp:
        have = "interpreted (TRITON_INTERPRET=1)" if is_interp else "compiled"
        raise SageModeError(
            f"sageattention was already imported {have} in this process, so the {mode!r} implementation cannot run "
            "here; use one mode per process (run the other in a subprocess with TRITON_INTERPRET set accordingly)")
    import triton.language as tl

    # triton's own @jit helpers (tl.max, ...) were decorated when triton was first imported: if that happened
    # before TRITON_INTERPRET was set (torch's profiler or inductor import triton), they stay compiled.
    if want_interp and not _is_interpreted(tl.max):
        raise SageModeError(
            "triton was imported before TRITON_INTERPRET=1 was set in this process, so its own library functions "
            "are compiled and the 'interpret' implementation cannot run; set TRITON_INTERPRET=1 in the environment "
            "before starting Python")
    ns = SimpleNamespace(
        per_block_int8=core.per_block_int8, per_block_int8_hd96=core.per_block_int8_hd96,
        attn_false=core.attn_false, attn_true=core.attn_true,
        attn_h96_false=core.attn_h96_false, attn_h96_true=core.attn_h96_true,
        triton_version=triton.__version__)
    _loaded[mode] = ns
    return ns


def sage_forward(q, k, v, *, causal: bool, scale: float | None, smooth_k: bool, mode: str,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SageAttention 1.0.6 on validated HND inputs q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]; never modifies its inputs.

    mode "kernel" wants CUDA tensors, "interpret" CPU tensors. `causal` must already be resolved (decode -> False).
    `out_dtype` (default q's) is the kernel's own output cast: float32 shows its accumulator before rounding.
    """
    fns = load(mode)
    if q.is_cuda:  # Triton launches on the current device; under --device-map a layer may live on another GPU
        with torch.cuda.device(q.device):
            return _forward(fns, q, k, v, causal, scale, smooth_k, out_dtype or q.dtype)
    return _forward(fns, q, k, v, causal, scale, smooth_k, out_dtype or q.dtype)


def _forward(fns, q, k, v, causal, scale, smooth_k, out_dtype) -> torch.Tensor:
    dtype = q.dtype
    q = q.contiguous()
    k = k.clone(memory_format=torch.contiguous_format)  # the copy sageattn's in-place smoothing would otherwise hit
    if smooth_k:
        km = k.mean(dim=2, keepdim=True)  # [B,Hkv,1,D], input dtype, exactly as sageattn
        k -= km
    v = v.contiguous()
    if dtype in (torch.bfloat16, torch.float32):
        v = v.to(torch.float16)
    if q.size(-1) == 96:
        q8, qs, k8, ks = fns.per_block_int8_hd96(q, k, sm_scale=scale, tensor_layout="HND")
        attn = fns.attn_h96_true if causal else fns.attn_h96_false
    else:
        q8, qs, k8, ks = fns.per_block_int8(q, k, sm_scale=scale, tensor_layout="HND")
        attn = fns.attn_true if causal else fns.attn_false
    if causal and not q.is_cuda:
        ks = _with_zero_slack(ks)
    return attn(q8, k8, v, qs, ks, tensor_layout="HND", output_dtype=out_dtype)


def _with_zero_slack(scales: torch.Tensor) -> torch.Tensor:
    """The same k scales, in a buffer followed by zeros.

    When kv_len mod 128 is in (0, 64] the causal kernel reads one k_scale past the end of its buffer (see the
    README's quirks). On the GPU that read returns whatever lies there (NaN outputs were seen on an H100); under
    the interpreter it made tests flaky. Here it reads 0.0, as the interpreted reference must be deterministic.
    """
    buf = torch.zeros(scales.numel() + 16, dtype=scales.dtype)
    buf[: scales.numel()] = scales.reshape(-1)
    return buf[: scales.numel()].view(scales.shape)
