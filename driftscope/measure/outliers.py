"""The residual stream's massive activations: its k largest |values| and where they sit. The other outlier
statistics (absmax, channel profiles, kurtosis, 6-sigma fraction) come from one pass in `fused`."""
from __future__ import annotations

import torch


def massive_activations(resid_TxC: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest |values| of a [tokens, hidden] residual stream: (values float64, token indices, channel
    indices), each [k]; of each row of a [rows, tokens, hidden] batch at once: each [rows, k].

    Only the k tokens with the largest absmax can hold them (a value outside those tokens has k larger-or-equal
    values in other tokens), so this reads the stream once for the per-token absmax and then k rows, instead of
    sorting all tokens x hidden values."""
    x = resid_TxC if resid_TxC.dim() == 3 else resid_TxC[None]
    B, T, C = x.shape
    lo, hi = torch.aminmax(x, dim=2)  # per-token max |x| without a |x| copy of the stream
    tokens = torch.maximum(hi.abs(), lo.abs()).topk(min(k, T)).indices  # [B, k']
    rows = x.gather(1, tokens[..., None].expand(-1, -1, C))  # [B, k', C]
    values, idx = rows.abs().to(torch.float32).reshape(B, -1).topk(min(k, tokens.shape[1] * C))
    out = values.to(torch.float64), tokens.gather(1, idx // C), idx % C
    return out if resid_TxC.dim() == 3 else tuple(t[0] for t in out)
