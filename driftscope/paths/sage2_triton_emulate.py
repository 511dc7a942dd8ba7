"""driftscope's model of SageAttention 2.2.0's Triton path, `sageattn_qk_int8_pv_fp16_triton` (paths sage2-triton*).

Upstream (thu-ml/SageAttention at d1a57a5): `sageattention/core.py` (`sageattn_qk_int8_pv_fp16_triton`, what
`sageattn` runs on sm86), `sageattention/triton/quant_per_block.py`, `sageattention/triton/attn_qk_int8_per_block.py`
and `attn_qk_int8_per_block_causal.py`. Its numerics are 1.0.6's (`sage_emulate`, which this module calls) with
these differences, all read from that code:
- the non-causal kernel masks keys past kv_len with -1e6 (`qk += tl.where(k_mask, 0, -1.0e6)`): padded keys no longer
  enter the softmax, so decode is not scaled down (1.0.6's bug); modelled by `pad_keys=False`;
- smooth-K subtracts the mean inside the quantizer (`k = k - km`), so the caller's k is never modified;
- head_dim is zero-padded to 64 (below 64) or 128 (65..127) and > 128 is refused; the padding changes no number of the
  first head_dim channels, so it is not materialized here; sm_scale defaults to 1/sqrt(head_dim) of the caller;
- every fp32 division is the GPU's, x * rcp.approx(y) (`gpu_arith`; Triton's div.full.f32), which decides the INT8
  rounding of values near half-integers (`gpu_div=True`).
Shared with 1.0.6: per-block INT8 with scale = absmax/127 (no epsilon) and round half away from zero, sm_scale*log2(e)
folded into Q, V cast to fp16 also for bf16 inputs, fp16 P.V per 64-key block added into an fp32 accumulator (the
tensor cores round the fp16 partial sum every 16 keys), exp2 online softmax, acc / l.
Known kernel defect NOT modelled: the causal kernel reads one k_scale past its buffer when kv_len mod 128 is in
(0, 64]; on the GPU that read returned NaN for half the heads of a 64-token fp16 prefill (the reference data).
"""
from __future__ import annotations

import torch

from .sage_emulate import sage_emulate


def sage2_triton_emulate(q, k, v, *, causal: bool, scale: float | None = None, smooth_k: bool = True) -> torch.Tensor:
    """SageAttention 2.2.0's Triton kernels emulated: q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] (validated; causal: Tq == Tk)."""
    sm_scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else scale  # core.py's default, in Python floats
    return sage_emulate(q, k, v, causal=causal, scale=sm_scale, smooth_k=smooth_k, pad_keys=False, gpu_div=True)
