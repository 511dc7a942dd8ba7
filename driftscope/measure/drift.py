"""Drift statistics of a path against the reference, computed where the tensors live (on the GPU, no host copies until the end).

Every function takes tensors whose leading dimension is the head (or a single group) and reduces over the
rest, returning float64 values per head. Callers add the aggregate over all heads themselves (head = -1).

Drift of x against a reference r (both upcast to float64, so an identical pair gives exactly cosine 1 and 0
for every distance):
- cosine       <x, r> / (|x| |r|)
- rel_l2       |x - r| / |r|
- rel_l1       sum|x - r| / sum|r|           (SageAttention's own accuracy metric)
- rmse         sqrt(mean (x - r)^2)
- max_abs      max |x - r|
"""
from __future__ import annotations

import torch

DRIFT_METRICS = ("cosine", "rel_l2", "rel_l1", "rmse", "max_abs")


def drift_sums(x_HxN: torch.Tensor, ref_HxN: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The sufficient statistics of drift per head, float64 [7, heads]: sums of x*r, x^2, r^2, d^2, |d|, |r|,
    and max |d|. Sums over heads give the statistics of all heads together (see `pool`).

    Elementwise work is float32 (products of half-precision values are exact there, and so is their
    difference) and every sum accumulates in float64, so identical inputs give exactly d = 0 and x*r == x*x.
    `chunk` bounds memory for huge tensors (logits): the sums are accumulated over slices of dim 1.
    """
    x, r = x_HxN.reshape(x_HxN.shape[0], -1), ref_HxN.reshape(ref_HxN.shape[0], -1)
    n = x.shape[1]
    step = n if chunk is None else chunk
    f64 = torch.float64
    sums = None
    for start in range(0, n, step):
        xs, rs = x[:, start:start + step].float(), r[:, start:start + step].float()
        d = xs - rs
        ad = d.abs()
        part = torch.stack([(xs * rs).sum(1, dtype=f64), xs.square().sum(1, dtype=f64),
                            rs.square().sum(1, dtype=f64), d.square().sum(1, dtype=f64), ad.sum(1, dtype=f64),
                            rs.abs().sum(1, dtype=f64), ad.amax(1).to(f64)])
        sums = part if sums is None else torch.cat([sums[:6] + part[:6], torch.maximum(sums[6:], part[6:])])
    return sums


def pool(sums_7xH: torch.Tensor) -> torch.Tensor:
    """Statistics of all heads together, [7, 1]."""
    return torch.cat([sums_7xH[:6].sum(1, keepdim=True), sums_7xH[6:].amax(1, keepdim=True)])


def drift_from_sums(sums_7xH: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """The drift metrics from `drift_sums` of tensors with n elements per head."""
    xr, xx, rr, dd, d1, r1, dmax = sums_7xH
    tiny = torch.finfo(torch.float64).tiny
    # sqrt(fl(a*a)) == a in IEEE arithmetic, so identical inputs give a cosine of exactly 1.
    return {
        "cosine": xr / (xx * rr).sqrt().clamp_min(tiny),
        "rel_l2": dd.sqrt() / rr.sqrt().clamp_min(tiny),
        "rel_l1": d1 / r1.clamp_min(tiny),
        "rmse": (dd / n).sqrt(),
        "max_abs": dmax,
    }


def drift(x_HxN: torch.Tensor, ref_HxN: torch.Tensor, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Drift per head: x and ref are [heads, ...]; each metric is a float64 tensor [heads]."""
    return drift_from_sums(drift_sums(x_HxN, ref_HxN, chunk), x_HxN[0].numel())


def rel_l2_by_position(x_HxTxD: torch.Tensor, ref_HxTxD: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative L2 over all heads and channels, per bin of consecutive token positions.

    Returns (bin start positions [nbins] int64, rel-L2 [nbins] float64). Long contexts are binned so that
    a 32k-token curve stays a few hundred rows.
    """
    x, r = x_HxTxD.float(), ref_HxTxD.float()
    T = x.shape[1]
    width = max(1, -(-T // bins))
    starts = torch.arange(0, T, width, device=x.device)
    num = (x - r).square().sum(dim=(0, 2), dtype=torch.float64)
    den = r.square().sum(dim=(0, 2), dtype=torch.float64)
    pad = starts.numel() * width - T
    num = torch.nn.functional.pad(num, (0, pad)).view(-1, width).sum(1)
    den = torch.nn.functional.pad(den, (0, pad)).view(-1, width).sum(1)
    return starts, (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
