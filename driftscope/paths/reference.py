"""The reference paths: `fp32` (the exact oracle) and `fp16` (the half-precision baseline), both torch SDPA.

`fp16` computes in the inputs' own dtype: fp16, or bf16 when the model runs in bf16 (fp32 inputs compute in fp32).
GQA goes through `enable_gqa=True` (k/v are never expanded). On torch's CPU kernels each batch row is computed
independently of the others, so a row of a lockstep batch is bitwise equal to the same row run alone (tested:
the null-drift test of the capture depends on it).

Causal masks are bottom-right aligned: query i of Tq attends to keys <= Tk - Tq + i, so decode (Tq == 1) sees every
key and chunked prefill (1 < Tq < Tk) is exact. torch's `is_causal=True` is top-left aligned, so it is used only
for Tq == Tk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q, k, v, *, causal: bool, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """SDPA in `dtype` on q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] -> [B,Hq,Tq,D] in q's dtype."""
    Tq, Tk = q.shape[2], k.shape[2]
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = None
    is_causal = causal and Tq == Tk and Tq > 1
    if causal and Tq != Tk and Tq > 1:
        # mask_TqxTk: True where attention is allowed (bottom-right aligned)
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    return out.to(q.dtype)


def fp32(q, k, v, *, causal: bool, scale: float | None = None) -> torch.Tensor:
    return sdpa(q, k, v, causal=causal, scale=scale, dtype=torch.float32)


def fp16(q, k, v, *, causal: bool, scale: float | None = None) -> torch.Tensor:
    return sdpa(q, k, v, causal=causal, scale=scale, dtype=q.dtype)
