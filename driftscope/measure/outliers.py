"""Outlier statistics of one tensor: absmax, channel profiles, Pearson kurtosis (normal = 3), the fraction beyond
6 sigma, and the residual stream's massive activations."""
from __future__ import annotations

import torch

OUTLIER_METRICS = ("absmax", "channel_max_median", "kurtosis", "frac_6sigma")


def outliers(x_HxTxC: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outlier statistics per head of a [heads, tokens, channels] tensor.

    - absmax: max |x|
    - channel_max_median: max over channels of the channel absmax, over its median (channel outliers)
    - kurtosis: of all values (Pearson, normal = 3)
    - frac_6sigma: fraction of values with |x - mean| > 6 std
    """
    x = x_HxTxC.float().reshape(x_HxTxC.shape[0], -1)
    f64 = torch.float64
    n = x.shape[1]
    ch = channel_absmax(x_HxTxC)
    mean = x.sum(1, dtype=f64) / n
    centred = x - mean.float()[:, None]  # float32; the moments below accumulate in float64
    c2 = centred.square()
    var = c2.sum(1, dtype=f64) / n
    std = var.sqrt()
    return {
        "absmax": x.abs().amax(1).to(f64),
        "channel_max_median": (ch.amax(1) / ch.median(1).values.clamp_min(torch.finfo(torch.float32).tiny)).to(f64),
        "kurtosis": (c2.square().sum(1, dtype=f64) / n) / var.square().clamp_min(torch.finfo(f64).tiny),
        "frac_6sigma": (c2 > (36 * var).float()[:, None]).sum(1).to(f64) / n,
    }


def channel_absmax(x_HxTxC: torch.Tensor) -> torch.Tensor:
    """Per-channel absmax profile [heads, channels] (max over tokens)."""
    return x_HxTxC.abs().amax(dim=1).to(torch.float32)


def massive_activations(resid_TxC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest |values| of a [tokens, hidden] residual stream: (values, token indices, channel indices).

    Only the k tokens with the largest absmax can hold them (a value outside those tokens has k larger-or-equal
    values in other tokens), so this reads the stream once for the per-token absmax and then k rows, instead of
    sorting all tokens x hidden values."""
    T, C = resid_TxC.shape
    tokens = resid_TxC.abs().amax(1).topk(min(k, T)).indices
    values, idx = resid_TxC[tokens].abs().to(torch.float32).reshape(-1).topk(min(k, tokens.numel() * C))
    return values.to(torch.float64), tokens[idx // C], idx % C
