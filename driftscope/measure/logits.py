"""End-to-end metrics over a language model's logits: token NLL, KL, top-1 agreement, and their statistics.

Logits arrive in the model's dtype (bf16/fp16), as transformers returns them. Every metric upcasts them to
float32 before `log_softmax`, exactly as transformers' own `labels=` loss does (`ForCausalLMLoss` calls
`logits.float()`), and works on slices of positions so that an 8k-token window never needs a float32 copy
of all its logits. Identical logits give exactly KL 0, top-1 agreement 1 and max |Δlogit| 0.

`next_token_drift` (teacher-forced decode, per step) works in float64 from float32 logits: a decode KL of 1e-4
must not drown in float32 rounding of log-probabilities of a 49k-token vocabulary.
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # positions per float32 slice: 1024 x a 128k vocab is 512 MiB


def token_nll(logits_TxV: torch.Tensor, ids_T: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """NLL of each next token: float32 [T-1], position t scoring ids[t + 1] (the `labels=` convention)."""
    target = ids_T[1:].to(logits_TxV.device)
    out = []
    for s in range(0, target.shape[0], chunk):
        lp_CxV = torch.log_softmax(logits_TxV[s:s + chunk].float(), dim=-1)
        out.append(-lp_CxV.gather(-1, target[s:s + chunk, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, device=logits_TxV.device)


def logit_drift(base_TxV: torch.Tensor, test_TxV: torch.Tensor, chunk: int = CHUNK) -> dict[str, float]:
    """Drift of `test` logits from `base` over all T positions of one sequence.

    kl_mean / kl_max: mean and max over positions of KL(base ‖ test) = Σ_v p_base (log p_base − log p_test);
    top1_agree: fraction of positions whose argmax token agrees; max_abs_dlogit: max |test − base| over
    positions and vocabulary; positions: T.
    """
    if base_TxV.shape != test_TxV.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_TxV.shape)} vs {tuple(test_TxV.shape)}")
    kl_sum, kl_max, agree, dmax = 0.0, 0.0, 0, 0.0
    T = base_TxV.shape[0]
    for s in range(0, T, chunk):
        b_CxV, t_CxV = base_TxV[s:s + chunk].float(), test_TxV[s:s + chunk].float()
        lb_CxV, lt_CxV = torch.log_softmax(b_CxV, dim=-1), torch.log_softmax(t_CxV, dim=-1)
        kl_C = (lb_CxV.exp() * (lb_CxV - lt_CxV)).sum(-1).double()
        kl_sum += kl_C.sum().item()
        kl_max = max(kl_max, kl_C.max().item())
        agree += (b_CxV.argmax(-1) == t_CxV.argmax(-1)).sum().item()
        dmax = max(dmax, (t_CxV - b_CxV).abs().max().item())
    return {"positions": T, "kl_mean": kl_sum / T, "kl_max": kl_max, "top1_agree": agree / T,
            "max_abs_dlogit": dmax}


def next_token_drift(base_NxV: torch.Tensor, test_NxV: torch.Tensor, target_N: torch.Tensor | None = None,
                     chunk: int = 256) -> dict[str, np.ndarray]:
    """Per position n, float64 arrays [N]: kl = KL(base ‖ test) of the next-token distributions, top1 = 1 where
    both argmaxes agree, and, with `target`, nll_base / nll_test = −log p(target[n]) on each side.

    Logits are upcast to float64 (from float32 or the model's dtype) before `log_softmax`; identical logits give
    exactly kl 0 and equal NLLs."""
    if base_NxV.shape != test_NxV.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_NxV.shape)} vs {tuple(test_NxV.shape)}")
    out = {k: [] for k in ("kl", "top1", "nll_base", "nll_test")}
    for s in range(0, base_NxV.shape[0], chunk):
        lb_CxV = torch.log_softmax(base_NxV[s:s + chunk].double(), dim=-1)
        lt_CxV = torch.log_softmax(test_NxV[s:s + chunk].double(), dim=-1)
        out["kl"].append((lb_CxV.exp() * (lb_CxV - lt_CxV)).sum(-1))
        out["top1"].append((base_NxV[s:s + chunk].argmax(-1) == test_NxV[s:s + chunk].argmax(-1)).double())
        if target_N is not None:
            t_Cx1 = target_N[s:s + chunk].to(lb_CxV.device).view(-1, 1)
            out["nll_base"].append(-lb_CxV.gather(-1, t_Cx1)[:, 0])
            out["nll_test"].append(-lt_CxV.gather(-1, t_Cx1)[:, 0])
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items() if v}


def next_token_nll(logits_NxV: torch.Tensor, target_N: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """−log p(target[n]) of each next-token distribution, float64 [N] (upcast before `log_softmax`)."""
    out = []
    for s in range(0, logits_NxV.shape[0], chunk):
        lp_CxV = torch.log_softmax(logits_NxV[s:s + chunk].double(), dim=-1)
        out.append(-lp_CxV.gather(-1, target_N[s:s + chunk].to(lp_CxV.device).view(-1, 1))[:, 0])
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def count_nonfinite(logits: torch.Tensor) -> int:
    """How many values of `logits` are NaN or ±inf."""
    return int(torch.isfinite(logits).logical_not().sum().item())


def perplexity(nll_sums, tokens) -> float:
    """exp(mean token NLL) over all tokens of all windows."""
    return float(np.exp(np.asarray(nll_sums, dtype=np.float64).sum() / np.asarray(tokens).sum()))


def bootstrap_ppl_delta(base_nll, test_nll, tokens, resamples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ppl(test) − ppl(base), resampling whole windows with replacement.

    `base_nll`, `test_nll`: per-window NLL sums; `tokens`: per-window predicted-token counts. Both sides are
    resampled with the same window indices (a paired bootstrap), so equal sides give exactly (0, 0).
    """
    b, t, n = (np.asarray(x, dtype=np.float64) for x in (base_nll, test_nll, tokens))
    idx_RxW = np.random.default_rng(seed).integers(0, len(n), size=(resamples, len(n)))
    count_R = n[idx_RxW].sum(1)
    delta_R = np.exp(t[idx_RxW].sum(1) / count_R) - np.exp(b[idx_RxW].sum(1) / count_R)
    tail = (1 - level) / 2
    lo, hi = np.quantile(delta_R, [tail, 1 - tail])
    return float(lo), float(hi)


def first_divergence(a, b) -> int:
    """Tokens before the first position where two sequences differ (their common length if none)."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
