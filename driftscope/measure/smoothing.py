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

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from driftscope import paths
from driftscope.measure import fused
from driftscope.paths import gpu_arith

LOG2E = 1.44269504
VARIANTS = {"sage8": True, "sage8-nosmooth": False}


def _dequant(x_HxTxD: torch.Tensor, block: int, scale_mul: float) -> torch.Tensor:
    """x as the kernel quantizes it (per block of `block` tokens of each head), dequantized to fp32; x [H, T, D] or
    [B, H, T, D]."""
    x = x_HxTxD if x_HxTxD.dim() == 4 else x_HxTxD[None]
    x_int8, scales = paths.quantize_per_block(x, block, scale_mul)
    per_token = scales.repeat_interleave(block, dim=2)[:, :, :x.shape[2]]  # [B, H, T]
    out = x_int8.to(torch.float32) * per_token[..., None]
    return out if x_HxTxD.dim() == 4 else out[0]


def _dequant_sampled(x_HxRxD: torch.Tensor, absmax_HxB: torch.Tensor, rows: torch.Tensor, block: int,
                     scale_mul: float) -> torch.Tensor:
    """`_dequant(x, block, scale_mul)[:, rows]`, fp32 [H, R, D], from the rows x[:, rows] and the blocks' absmax
    (`fused.block_absmax(x, block)`) without quantizing the other rows: each row with the scale of its whole block
    (absmax taken in the input dtype: |x| * scale_mul rounds monotonically, so the max commutes with the fp32
    multiply), rounded as the kernel rounds (half away from zero)."""
    scale = (absmax_HxB.to(torch.float32) * torch.tensor(np.float32(scale_mul))) / 127.0
    scale_r = scale[:, rows // block, None]  # [H, R, 1]
    xi = x_HxRxD.to(torch.float32) * torch.tensor(np.float32(scale_mul)) / scale_r
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
    channel_bias and the smoothing mean always use all of K. (`sample` then `finish`, for one layer.)"""
    return finish([sample(q_HxTxD, k_HxTxD, rows, scale, key_blocks)])[0]


@dataclass
class Sample:
    """What the statistics need of one layer, small: the sampled query rows (as the kernel quantizes them, scaled by
    sm = sm_scale * log2 e, and exact, unscaled), the sampled K and K's mean, and channel_bias (from all of K)."""

    q_hat: torch.Tensor  # [Hkv, group * R, D] float32
    q_exact: torch.Tensor  # [Hkv, group * R, D] float32, q's values (exact: fp16 and bf16 fit), not scaled by sm
    sm: float
    k: torch.Tensor  # [Hkv, Tk, D], the input dtype
    k_mean: torch.Tensor  # [Hkv, 1, D], the input dtype (the kernel's smoothing)
    channel_bias: torch.Tensor  # [Hkv] float64
    shape: SimpleNamespace  # the sample's indices and mask (_sample), shared by every layer of a forward

    @property
    def score_entries(self) -> int:
        """Entries of the score matrices `finish` makes of this sample (its temporaries scale so)."""
        return len(VARIANTS) * self.q_hat.shape[0] * self.q_hat.shape[1] * self.k.shape[1]


def sample(q_HxTxD: torch.Tensor, k_HxTxD: torch.Tensor, rows: int = 256, scale: float | None = None,
           key_blocks: int = KEY_BLOCKS) -> Sample:
    """The part of the statistics that reads a layer's full q and k; `finish` does the rest for many layers at once
    (the capture keeps several layers' samples and finishes them together: ~90 small kernels per batch, not layer)."""
    Hq, T, D = q_HxTxD.shape
    Hkv = k_HxTxD.shape[0]
    group = Hq // Hkv
    sm = (scale if scale is not None else D ** -0.5) * LOG2E
    f32, f64 = torch.float32, torch.float64
    shape = _sample(T, Hkv, group, rows, key_blocks, q_HxTxD.device)
    qi = shape.qi
    q_rows = q_HxTxD[:, qi]  # gathered once for both the quantized and the exact rows
    bias = (k_HxTxD.mean(dim=1, dtype=f32).norm(dim=-1) / torch.linalg.vector_norm(k_HxTxD, dim=-1, dtype=f32).mean(1))
    return Sample(q_hat=_dequant_sampled(q_rows, fused.block_absmax(q_HxTxD, 128), qi, 128, sm).view(Hkv, -1, D),
                  q_exact=q_rows.to(f32).view(Hkv, -1, D), sm=sm,
                  k=k_HxTxD if shape.keys is None else k_HxTxD[:, shape.keys],
                  k_mean=k_HxTxD.mean(dim=1, keepdim=True), channel_bias=bias.to(f64), shape=shape)


def finish(samples: list[Sample]) -> list[dict[tuple[str, str | None], torch.Tensor]]:
    """`smoothing_stats` of each sample, computed for all of them at once (samples of one shape stack along the
    KV heads; every statistic is per KV head)."""
    out: list = [None] * len(samples)
    groups: dict = {}
    for i, smp in enumerate(samples):
        groups.setdefault((id(smp.shape), smp.sm), []).append(i)
    for idx in groups.values():
        shape = samples[idx[0]].shape
        Hkv = samples[idx[0]].k.shape[0]
        cat = {name: torch.cat([getattr(samples[i], name) for i in idx]) for name in ("q_hat", "q_exact", "k", "k_mean")}
        stats = _stats(cat["q_hat"], cat["q_exact"], cat["k"], cat["k_mean"], shape, samples[idx[0]].sm)
        for j, i in enumerate(idx):
            layer = {key: v[j * Hkv:(j + 1) * Hkv] for key, v in stats.items()}
            out[i] = {("channel_bias", None): samples[i].channel_bias, ("qk_rows", None): shape.qk_rows,
                      ("k_tokens", None): shape.k_tokens, **layer}
    return out


def _stats(q_hat, q_exact, k_s, k_mean, shape, sm: float) -> dict[tuple[str, str], torch.Tensor]:
    """k_quant_err and qk_quant_err of both variants, [heads] each, from stacked samples (q_exact not yet scaled
    by sm)."""
    f32, f64 = torch.float32, torch.float64
    k32 = k_s.to(f32)
    k_norm_sq = _sum64(k32.square())
    # both variants at once: K as each variant quantizes it [V, Hkv, Tk, D], its INT8 error and the score error
    k_in = torch.stack([k_s - k_mean if smooth else k_s for smooth in VARIANTS.values()])
    k_hat = _dequant(k_in, 64, 1.0)
    k_in32 = k_in.to(f32)
    err_sq = _sum64((k_hat - k_in32).square_())  # [V, Hkv]
    # scores [V + 1, Hkv, group * R, Tk]: each variant's error Q^ K^^T - sm Q K'^T, then the exact unsmoothed
    # Q K^T / sm, written in place by the matmuls (the error's subtraction is the second matmul's accumulation).
    # On CUDA, Q and K' hold fp16 or bf16 values, which TF32 tensor cores multiply exactly; Q^ and K^ (int8 x fp32
    # scale) do not fit TF32, and neither do fp32 inputs.
    V, (Hkv, R, D), Tk = len(VARIANTS), q_exact.shape, k_s.shape[1]
    tf32_exact = k_s.is_cuda and k_s.dtype in (torch.float16, torch.bfloat16)
    scores = q_exact.new_empty(V + 1, Hkv, R, Tk)
    err = scores[:V].view(V * Hkv, R, Tk)
    with gpu_arith.float32_matmul("highest"):
        torch.bmm(q_hat.repeat(V, 1, 1), k_hat.view(V * Hkv, Tk, D).mT, out=err)
    with gpu_arith.float32_matmul("high" if tf32_exact else "highest"):
        err.baddbmm_(q_exact.repeat(V, 1, 1), k_in32.view(V * Hkv, Tk, D).mT, alpha=-sm)
        torch.bmm(q_exact, k32.mT, out=scores[V])
    centred = _centred_sq(scores, shape.kept)
    denom = (centred[-1] * sm ** 2).clamp_min(torch.finfo(f64).tiny)  # the exact unsmoothed scores' spread
    out = {}
    for i, variant in enumerate(VARIANTS):
        out[("k_quant_err", variant)] = (err_sq[i] / k_norm_sq).sqrt()
        out[("qk_quant_err", variant)] = (centred[i] / denom).sqrt()
    return out


def _centred_sq(x_HxRxT: torch.Tensor, kept_R: torch.Tensor) -> torch.Tensor:
    """Sum over the kept (causal) entries of (x - its row mean)^2, per head (of the leading dims): float32 per row
    (`fused.prefix_centred_sq`: a row's mean is removed before squaring, so nothing cancels), float64 across rows.
    The sampled keys ascend, so row r keeps its first kept_R[r] entries."""
    return fused.prefix_centred_sq(x_HxRxT, kept_R).to(torch.float64).sum(-1)


@functools.lru_cache(maxsize=64)
def _sample(T: int, Hkv: int, group: int, rows: int, key_blocks: int, device) -> SimpleNamespace:
    """What the statistics sample at one shape, made once per shape (the same at every layer): K's token indices
    (`key_sample`), the query rows, and how many of the sampled keys each row's causal mask keeps (a prefix).

    The query rows are distinct (spacing >= 1 since R <= T) and made on the device, since a host-to-device copy
    would wait for the GPU. Query head h uses KV head h // group, so each KV head's `group` query heads are
    consecutive: their rows stack into one matmul per KV head, and the kept counts repeat per query head."""
    keys = key_sample(T, key_blocks, device)
    key_pos = torch.arange(T, device=device) if keys is None else keys
    Tk = key_pos.numel()
    R = min(T, score_rows(Tk, rows))
    f64 = torch.float64
    qi = torch.linspace(0, T - 1, R, dtype=f64, device=device).round().long()
    kept = (key_pos[None, :] <= qi[:, None]).sum(-1, dtype=torch.int32).repeat(group)  # [group * R]
    return SimpleNamespace(keys=keys, qi=qi, kept=kept,
                           qk_rows=torch.full((Hkv,), float(R), dtype=f64, device=device),
                           k_tokens=torch.full((Hkv,), float(Tk), dtype=f64, device=device))


def _sum64(x_HxRxC: torch.Tensor) -> torch.Tensor:
    """Per head: float32 sums along the last dim (torch's tree reduction; <= a few thousand terms), float64 across
    rows. (`sum(dtype=torch.float64)` would first copy all of x to float64.)"""
    return x_HxRxC.sum(-1).to(torch.float64).sum(-1)
