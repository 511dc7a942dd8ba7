"""The smoothing-K effect: what subtracting K's mean over tokens does to its INT8 quantization error.

Per KV head, from one forward's post-RoPE q and k:
- channel_bias       |mean_t K| / mean_t |K_t|: how much of K is a shared offset (1 = all of it).
- k_quant_err        |deq(quant(K')) - K'| / |K|, where K' is K smoothed (path sage8) or not
                     (path sage8-nosmooth); the same denominator makes the two comparable.
- qk_quant_err       error of the kernel's scores Q K'^T against exact scores, after removing each query
                     row's mean error (softmax ignores a constant shift per row), over |S - rowmean S| of the
                     exact unsmoothed scores. Causal entries only, on up to `rows` evenly spaced query rows.

Their cost is bounded (issue 15): beyond 2,048 tokens k_quant_err and the scores read 32 evenly spaced 64-token K
blocks (key_sample) and the scores fewer query rows (score_rows); both sample sizes are recorded as metrics
(k_tokens, qk_rows), and experiments/smoothing_sample_error.py measures what the sampling changes.

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


KEY_BLOCKS = 32  # 64-token K blocks read: all of them up to 2,048 tokens, this many evenly spaced ones beyond
SCORE_BUDGET = 1 << 17  # sampled score entries (query rows x keys) per query head


def score_rows(keys: int, rows: int = 256, budget: int = SCORE_BUDGET) -> int:
    """Query rows sampled for the QK^T statistics: `rows`, fewer against many keys so that rows x keys stays within
    `budget` score entries per head (up to 512 keys: 256 rows; 2,048: 64); at least 16."""
    return max(1, min(rows, max(16, budget // keys)))


def key_sample(T: int, blocks: int = KEY_BLOCKS, device=None) -> torch.Tensor | None:
    """Token indices of the K blocks the statistics read: None (all of K) up to `blocks` blocks of 64 tokens, else
    `blocks` evenly spaced whole blocks (the first and the last included), so each is quantized as the kernel does."""
    n_blocks = -(-T // 64)
    if n_blocks <= blocks:
        return None
    starts = torch.linspace(0, n_blocks - 1, blocks, dtype=torch.float64, device=device).round().long() * 64
    whole = (starts[:-1, None] + torch.arange(64, device=device)).reshape(-1)
    # the last block may be partial; its length is known here (a boolean mask would wait for the GPU)
    return torch.cat([whole, torch.arange((n_blocks - 1) * 64, T, device=device)])


def smoothing_stats(q_HxTxD: torch.Tensor, k_HxTxD: torch.Tensor, rows: int = 256,
                    scale: float | None = None, key_blocks: int = KEY_BLOCKS) -> dict[tuple[str, str | None], torch.Tensor]:
    """{(metric, variant): values [kv_heads]}; variant None for statistics of K itself, and for the sample sizes
    ("qk_rows": query rows of the scores, "k_tokens": K tokens of k_quant_err and the scores; see key_sample).
    channel_bias and the smoothing mean always use all of K."""
    Hq, T, D = q_HxTxD.shape
    Hkv = k_HxTxD.shape[0]
    group = Hq // Hkv
    sm = (scale if scale is not None else D ** -0.5) * LOG2E
    dev = q_HxTxD.device
    f32, f64 = torch.float32, torch.float64
    out: dict[tuple[str, str | None], torch.Tensor] = {}
    k_mean = k_HxTxD.mean(dim=1, keepdim=True)  # the kernel's smoothing, in the input dtype
    out[("channel_bias", None)] = (k_HxTxD.mean(dim=1, dtype=f32).norm(dim=-1)
                                   / torch.linalg.vector_norm(k_HxTxD, dim=-1, dtype=f32).mean(1)).to(f64)

    keys = key_sample(T, key_blocks, dev)
    k_s = k_HxTxD if keys is None else k_HxTxD[:, keys]
    key_pos = torch.arange(T, device=dev) if keys is None else keys
    Tk = k_s.shape[1]
    k32 = k_s.to(f32)
    # Sampled causal query rows (distinct: spacing >= 1 since R <= T; made on the device, since a host-to-device copy
    # would wait for the GPU at every layer), and the exact unsmoothed scores they see. Query head h uses KV head
    # h // group, so each KV head's `group` query heads are consecutive: their rows stack into one matmul per KV head.
    R = min(T, score_rows(Tk, rows))
    qi = torch.linspace(0, T - 1, R, dtype=f64, device=dev).round().long()
    out[("qk_rows", None)] = torch.full((Hkv,), float(R), dtype=f64, device=dev)
    out[("k_tokens", None)] = torch.full((Hkv,), float(Tk), dtype=f64, device=dev)
    mask = (key_pos[None, :] <= qi[:, None]).repeat(group, 1)  # [group * R, Tk]
    q_hat = _dequant_rows(q_HxTxD, qi, 128, sm).view(Hkv, group * R, D)  # already scaled by sm
    q_exact = (q_HxTxD[:, qi].to(f32) * sm).view(Hkv, group * R, D)
    denom = _centred_sq(q_exact @ k32.transpose(1, 2), mask)  # [Hkv]
    k_norm_sq = k32.square().sum(dim=(1, 2), dtype=f64)

    for variant, smooth in VARIANTS.items():
        k_in = k_s - k_mean if smooth else k_s
        k_hat = _dequant(k_in, 64, 1.0)
        k_in32 = k_in.to(f32)
        err_sq = (k_hat - k_in32).square().sum(dim=(1, 2), dtype=f64)
        out[("k_quant_err", variant)] = (err_sq / k_norm_sq).sqrt()
        s_err = (q_hat @ k_hat.transpose(1, 2)).sub_(q_exact @ k_in32.transpose(1, 2))
        err = _centred_sq(s_err, mask)
        out[("qk_quant_err", variant)] = (err / denom.clamp_min(torch.finfo(f64).tiny)).sqrt()
    return out


def _centred_sq(x_HxRxT: torch.Tensor, mask_RxT: torch.Tensor) -> torch.Tensor:
    """Sum over causal entries of (x - its row mean)^2, per head (of the leading dim): float32 elementwise (a row's mean is removed
    before squaring, so nothing cancels), float64 sums."""
    x = x_HxRxT.masked_fill(~mask_RxT, 0.0)
    mean = x.sum(-1, keepdim=True, dtype=torch.float64) / mask_RxT.sum(-1, keepdim=True)
    return x.sub_(mean.to(torch.float32)).masked_fill_(~mask_RxT, 0.0).square_().sum(dim=(1, 2), dtype=torch.float64)
