"""The smoothing-K effect: what subtracting K's mean over tokens does to its INT8 quantization error.

Per KV head, from one forward's post-RoPE q and k:
- channel_bias       |mean_t K| / mean_t |K_t|: how much of K is a shared offset (1 = all of it).
- k_quant_err        |deq(quant(K')) - K'| / |K|, where K' is K smoothed (path sage8) or not
                     (path sage8-nosmooth); the same denominator makes the two comparable.
- qk_quant_err       error of the kernel's scores Q K'^T against exact scores, after removing each query
                     row's mean error (softmax ignores a constant shift per row), over |S - rowmean S| of the
                     exact unsmoothed scores. Causal entries only, on up to `rows` evenly spaced query rows.

Quantization is the kernel's own (driftscope.paths.quantize_per_block): Q in 128-token blocks with
sm_scale*log2(e) folded in, K in 64-token blocks, scale = absmax/127, round half away from zero.
Smoothing is done as the kernel does it: k - k.mean(tokens), in the input dtype.
"""
from __future__ import annotations

import numpy as np
import torch

from driftscope import paths

LOG2E = 1.44269504
VARIANTS = {"sage8": True, "sage8-nosmooth": False}


def _dequant(x_HxTxD: torch.Tensor, block: int, scale_mul: float) -> torch.Tensor:
    x_int8, scales = paths.quantize_per_block(x_HxTxD[None], block, scale_mul)
    T = x_HxTxD.shape[1]
    per_token = scales[0].repeat_interleave(block, dim=1)[:, :T]  # [H, T]
    return x_int8[0].to(torch.float32) * per_token[..., None]


def _dequant_rows(x_HxTxD: torch.Tensor, rows: torch.Tensor, block: int, scale_mul: float) -> torch.Tensor:
    """`_dequant(x, block, scale_mul)[:, rows]` without quantizing the other rows: each row with the scale of its
    whole block (absmax over the block, taken in the input dtype: |x| * scale_mul rounds monotonically, so the
    max commutes with the fp32 multiply), rounded as the kernel rounds (half away from zero)."""
    H, T, D = x_HxTxD.shape
    nblk = -(-T // block)
    padded = torch.nn.functional.pad(x_HxTxD.abs(), (0, 0, 0, nblk * block - T))
    absmax = padded.reshape(H, nblk, block * D).amax(-1).to(torch.float32)  # [H, nblk]
    scale = (absmax * torch.tensor(np.float32(scale_mul))) / 127.0
    scale_r = scale[:, rows // block, None]  # [H, R, 1]
    xi = x_HxTxD[:, rows].to(torch.float32) * torch.tensor(np.float32(scale_mul)) / scale_r
    xi = (xi + torch.where(xi >= 0, 0.5, -0.5)).trunc().nan_to_num(0.0)  # 0/0 of an all-zero block -> 0
    return xi * scale_r


def score_rows(T: int, rows: int = 256, budget: int = 1 << 19) -> int:
    """Query rows sampled for the QK^T statistics: `rows`, fewer for long prompts so that rows x keys stays within
    `budget` score entries per head (2,048 tokens: 256 rows, 8k: 64, 32k: 16); at least 16."""
    return max(1, min(rows, T, max(16, budget // T)))


def smoothing_stats(q_HxTxD: torch.Tensor, k_HxTxD: torch.Tensor, rows: int = 256,
                    scale: float | None = None) -> dict[tuple[str, str | None], torch.Tensor]:
    """{(metric, variant): values [kv_heads]}; variant None for statistics of K itself (and ("qk_rows", None):
    the number of query rows the scores were sampled at, `score_rows(T, rows)`)."""
    Hq, T, D = q_HxTxD.shape
    Hkv = k_HxTxD.shape[0]
    group = Hq // Hkv
    sm = (scale if scale is not None else D ** -0.5) * LOG2E
    k32 = k_HxTxD.to(torch.float32)
    out: dict[tuple[str, str | None], torch.Tensor] = {}
    out[("channel_bias", None)] = (k32.mean(1).norm(dim=-1) / k32.norm(dim=-1).mean(1)).to(torch.float64)

    # Sampled causal query rows, and the exact unsmoothed scores they see.
    # (on the host: unique() of a CUDA tensor would wait for the GPU at every layer)
    rows_np = np.unique(np.round(np.linspace(0, T - 1, score_rows(T, rows))).astype(np.int64))
    qi = torch.from_numpy(rows_np).to(q_HxTxD.device)
    out[("qk_rows", None)] = torch.full((Hkv,), float(len(rows_np)), dtype=torch.float64, device=qi.device)
    mask = torch.arange(T, device=q_HxTxD.device)[None, :] <= qi[:, None]  # [R, T]
    q_hat = _dequant_rows(q_HxTxD, qi, 128, sm)  # [Hq, R, D], already scaled by sm
    q_exact = q_HxTxD[:, qi].to(torch.float32) * sm
    k_rep = k32.repeat_interleave(group, dim=0)
    s_exact = q_exact @ k_rep.transpose(1, 2)  # [Hq, R, T]
    denom = _centred_sq(s_exact, mask).view(Hkv, group).sum(1)
    k_norm_sq = k32.square().sum(dim=(1, 2), dtype=torch.float64)

    for variant, smooth in VARIANTS.items():
        k_in = k_HxTxD - k_HxTxD.mean(dim=1, keepdim=True) if smooth else k_HxTxD
        k_hat = _dequant(k_in, 64, 1.0)
        k_in32 = k_in.to(torch.float32)
        err_sq = (k_hat - k_in32).square().sum(dim=(1, 2), dtype=torch.float64)
        out[("k_quant_err", variant)] = (err_sq / k_norm_sq).sqrt()
        s_var = q_exact @ k_in32.repeat_interleave(group, dim=0).transpose(1, 2)
        s_hat = q_hat @ k_hat.repeat_interleave(group, dim=0).transpose(1, 2)
        err = _centred_sq(s_hat.sub_(s_var), mask).view(Hkv, group).sum(1)
        out[("qk_quant_err", variant)] = (err / denom.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    return out


def _centred_sq(x_HxRxT: torch.Tensor, mask_RxT: torch.Tensor) -> torch.Tensor:
    """Sum over causal entries of (x - its row mean)^2, per head: float32 elementwise (a row's mean is removed
    before squaring, so nothing cancels), float64 sums."""
    x = x_HxRxT.masked_fill(~mask_RxT, 0.0)
    mean = x.sum(-1, keepdim=True, dtype=torch.float64) / mask_RxT.sum(-1, keepdim=True)
    return x.sub_(mean.to(torch.float32)).masked_fill_(~mask_RxT, 0.0).square_().sum(dim=(1, 2), dtype=torch.float64)
