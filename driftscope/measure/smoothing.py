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

import torch

from driftscope import paths

LOG2E = 1.44269504
VARIANTS = {"sage8": True, "sage8-nosmooth": False}


def _dequant(x_HxTxD: torch.Tensor, block: int, scale_mul: float) -> torch.Tensor:
    x_int8, scales = paths.quantize_per_block(x_HxTxD[None], block, scale_mul)
    T = x_HxTxD.shape[1]
    per_token = scales[0].repeat_interleave(block, dim=1)[:, :T]  # [H, T]
    return x_int8[0].to(torch.float32) * per_token[..., None]


def smoothing_stats(q_HxTxD: torch.Tensor, k_HxTxD: torch.Tensor, rows: int = 256,
                    scale: float | None = None) -> dict[tuple[str, str | None], torch.Tensor]:
    """{(metric, variant): values [kv_heads]}; variant None for statistics of K itself."""
    Hq, T, D = q_HxTxD.shape
    Hkv = k_HxTxD.shape[0]
    group = Hq // Hkv
    sm = (scale if scale is not None else D ** -0.5) * LOG2E
    k32 = k_HxTxD.to(torch.float32)
    out: dict[tuple[str, str | None], torch.Tensor] = {}
    out[("channel_bias", None)] = (k32.mean(1).norm(dim=-1) / k32.norm(dim=-1).mean(1)).to(torch.float64)

    # Sampled causal query rows, and the exact unsmoothed scores they see.
    qi = torch.linspace(0, T - 1, min(rows, T), device=q_HxTxD.device).round().long().unique()
    mask = torch.arange(T, device=q_HxTxD.device)[None, :] <= qi[:, None]  # [R, T]
    q_hat = _dequant(q_HxTxD, 128, sm)[:, qi]  # [Hq, R, D], already scaled by sm
    q_exact = q_HxTxD.to(torch.float32)[:, qi] * sm
    k_rep = k32.repeat_interleave(group, dim=0)
    s_exact = q_exact @ k_rep.transpose(1, 2)  # [Hq, R, T]
    denom = _centred_sq(s_exact, mask).view(Hkv, group).sum(1)
    k_norm_sq = k32.pow(2).sum(dim=(1, 2))

    for variant, smooth in VARIANTS.items():
        k_in = k_HxTxD - k_HxTxD.mean(dim=1, keepdim=True) if smooth else k_HxTxD
        k_hat = _dequant(k_in, 64, 1.0)
        k_in32 = k_in.to(torch.float32)
        out[("k_quant_err", variant)] = ((k_hat - k_in32).pow(2).sum(dim=(1, 2)) / k_norm_sq).sqrt().to(torch.float64)
        s_var = q_exact @ k_in32.repeat_interleave(group, dim=0).transpose(1, 2)
        s_hat = q_hat @ k_hat.repeat_interleave(group, dim=0).transpose(1, 2)
        err = _centred_sq(s_hat - s_var, mask).view(Hkv, group).sum(1)
        out[("qk_quant_err", variant)] = (err / denom.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    return out


def _centred_sq(x_HxRxT: torch.Tensor, mask_RxT: torch.Tensor) -> torch.Tensor:
    """Sum over causal entries of (x - its row mean)^2, per head, in float64."""
    x = x_HxRxT.to(torch.float64)
    m = mask_RxT.to(torch.float64)
    mean = (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
    return ((x - mean).pow(2) * m).sum(dim=(1, 2))

