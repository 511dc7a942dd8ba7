"""The residual stream's massive activations: its k largest |values| and where they sit. The other outlier
statistics (absmax, channel profiles, kurtosis, 6-sigma fraction) come from one pass in `fused`."""
from __future__ import annotations

import torch


def massive_activations(resid_TxC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest |values| of a [tokens, hidden] residual stream: (values, token indices, channel indices).

    Only the k tokens with the largest absmax can hold them (a value outside those tokens has k larger-or-equal
    values in other tokens), so this reads the stream once for the per-token absmax and then k rows, instead of
    sorting all tokens x hidden values."""
    T, C = resid_TxC.shape
    tokens = resid_TxC.abs().amax(1).topk(min(k, T)).indices
    values, idx = resid_TxC[tokens].abs().to(torch.float32).reshape(-1).topk(min(k, tokens.numel() * C))
    return values.to(torch.float64), tokens[idx // C], idx % C
