"""Every drift and outlier statistic of one capture site from ONE read of the path tensor x and the reference r.

The capture used to compute each statistic as its own chain of elementwise kernels with float64 intermediates
(issue 15: capture cost 3.3-3.5x the forward at 8k tokens). Here one call reads x_HxTxC and r_HxTxC (fp16, bf16 or
fp32; a [tokens, hidden] tensor is one head) once and keeps only small sums:

    s = site_stats(x, r, stats_of=("ref", "x"), positions=True)   # SiteStats of device tensors, no host sync
    drift(s)                   per-head cosine, rel_l2, rel_l1, rmse, max_abs
    drift(s, pooled=True)      the same over all heads, [1]
    drift_sums(s)              [7, heads]: sum x*r, x^2, r^2, d^2, |d|, |r|, max |d|
    rel_l2_by_position(s, bins)   rel_l2 over heads and channels per bin of consecutive tokens
    outliers(s, "ref")         absmax, channel_max_median, kurtosis, frac_6sigma (outlier_table: as one [4, heads])
    channel_absmax(s, "ref")   [heads, channels] profile; smoothed=True for K - mean_t K (the kernel's smoothing)
drift and outliers return views of tables that site_stats has filled (no kernels of their own). Two more one-read
statistics serve the smoothing-K sample (driftscope.measure.smoothing):

    block_absmax(q, 128)         max |q| per head and 128-token block: the INT8 block scales
    prefix_centred_sq(s, kept)   per score row, the centred sum of squares of its first kept[r] entries

Backends (the same statistics and the same layout of per-program partials [H, P, NSTAT]):
- `triton` (CUDA tensors; on the CPU only when asked for, under TRITON_INTERPRET=1, as the tests do), a few
  launches and one torch op (the channel median) per site:
  1. `_site_kernel`, grid (token programs, channel blocks, heads): each program walks `iters` (<= MAX_ITERS)
     tiles of [BLOCK_T, BLOCK_C] values of one head, reading x and r once (the next tile's loads issued before
     this tile's arithmetic). Sums of x^2, r^2, d^2, |d|, |r|, max |d|, and of (v - shift)^1..4 for each tensor
     with statistics, and the channel max/min/sum, accumulate elementwise in fp32 registers and are reduced once,
     at the end, into one row of fp32 partials and per-channel partials; with positions, each tile's per-token
     sums of d^2 and r^2 are stored as they come.
  2. `_combine_kernel`, grid (heads + 1): in float64, each head's sums over its partials, the drift metrics (the
     last program pools all heads), the moments and the 6-sigma thresholds.
  3. `_channel_kernel`: the channel profiles (absmax, max, min, mean, and smoothing's max |x - mean|) from the
     per-program channel partials.
  4. `_count_kernel` per tensor with statistics: the 6-sigma count (below); then `_finish_kernel`, the outlier
     rows that need the count or the channel profile (count, fraction, channel max over its median; the median is
     torch's). `block_absmax` and `prefix_centred_sq` (smoothing's Q block scales and score spreads) are kernels of
     their own. With `nonfinite`, `_count_kernel` per tensor again: the NaN/inf count, whose programs return at once
     for heads whose sum of squares is finite (every value finite), so a healthy output costs a launch, no reads.
  Over a program's <= MAX_ITERS tiles sums are fp32 additions per element, within the tile a tl.sum tree
  (pairwise), over programs float64. H100, Llama-3-8B shapes at 8k tokens (experiments/bench_fused_stats.py): q
  0.23 ms of GPU time (15 kernels) where the old chain took 6.3 ms (146 kernels); logits [8192, 128256] 1.5 ms vs
  84 ms.
- `torch`, the vectorized fallback (the CPU, or CUDA without Triton): fp32 work on one contiguous copy per tensor,
  no float64 temporaries, reductions along rows (torch's fp32 sums are cascaded; its norm over rows of <= 4096),
  tokens in chunks of at most `chunk_elems` values so that logits [T, vocab] never get a full fp32 copy.

Numerics
- d = x - r is computed in fp32 from the loaded values: exact for fp16/bf16 inputs, so identical inputs give
  d == 0 exactly, hence rel_l2, rel_l1, rmse and max_abs exactly 0. Sum x^2 and sum r^2 are computed by the same
  operations in the same order, so they are bitwise equal when x == r, and the cosine is formed as
  cos = 1 + ((|x| - |r|)^2 - |x - r|^2) / (2 |x| |r|)    (the law of cosines; clamped to [-1, 1], 0 if a norm is 0)
  which is exactly 1.0 for identical inputs by construction, and keeps 1 - cos accurate to ~1e-7 * rel_l2
  (the textbook <x,r>/(|x||r|) loses 1 - cos to cancellation at fp32-accurate sums).
- Kurtosis (Pearson, normal = 3) = m4 / m2^2 from CENTRED moments, robust to large offsets (1e3 + noise): every
  partial holds (n, shift, S1..S4, max, min) with S_k = sum (v - shift)^k and a shift near the partial's mean
  (triton: the mean of the program's first tile; torch: the head's mean rounded to fp32). The combine (float64)
  turns each into central sums with delta = S1 / n (M2 = S2 - n delta^2, M3, M4 likewise) and merges them around
  the global mean with the binomial terms in (mean_b - mean) (Chan et al.'s pairwise formulas, all at once).
  Nothing cancels as long as |shift - mean| is a few std at most, which holds unless a program's first tile
  is far off the rest of its (<= MAX_ITERS tiles of) values; the torch path leaves S3 out when unchunked (its term is
  4 delta S3 with delta ~ the fp32 rounding of the mean: < 1e-6 relative for |mean|/std < 100 in fp32).
- frac_6sigma = #{|x - mean| > 6 std} / n needs the final mean and std, so it takes a SECOND pass, but only where
  it can be non-zero: a head whose range satisfies max(max - mean, mean - min) <= 6 std has none, decided on the
  device from the first pass's max/min. triton: `_count_kernel` reads a per-head (mean, 6 std, needed) row from
  device memory and its programs return at once for heads that need no count (no host sync, no traffic); integer
  atomics, so the order does not matter. torch: the centred squares c^2 of the first pass are kept and compared
  in place (c2.gt_(36 var), then a sum: torch's boolean temporaries are slow on CPUs); on the CPU only if some
  head needs it; a chunked tensor is re-read chunk by chunk. Values within rounding of the threshold may count
  differently from a float64 reference (the tests allow one value per head).
- Limits: fp32 accumulation of 4th powers overflows above |x - mean| ~ 1e8 (fp32 inputs only; fp16 stops at
  65504); counts up to 2^24 per program are exact in fp32. channel_mean is float32 from the triton path.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

DRIFT_METRICS = ("cosine", "rel_l2", "rel_l1", "rmse", "max_abs")
OUTLIER_METRICS = ("absmax", "channel_max_median", "kurtosis", "frac_6sigma")
BACKENDS = ("auto", "torch", "triton")

# Layout of one row of partial statistics (the kernel's and the fallback's), per (head, partial):
XX, RR, DD, AD, AR, MAXD = range(6)  # drift: sum x^2, sum r^2, sum (x-r)^2, sum |x-r|, sum |r|, max |x-r|
N_, SHIFT, S1, S2, S3, S4, VMAX, VMIN = range(8)  # moments of one tensor (at MOM_X or MOM_R): sums of (v-shift)^k
MOM_X, MOM_R = 6, 14
NSTAT = 22
# The site kernel's launch shape, from an H200 sweep of one Llama-3-8B layer's sites at 8k tokens (kernel time
# alone; experiments/gpu/sweep_site_kernel.py -> experiments/results/sweep_site_kernel_h200.json): 0.27 ms, vs
# 0.32 ms with 16 tiles per program and 0.33 ms with tiles of 512 values and 2 warps.
TILE = 256  # values per [BLOCK_T, BLOCK_C] tile of the site kernel
WARPS = 1  # warps per site-kernel program
MAX_ITERS = 64  # tiles per program (each accumulator element sums at most this many values in fp32)
PROGRAMS = 512  # about this many programs per launch once there are enough tiles (132 SMs on an H100)
CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}  # fallback: values per chunk of tokens (all heads together)


@dataclass
class Moments:
    """Outlier statistics of one [heads, tokens, channels] tensor (device tensors, views of one table)."""

    n: int  # values per head
    table: torch.Tensor  # [8, H] float64: OUTLIER_METRICS, then mean, var (M2 / n), m4 (M4 / n), count beyond 6 std
    channel_absmax: torch.Tensor  # [H, C] float32, max |x| over tokens
    channel_max: torch.Tensor  # [H, C] float32, signed max over tokens
    channel_min: torch.Tensor  # [H, C] float32, signed min over tokens
    channel_mean: torch.Tensor  # [H, C] mean over tokens (float64 from torch, float32 from triton)
    channel_smoothed: torch.Tensor | None = None  # [H, C] float32 max |x - channel mean| (triton; torch: on demand)

    mean = property(lambda self: self.table[4])
    var = property(lambda self: self.table[5])  # population variance
    m4 = property(lambda self: self.table[6])  # fourth central moment
    count_6sigma = property(lambda self: self.table[7])  # values with |x - mean| > 6 std


@dataclass
class SiteStats:
    """Everything the run file stores for one (site, path) pair, as small device tensors."""

    shape: tuple[int, int, int]  # (heads, tokens, channels) of the inputs
    sums: torch.Tensor | None  # [6, H] float64 (XX, RR, DD, AD, AR, MAXD); None without a reference
    table: torch.Tensor | None  # [5, H + 1] float64: DRIFT_METRICS per head, then over all heads (last column)
    position: torch.Tensor | None  # [2, T] float64: sum (x-r)^2 and sum r^2 per token, over heads and channels
    x: Moments | None  # outlier statistics of x (stats_of "x")
    ref: Moments | None  # outlier statistics of the reference (stats_of "ref")
    backend: str  # "triton" or "torch"
    nonfinite: torch.Tensor | None = None  # [1 or 2, H] int32: NaN and +-inf values of x (and of ref) per head

    @property
    def n(self) -> int:
        """Values per head."""
        return self.shape[1] * self.shape[2]


# -- public API -------------------------------------------------------------------------------------------------
def site_stats(x: torch.Tensor, ref: torch.Tensor | None = None, *, stats_of: tuple[str, ...] | str = (),
               positions: bool = False, nonfinite: bool = False, backend: str = "auto",
               chunk_elems: int | None = None) -> SiteStats:
    """All statistics of x [heads, tokens, channels] (or [tokens, channels], one head) against ref, one read each.

    ref None: outlier statistics of x only. stats_of: the tensors ("x", "ref") whose outlier statistics
    (moments, absmax, channel profile, 6-sigma count) are wanted; drift needs no flag (it comes with ref).
    positions: also the per-token sums for `rel_l2_by_position` (needs ref). nonfinite: also count the NaN and
    infinite values of x and ref per head (`SiteStats.nonfinite`). backend: "auto" (Triton for CUDA
    tensors when Triton imports, else torch), "torch", or "triton" (CPU tensors only under TRITON_INTERPRET=1).
    chunk_elems: the torch fallback's values per chunk of tokens (default CHUNK_ELEMS of the device type).
    No host synchronization on CUDA: every result stays on the device.
    """
    x3, r3 = _as_3d(x, "x"), None if ref is None else _as_3d(ref, "ref")
    stats_of = (stats_of,) if isinstance(stats_of, str) else tuple(stats_of)
    if any(w not in ("x", "ref") for w in stats_of):
        raise ValueError(f"stats_of must name 'x' and/or 'ref', found {stats_of=}")
    if r3 is None:
        if "ref" in stats_of or positions:
            raise ValueError(f"stats of the reference need ref; found ref=None with {stats_of=}, {positions=}")
        stats_of = stats_of or ("x",)
    elif r3.shape != x3.shape:
        raise ValueError(f"x and ref must have the same shape, found {tuple(x.shape)=} and {tuple(ref.shape)=}")
    elif r3.device != x3.device:
        raise ValueError(f"x and ref must be on one device, found {x.device=} and {ref.device=}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, found {backend=}")
    which = [w for w in ("x", "ref") if w in stats_of]  # in layout order
    use = _choose_backend(backend, x3)
    H, T, C = x3.shape
    if use == "triton":
        part, chan, pos, launch = _triton_partials(x3, r3, "x" in which, "ref" in which, positions)
        sums, table, moments = _triton_finish(x3, r3, which, part, chan, launch)
    else:
        chunk_elems = chunk_elems or CHUNK_ELEMS.get(x3.device.type, CHUNK_ELEMS["cuda"])
        part, chan, pos, kept = _torch_partials(x3, r3, "x" in which, "ref" in which, positions, chunk_elems)
        sums, table, moments = _torch_finish(x3, r3, which, part, chan, kept, chunk_elems)
    position = None if pos is None else pos.to(torch.float64).reshape(2, -1, T).sum(1)
    counts = None
    if nonfinite:  # a head's sum of squares (or variance) is finite unless one of its values is not
        flags = [sums[XX] if sums is not None else moments["x"].var] + ([] if sums is None else [sums[RR]])
        counts = _nonfinite_counts([x3, r3][:len(flags)], flags, use)
    return SiteStats((H, T, C), sums, table, position, moments.get("x"), moments.get("ref"), use, counts)


def drift(s: SiteStats, pooled: bool = False) -> dict[str, torch.Tensor]:
    """Drift of x against ref: each of DRIFT_METRICS as float64 [heads], or [1] over all heads (pooled).

    Views of one table made by site_stats: no kernels. cosine = 1 + ((|x| - |r|)^2 - |x - r|^2) / (2 |x| |r|),
    clamped to [-1, 1] and 0 where a norm is 0 (as <x,r>/tiny was); exactly 1 when x == r.
    rel_l2 = |x - r| / |r|, rel_l1 = sum |x - r| / sum |r| (SageAttention's own accuracy metric),
    rmse = sqrt(mean (x - r)^2), max_abs = max |x - r|.
    """
    if s.table is None:
        raise ValueError("drift needs SiteStats made with a reference (site_stats(x, ref))")
    cols = s.table[:, -1:] if pooled else s.table[:, :-1]
    return dict(zip(DRIFT_METRICS, cols))


def drift_sums(s: SiteStats) -> torch.Tensor:
    """The sufficient statistics of drift, float64 [7, heads]: sum x*r, x^2, r^2, d^2, |d|, |r|, max |d|.

    sum x*r is not read by the kernel; it is (sum x^2 + sum r^2 - sum d^2) / 2 (exactly sum x^2 when x == r).
    """
    if s.sums is None:
        raise ValueError("drift_sums needs SiteStats made with a reference (site_stats(x, ref))")
    xx, rr, dd = s.sums[XX], s.sums[RR], s.sums[DD]
    return torch.cat([((xx + rr - dd) / 2)[None], s.sums])


def rel_l2_by_position(s: SiteStats, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative L2 over all heads and channels per bin of consecutive tokens: (bin starts [nbins] int64,
    rel-L2 [nbins] float64); bins of ceil(T / bins) tokens, the last one possibly shorter."""
    if s.position is None:
        raise ValueError("rel_l2_by_position needs site_stats(x, ref, positions=True)")
    T = s.position.shape[1]
    width = max(1, -(-T // bins))
    starts = torch.arange(0, T, width, device=s.position.device)
    pad = starts.numel() * width - T
    num, den = torch.nn.functional.pad(s.position, (0, pad)).view(2, -1, width).sum(2)
    return starts, (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def outliers(s: SiteStats, of: str = "x") -> dict[str, torch.Tensor]:
    """Outlier statistics per head of x or of the reference (of="ref"), float64 [heads]:
    absmax, channel_max_median (max over channels of the channel absmax over its median), kurtosis (Pearson,
    normal = 3), frac_6sigma (fraction of values with |x - mean| > 6 std). Views: no kernels."""
    return dict(zip(OUTLIER_METRICS, _moments(s, of).table))


def outlier_table(s: SiteStats, of: str = "x") -> torch.Tensor:
    """`outliers(s, of)` as one float64 view [len(OUTLIER_METRICS), heads], a row per metric."""
    return _moments(s, of).table[:len(OUTLIER_METRICS)]


def channel_absmax(s: SiteStats, of: str = "x", smoothed: bool = False) -> torch.Tensor:
    """Per-channel absmax profile float32 [heads, channels] (max over tokens) of x or the reference.

    smoothed=True: of the tensor minus its mean over tokens (SageAttention's smoothing of K), i.e.
    max(channel max - channel mean, channel mean - channel min); computed in float64 rather than in the input
    dtype as the kernel smooths, so it differs from that by the input dtype's rounding (~eps of the dtype).
    """
    m = _moments(s, of)
    if not smoothed:
        return m.channel_absmax
    if m.channel_smoothed is not None:  # the channel kernel's, by the same formula
        return m.channel_smoothed
    hi, lo = m.channel_max.to(torch.float64), m.channel_min.to(torch.float64)
    return torch.maximum(hi - m.channel_mean, m.channel_mean - lo).to(torch.float32)


# -- shared helpers ---------------------------------------------------------------------------------------------
def block_absmax(x_HxTxD: torch.Tensor, block: int, backend: str = "auto") -> torch.Tensor:
    """max |x| per head and block of `block` consecutive tokens, [H, ceil(T / block)] in x's dtype (NaN where the
    block holds one): the scales of a per-block INT8 quantization. One read of x, which may be strided (the
    attention's q is [H, T, D] over [T, H, D] memory): a Triton kernel on CUDA, else one aminmax along D
    (backend as in `site_stats`)."""
    H, T, D = x_HxTxD.shape
    if _choose_backend(backend, x_HxTxD) == "triton":
        out = torch.empty(H, -(-T // block), dtype=x_HxTxD.dtype, device=x_HxTxD.device)
        rows = max(1, min(block, 4096 // _next_pow2(D)))
        with _device_ctx(x_HxTxD):
            _triton_kernels().block_absmax[(out.shape[1], H)](
                x_HxTxD, out, T, D, *x_HxTxD.stride(), BLOCK=block, ROWS=rows, BLOCK_D=_next_pow2(D), num_warps=4)
        return out
    lo, hi = torch.aminmax(x_HxTxD, dim=-1)  # per token, without a |x| temporary
    per_token = torch.maximum(hi.abs_(), lo.abs_())
    return torch.nn.functional.pad(per_token, (0, -T % block)).view(H, -1, block).amax(-1)


def prefix_centred_sq(x_NxRxT: torch.Tensor, kept_R: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per row of x (fp32 [..., R, T], contiguous): the sum over its first kept_R[r] entries of (x - their mean)^2,
    float32 [..., R] (the causal scores of sampled query rows against ascending keys). The mean is removed before
    squaring, so nothing cancels. A Triton kernel on CUDA (one read of x), else masked torch ops."""
    *_, R, T = x_NxRxT.shape
    if _choose_backend(backend, x_NxRxT) == "triton":
        out = torch.empty(x_NxRxT.shape[:-1], dtype=torch.float32, device=x_NxRxT.device)
        with _device_ctx(x_NxRxT):
            _triton_kernels().prefix_centred[(out.numel(),)](x_NxRxT, kept_R, out, R, T, BLOCK=1024, num_warps=4)
        return out
    drop = torch.arange(T, device=x_NxRxT.device) >= kept_R[:, None]  # [R, T]
    x = x_NxRxT.masked_fill(drop, 0.0)
    x = x.sub_(x.sum(-1, keepdim=True) / kept_R[:, None].clamp_min(1)).masked_fill_(drop, 0.0)
    return torch.linalg.vector_norm(x, dim=-1).square_()


def _as_3d(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
        raise ValueError(f"{name} must be a [heads, tokens, channels] or [tokens, channels] tensor, "
                         f"found {getattr(t, 'shape', type(t))}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, found {t.dtype=}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: {tuple(t.shape)=}")
    return t if t.dim() == 3 else t[None]


def _moments(s: SiteStats, of: str) -> Moments:
    if of not in ("x", "ref"):
        raise ValueError(f"of must be 'x' or 'ref', found {of=}")
    m = s.x if of == "x" else s.ref
    if m is None:
        raise ValueError(f"no outlier statistics of {of!r}: pass stats_of=({of!r},) to site_stats")
    return m


# The torch backend's float64 combine works on tiny [k, H, P] arrays. On the CPU it runs in numpy (zero-copy views
# of the torch tensors; ~1 us per op where a torch op costs ~10 us), elsewhere in torch: the same code, `xp`.
def _floor(a, v):
    """max(a, v) elementwise for a scalar v (torch.maximum wants a tensor)."""
    return torch.where(a > v, a, v) if isinstance(a, torch.Tensor) else np.where(a > v, a, v)


def _f64(a):
    return a.to(torch.float64) if isinstance(a, torch.Tensor) else a.astype("float64")


def _drift_table(sums, n: int, xp):
    """DRIFT_METRICS [5, H + 1] from sums [6, H]; the last column is over all heads. For it the additive sums are
    averaged over heads rather than summed: every metric is a ratio of them, except rmse, which then needs n alone."""
    pooled = xp.concatenate([sums[:MAXD].mean(1)[:, None], xp.amax(sums[MAXD:], 1)[:, None]])
    xx, rr, dd, ad, ar, dmax = xp.concatenate([sums, pooled], 1)
    tiny = 2.2250738585072014e-308  # float64's smallest normal
    nx, nr = xp.sqrt(xx), xp.sqrt(rr)
    both = nx * nr
    # the law of cosines: exactly 1 when x == r (dd == 0 and nx == nr bitwise)
    cos = ((nx - nr) ** 2 - dd) / _floor(2 * both, tiny) + 1
    cos = xp.where(both > 0, xp.where(cos > 1.0, 1.0, xp.where(cos < -1.0, -1.0, cos)), 0.0)
    return xp.stack([cos, xp.sqrt(dd) / _floor(nr, tiny), ad / _floor(ar, tiny), xp.sqrt(dd / n), dmax])


def _merge_moments(p, xp):
    """Combine per-partial (n, shift, S1..S4, max, min) [..., P, 8] (float64; S_k = sum (v - shift)^k) into
    float64 [...] each: mean, var (M2 / n), m4 (M4 / n), max, min.

    Each partial's central sums first, with delta = S1 / n (its mean minus its shift): M2 = S2 - n delta^2,
    M3 = S3 - 3 delta S2 + 2 n delta^3, M4 = S4 - 4 delta S3 + 6 delta^2 S2 - 3 n delta^4; then around the global
    mean, with e_b = mean_b - mean: M2 = sum M2_b + n_b e^2, M4 = sum M4_b + 4 e M3_b + 6 e^2 M2_b + n_b e^4
    (binomial expansions; nothing cancels as long as shifts are near the means, which they are by construction).
    """
    n, shift, s1, s2, s3, s4, vmax, vmin = (p[..., i] for i in range(8))
    dl = s1 / _floor(n, 1.0)
    dl2 = dl * dl
    m2 = s2 - s1 * dl
    m4 = s4 - 4 * dl * s3 + 6 * dl2 * s2 - 3 * n * dl2 * dl2
    if p.shape[-2] == 1:  # one partial per head (the unchunked fallback): it is the head
        return (shift + dl)[..., 0], (m2 / n)[..., 0], (m4 / n)[..., 0], vmax[..., 0], vmin[..., 0]
    m3 = s3 - 3 * dl * s2 + 2 * n * dl2 * dl
    mb = shift + dl
    total = n.sum(-1)
    mean = (n * mb).sum(-1) / total
    e = mb - mean[..., None]
    e2 = e * e
    M2 = (m2 + n * e2).sum(-1)
    M4 = (m4 + 4 * e * m3 + 6 * e2 * m2 + n * e2 * e2).sum(-1)
    return mean, M2 / total, M4 / total, xp.amax(vmax, -1), xp.amin(vmin, -1)


def _finish_moments(m, chan, T, C, count_fn, xp):
    """Outlier tables of k tensors at once: m [k, H, P, 8] float64 partial moments, chan [k, 3, H, P', C] partial
    channel max/min/sum. Returns (table [8, k, H], channel absmax, max, min [k, H, C] float32, mean float64)."""
    mean, var, m4, vmax, vmin = _merge_moments(m, xp)  # [k, H]
    lim = 6.0 * xp.sqrt(var)
    need = (xp.maximum(vmax - mean, mean - vmin) > lim) & (lim > 0)  # else no value can be beyond 6 std
    count = count_fn(*map(_as_tensor, (mean, lim, need)))  # [k, H] float64, a torch tensor
    count = count.numpy() if xp is not torch else count
    cmax, cmin = xp.amax(chan[:, 0], -2), xp.amin(chan[:, 1], -2)
    cmean = _f64(chan[:, 2]).sum(-2) / T
    cabs = xp.maximum(cmax, -cmin)
    mid = (C - 1) // 2  # torch.median's median: the lower of the two middle values
    median = cabs.median(-1).values if xp is torch else xp.partition(cabs, mid, -1)[..., mid]
    cmm = xp.amax(cabs, -1) / _floor(median, 1.1754943508222875e-38)  # float32's smallest normal
    kurt = m4 / _floor(var * var, 2.2250738585072014e-308)
    table = xp.stack([xp.maximum(vmax, -vmin), _f64(cmm), kurt, count / (T * C), mean, var, m4, count])
    return table, cabs, cmax, cmin, cmean


def _as_tensor(a):
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(a)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _choose_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "torch":
        return "torch"
    if backend == "triton":
        k = _triton_kernels()
        if isinstance(k, str):
            raise RuntimeError(f"backend='triton' needs triton: {k}")
        if x.device.type == "cpu" and not k.interpreted:
            raise RuntimeError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                               "in the environment before triton is first imported")
        if x.device.type == "cuda" and k.interpreted:
            raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so its kernels cannot run on CUDA "
                               "tensors in this process")
        return "triton"
    if x.device.type != "cuda":
        return "torch"
    k = _triton_kernels()
    if isinstance(k, str) or k.interpreted:
        why = k if isinstance(k, str) else "triton runs interpreted in this process (TRITON_INTERPRET=1)"
        _warn_once(f"driftscope.measure.fused: Triton unavailable ({why}); statistics use the slower torch fallback")
        return "torch"
    return "triton"


# -- torch fallback ---------------------------------------------------------------------------------------------
def _f32(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A contiguous fp32 version of t, and whether it is a fresh copy (safe to modify in place)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t, False
    return torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t), True


def _sumsq_rows(t: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of t^2, float64 [H, T], in one pass through torch's norm over rows of at most 4096
    values (its fp32 accumulation is not cascaded: ~2e-7 over rows this short, 1e-3 over millions); rows with no
    divisor in [256, 4096] (a prime vocabulary size) are squared and summed by torch's cascaded sum instead."""
    C = t.shape[-1]
    if C <= 4096:
        return torch.linalg.vector_norm(t, dim=-1).to(torch.float64).square()
    k = _row_split(C)
    if k:  # long rows as [C / k, k] sub-rows: still one pass
        return torch.linalg.vector_norm(t.unflatten(-1, (C // k, k)), dim=-1).to(torch.float64).square().sum(-1)
    return t.square().sum(-1).to(torch.float64)


@functools.cache
def _row_split(C: int) -> int:
    """The largest divisor of C in [256, 4096], or 0."""
    return next((k for k in range(4096, 255, -1) if C % k == 0), 0)


def _chunk_step(H: int, T: int, C: int, chunk_elems: int) -> int:
    return max(1, min(T, chunk_elems // max(1, H * C)))


def _torch_partials(x, r, want_x, want_r, positions, chunk_elems):
    """Partials [H, chunks, NSTAT] float64, channel partials [2, 3, H, chunks, C] fp32, per-token sums [2, H, T]
    float64 (or None), and for an unchunked tensor its centred squares (kept for the 6-sigma count)."""
    H, T, C = x.shape
    step = _chunk_step(H, T, C, chunk_elems)
    starts = range(0, T, step)
    dev = x.device
    part = torch.zeros(H, len(starts), NSTAT, dtype=torch.float64, device=dev)
    chan = torch.zeros(2, 3, H, len(starts), C, dtype=torch.float32, device=dev)
    pos = torch.zeros(2, H, T, dtype=torch.float64, device=dev) if positions else None
    kept = {}
    single = len(starts) == 1
    for j, t0 in enumerate(starts):
        t1 = min(T, t0 + step)
        xf, x_own = _f32(x[:, t0:t1])
        rf, r_own = (None, False) if r is None else _f32(r[:, t0:t1])
        cols: dict[int, torch.Tensor] = {}
        if rf is not None:
            d = xf - rf  # exact for half inputs
            xx, rr = _sumsq_rows(xf), _sumsq_rows(rf)  # the same ops: bitwise equal when x == r
            d.abs_()
            dd = _sumsq_rows(d)
            flat = d.view(H, -1)
            cols.update({XX: xx.sum(1), RR: rr.sum(1), DD: dd.sum(1), AD: flat.sum(1), MAXD: flat.amax(1)})
            del d, flat
            cols[AR] = rf.abs().view(H, -1).sum(1)
            if pos is not None:
                pos[0, :, t0:t1], pos[1, :, t0:t1] = dd, rr
        for which, tf, own, want, off, k in (("x", xf, x_own, want_x, MOM_X, 0), ("ref", rf, r_own, want_r, MOM_R, 1)):
            if want:
                c2 = _torch_moments(tf, own, off, cols, chan[k, :, :, j], want_m3=not single)
                if single:
                    kept[which] = c2
        for lo, hi in ((0, MOM_X), (MOM_X, MOM_R), (MOM_R, NSTAT)):  # slices, not index lists (no H2D copies)
            if lo in cols:
                zero = torch.zeros_like(cols[lo])
                part[:, j, lo:hi] = torch.stack([cols.get(i, zero) for i in range(lo, hi)], 1)
    return part, chan, pos, kept


def _torch_moments(tf, own, off, cols, chan, want_m3):
    """Moments of one chunk tf [H, t, C] fp32 into cols (slots off + N_ ...) and chan [3, H, C]; returns the
    centred squares c^2 (for the 6-sigma count; fp32, safe to modify). tf is modified in place if own."""
    H, t, C = tf.shape
    torch.amax(tf, 1, out=chan[0])
    torch.amin(tf, 1, out=chan[1])
    torch.sum(tf, 1, out=chan[2])
    shift = (chan[2].to(torch.float64).sum(1) / (t * C)).to(torch.float32)  # the mean, rounded to fp32
    c = tf.sub_(shift[:, None, None]) if own else tf - shift[:, None, None]
    flat = c.view(H, -1)
    cols[off + N_] = torch.full_like(shift, t * C)
    cols[off + SHIFT] = shift
    cols[off + S1] = flat.sum(1)  # corrects for the rounding of the shift
    if want_m3:  # chunked: S3 is needed to merge chunks (unchunked, the shift is the mean and S3's term ~ 0)
        cols[off + S3] = (c.square() * c).view(H, -1).sum(1)
    c.square_()
    cols[off + S2] = flat.sum(1)
    cols[off + S4] = _sumsq_rows(c).sum(1)
    cols[off + VMAX] = chan[0].amax(1)
    cols[off + VMIN] = chan[1].amin(1)
    return c


def _torch_finish(x, r, which, part, chan, kept, chunk_elems):
    """sums [6, H], drift table [5, H + 1] and {which: Moments} from the fallback's partials (numpy on the CPU)."""
    H, T, C = x.shape
    xp = np if part.device.type == "cpu" else torch
    pa, ca = (part.numpy(), chan.numpy()) if xp is np else (part, chan)
    sums = table = None
    if r is not None:
        sums = xp.concatenate([pa[..., :MAXD].sum(1), xp.amax(pa[..., MAXD:MOM_X], 1)], 1).T  # [6, H]
        table = _as_tensor(_drift_table(sums, T * C, xp))
        sums = _as_tensor(xp.ascontiguousarray(sums) if xp is np else sums)
    moments = {}
    if which:
        k = [("x", "ref").index(w) for w in which]
        m = (pa[..., MOM_X:].reshape(H, -1, 2, 8).transpose(2, 0, 1, 3) if xp is np
             else pa[..., MOM_X:].view(H, -1, 2, 8).permute(2, 0, 1, 3))  # [2, H, P, 8]
        tensors = [x if w == "x" else r for w in which]
        count_fn = functools.partial(_torch_count, tensors, [kept.get(w) for w in which], chunk_elems)
        found = _finish_moments(m[k[0]:k[-1] + 1], ca[k[0]:k[-1] + 1], T, C, count_fn, xp)
        tab, cabs, cmax, cmin, cmean = map(_as_tensor, found)
        for i, w in enumerate(which):
            moments[w] = Moments(T * C, tab[:, i], cabs[i], cmax[i], cmin[i], cmean[i])
    return sums, table, moments


def _torch_count(tensors, kept, chunk_elems, mean, lim, need):
    """Values with |t - mean| > lim per head, float64 [k, H], for each of the k tensors; only heads that `need` it
    are looked at on the CPU (on CUDA every head is counted and masked: no host sync)."""
    out = torch.zeros_like(mean)
    on_cpu = mean.device.type == "cpu"
    lim2 = lim.square().to(torch.float32)[..., None, None]  # compare squares: c^2 > (6 std)^2
    for i, t in enumerate(tensors):
        if on_cpu and not bool(need[i].any()):
            continue
        H, T, C = t.shape
        if kept[i] is not None:
            parts = [kept[i]]
        else:  # chunked: a second pass over the chunks
            step = _chunk_step(H, T, C, chunk_elems)
            shift = mean[i].to(torch.float32)[:, None, None]
            parts = ((t[:, t0:t0 + step].to(torch.float32) - shift).square_() for t0 in range(0, T, step))
        for c2 in parts:  # c2 is ours: gt_ in place gives 1.0 / 0.0 (torch's boolean temporaries are slow on CPUs)
            out[i] += c2.gt_(lim2[i]).view(H, -1).sum(1).to(torch.float64)
    return torch.where(need, out, 0.0)


def _nonfinite_counts(tensors, flags, backend: str) -> torch.Tensor:
    """NaN and +-inf values per head [len(tensors), H] int32, looked for only in heads whose flag (a float64 sum
    over the head, [H]) is not finite: on CUDA a masked kernel launch (no traffic, no host sync) and nothing else
    when every value is finite; on the CPU a host check."""
    H, T, C = tensors[0].shape
    cnt = torch.zeros(len(tensors), H, dtype=torch.int32, device=tensors[0].device)
    if backend == "triton":
        k = _triton_kernels()
        block_t, block_c, iters, grid = _launch_shape(H, T, C)
    for i, (t, flag) in enumerate(zip(tensors, flags)):
        if backend == "triton":
            with _device_ctx(t):
                k.count[grid](t, flag, cnt[i], T, C, t.stride(0), t.stride(1), t.stride(2), iters,
                              BLOCK_T=block_t, BLOCK_C=block_c, NONFINITE=True, num_warps=_warps(block_t, block_c))
        elif t.device.type != "cpu" or not bool(flag.isfinite().all()):
            cnt[i] = t.isfinite().logical_not_().sum(dim=(1, 2), dtype=torch.int32)
    return cnt


# -- Triton -----------------------------------------------------------------------------------------------------
# Bound by _triton_kernels(): importing triton costs ~0.5 s, and fixes interpreted vs compiled for the process.
triton = tl = _tl_moments = _tl_outliers = _tl_moment_step = None


@functools.cache
def _triton_kernels():
    """The jitted kernels (a namespace), or a string saying why Triton is unavailable."""
    # Everything a kernel calls must be a module global (Triton resolves names through fn.__globals__).
    global triton, tl, _tl_moments, _tl_outliers, _tl_moment_step
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        return f"cannot import triton: {e}"
    from types import SimpleNamespace

    @triton.jit
    def _tl_moment_step(v, valid, shift, s1, s2, s3, s4, hi, lo, total):
        """One tile's contribution to a tensor's elementwise accumulators: sums of (v - shift)^1..4, max, min and
        the plain sum (the channel mean), over the valid entries."""
        c = tl.where(valid, v - shift, 0.0)
        c2 = c * c
        return (s1 + c, s2 + c2, s3 + c2 * c, s4 + c2 * c2, tl.maximum(hi, tl.where(valid, v, float("-inf"))),
                tl.minimum(lo, tl.where(valid, v, float("inf"))), total + v)

    @triton.jit
    def _site_kernel(x_ptr, r_ptr, part_ptr, chan_ptr, pos_ptr, T, C,
                     sxh, sxt, sxc, srh, srt, src, iters,
                     HAS_REF: tl.constexpr, MOM_X: tl.constexpr, MOM_R: tl.constexpr, POS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NSTAT: tl.constexpr):
        # grid (token programs, channel blocks, heads); a program walks `iters` tiles of BLOCK_T tokens. Every sum,
        # max and min runs elementwise in [BLOCK_T, BLOCK_C] fp32 registers and is reduced once, at the end (a
        # reduction per tile and statistic made the kernel compute-bound at ~1.3 TB/s); only the per-token sums
        # of `POS` are reduced per tile. The next tile's loads are issued before this tile's arithmetic.
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        h = tl.program_id(2)
        n_tp = tl.num_programs(0)
        n_cb = tl.num_programs(1)
        n_h = tl.num_programs(2)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        n_cols = tl.minimum(C - pid_c * BLOCK_C, BLOCK_C)
        x_base = x_ptr + h.to(tl.int64) * sxh
        r_base = r_ptr + h.to(tl.int64) * srh
        x_cols = cols.to(tl.int64)[None, :] * sxc
        r_cols = cols.to(tl.int64)[None, :] * src
        t_first = pid_t * iters * BLOCK_T
        n_rows = tl.minimum(T - t_first, iters * BLOCK_T)  # >= 1 for every program
        t_end = t_first + n_rows
        rows = t_first + tl.arange(0, BLOCK_T)
        mask = (rows < t_end)[:, None] & cmask[None, :]
        x_next = tl.load(x_base + rows.to(tl.int64)[:, None] * sxt + x_cols, mask=mask, other=0.0)
        r_next = x_next
        if HAS_REF:
            r_next = tl.load(r_base + rows.to(tl.int64)[:, None] * srt + r_cols, mask=mask, other=0.0)
        # shifts: the mean of the program's first tile, near the program's mean, so that converting the shifted
        # power sums below into central moments (in float64, afterwards) cancels nothing that matters
        n0 = (tl.minimum(T - t_first, BLOCK_T) * n_cols).to(tl.float32)
        sx = tl.sum(tl.sum(x_next.to(tl.float32), axis=1), axis=0) / n0
        sr = tl.sum(tl.sum(r_next.to(tl.float32), axis=1), axis=0) / n0
        zt = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        a_xx = zt
        a_rr = zt
        a_dd = zt
        a_ad = zt
        a_ar = zt
        a_md = zt
        x1 = zt
        x2 = zt
        x3 = zt
        x4 = zt
        r1 = zt
        r2 = zt
        r3 = zt
        r4 = zt
        hx = tl.full([BLOCK_T, BLOCK_C], float("-inf"), tl.float32)
        lx = tl.full([BLOCK_T, BLOCK_C], float("inf"), tl.float32)
        cx = zt
        hr = hx
        lr = lx
        cr = zt
        for i in range(iters):
            x = x_next.to(tl.float32)
            r = r_next.to(tl.float32)
            here = rows
            valid = mask
            rows = rows + BLOCK_T  # the next tile, loaded while this one is summed
            mask = (rows < t_end)[:, None] & cmask[None, :]  # (all False after the last tile)
            x_next = tl.load(x_base + rows.to(tl.int64)[:, None] * sxt + x_cols, mask=mask, other=0.0)
            if HAS_REF:
                r_next = tl.load(r_base + rows.to(tl.int64)[:, None] * srt + r_cols, mask=mask, other=0.0)
                d = x - r  # exact for half inputs: x == r gives 0
                ad = tl.abs(d)
                a_xx += x * x  # the same expression as a_rr's: bitwise equal when x == r
                a_rr += r * r
                a_dd += d * d
                a_ad += ad
                a_ar += tl.abs(r)
                a_md = tl.maximum(a_md, ad)
                if POS:
                    pidx = (h * n_cb + pid_c).to(tl.int64) * T + here
                    tl.store(pos_ptr + pidx, tl.sum(d * d, axis=1), mask=here < T)
                    tl.store(pos_ptr + n_h.to(tl.int64) * n_cb * T + pidx, tl.sum(r * r, axis=1), mask=here < T)
                if MOM_R:
                    r1, r2, r3, r4, hr, lr, cr = _tl_moment_step(r, valid, sr, r1, r2, r3, r4, hr, lr, cr)
            if MOM_X:
                x1, x2, x3, x4, hx, lx, cx = _tl_moment_step(x, valid, sx, x1, x2, x3, x4, hx, lx, cx)
        out = part_ptr + ((h * n_cb + pid_c) * n_tp + pid_t).to(tl.int64) * NSTAT
        if HAS_REF:
            tl.store(out + 0, tl.sum(a_xx))
            tl.store(out + 1, tl.sum(a_rr))
            tl.store(out + 2, tl.sum(a_dd))
            tl.store(out + 3, tl.sum(a_ad))
            tl.store(out + 4, tl.sum(a_ar))
            tl.store(out + 5, tl.max(a_md))
        # moments: (n, shift, sums of (v - shift)^1..4, max, min); channel partials [2, 3, H, n_tp, C]
        n_prog = (n_rows * n_cols).to(tl.float32)
        plane = n_h.to(tl.int64) * n_tp * C
        cidx = (h * n_tp + pid_t).to(tl.int64) * C + cols
        if MOM_X:
            hc = tl.max(hx, axis=0)
            lc = tl.min(lx, axis=0)
            tl.store(out + 6, n_prog)
            tl.store(out + 7, sx)
            tl.store(out + 8, tl.sum(x1))
            tl.store(out + 9, tl.sum(x2))
            tl.store(out + 10, tl.sum(x3))
            tl.store(out + 11, tl.sum(x4))
            tl.store(out + 12, tl.max(hc, axis=0))
            tl.store(out + 13, tl.min(lc, axis=0))
            tl.store(chan_ptr + cidx, hc, mask=cmask)
            tl.store(chan_ptr + plane + cidx, lc, mask=cmask)
            tl.store(chan_ptr + 2 * plane + cidx, tl.sum(cx, axis=0), mask=cmask)
        if MOM_R:
            hc = tl.max(hr, axis=0)
            lc = tl.min(lr, axis=0)
            tl.store(out + 14, n_prog)
            tl.store(out + 15, sr)
            tl.store(out + 16, tl.sum(r1))
            tl.store(out + 17, tl.sum(r2))
            tl.store(out + 18, tl.sum(r3))
            tl.store(out + 19, tl.sum(r4))
            tl.store(out + 20, tl.max(hc, axis=0))
            tl.store(out + 21, tl.min(lc, axis=0))
            tl.store(chan_ptr + 3 * plane + cidx, hc, mask=cmask)
            tl.store(chan_ptr + 4 * plane + cidx, lc, mask=cmask)
            tl.store(chan_ptr + 5 * plane + cidx, tl.sum(cr, axis=0), mask=cmask)

    @triton.jit
    def _tl_moments(part_ptr, row0, P, OFF: tl.constexpr, NSTAT: tl.constexpr, BLOCK_P: tl.constexpr):
        """(mean, M2 / n, M4 / n, max, min) in float64 from P partial rows (n, shift, S1..S4, max, min) at OFF:
        each row's central sums from its shifted ones, then the binomial merge around the global mean."""
        offs = tl.arange(0, BLOCK_P)
        acc_n = tl.zeros([BLOCK_P], dtype=tl.float64)
        acc_nm = tl.zeros([BLOCK_P], dtype=tl.float64)
        vmax = tl.full([BLOCK_P], float("-inf"), tl.float64)
        vmin = tl.full([BLOCK_P], float("inf"), tl.float64)
        for p0 in range(0, P, BLOCK_P):
            pm = p0 + offs < P
            base = part_ptr + (row0 + p0 + offs).to(tl.int64) * NSTAT + OFF
            n = tl.load(base, mask=pm, other=0.0).to(tl.float64)
            mb = tl.load(base + 1, mask=pm, other=0.0).to(tl.float64) + \
                tl.load(base + 2, mask=pm, other=0.0).to(tl.float64) / tl.maximum(n, 1.0)
            acc_n += n
            acc_nm += n * mb
            vmax = tl.maximum(vmax, tl.load(base + 6, mask=pm, other=float("-inf")).to(tl.float64))
            vmin = tl.minimum(vmin, tl.load(base + 7, mask=pm, other=float("inf")).to(tl.float64))
        total = tl.sum(acc_n, axis=0)
        mean = tl.sum(acc_nm, axis=0) / total
        acc2 = tl.zeros([BLOCK_P], dtype=tl.float64)
        acc4 = tl.zeros([BLOCK_P], dtype=tl.float64)
        for p0 in range(0, P, BLOCK_P):
            pm = p0 + offs < P
            base = part_ptr + (row0 + p0 + offs).to(tl.int64) * NSTAT + OFF
            n = tl.load(base, mask=pm, other=0.0).to(tl.float64)
            shift = tl.load(base + 1, mask=pm, other=0.0).to(tl.float64)
            s1 = tl.load(base + 2, mask=pm, other=0.0).to(tl.float64)
            s2 = tl.load(base + 3, mask=pm, other=0.0).to(tl.float64)
            s3 = tl.load(base + 4, mask=pm, other=0.0).to(tl.float64)
            s4 = tl.load(base + 5, mask=pm, other=0.0).to(tl.float64)
            dl = s1 / tl.maximum(n, 1.0)
            dl2 = dl * dl
            m2 = s2 - s1 * dl
            m3 = s3 - 3.0 * dl * s2 + 2.0 * n * dl2 * dl
            m4 = s4 - 4.0 * dl * s3 + 6.0 * dl2 * s2 - 3.0 * n * dl2 * dl2
            e = shift + dl - mean
            e2 = e * e
            acc2 += m2 + n * e2
            acc4 += m4 + 4.0 * e * m3 + 6.0 * e2 * m2 + n * e2 * e2
        return mean, tl.sum(acc2, axis=0) / total, tl.sum(acc4, axis=0) / total, tl.max(vmax, axis=0), \
            tl.min(vmin, axis=0)

    @triton.jit
    def _tl_outliers(part_ptr, mom_ptr, thr_ptr, cnt_ptr, h, H, P, K: tl.constexpr, OFF: tl.constexpr,
                     NSTAT: tl.constexpr, BLOCK_P: tl.constexpr):
        """Head h's rows of the outlier table mom[K, :, h] and its count thresholds thr[K, h] (mean, 6 std,
        needed) from the site kernel's partials of tensor K (at OFF); zeroes its count cnt[K, h]."""
        mean, var, m4, vmax, vmin = _tl_moments(part_ptr, h * P, P, OFF, NSTAT, BLOCK_P)
        tiny = tl.full([], 2.2250738585072014e-308, tl.float64)
        lim = 6.0 * tl.sqrt(var)
        need = (tl.maximum(vmax - mean, mean - vmin) > lim) & (lim > 0.0)
        mom = mom_ptr + K * 8 * H + h
        tl.store(mom, tl.maximum(vmax, -vmin))
        tl.store(mom + 2 * H, m4 / tl.maximum(var * var, tiny))
        tl.store(mom + 4 * H, mean)
        tl.store(mom + 5 * H, var)
        tl.store(mom + 6 * H, m4)
        thr = thr_ptr + (K * H + h) * 3
        tl.store(thr, mean.to(tl.float32))
        tl.store(thr + 1, lim.to(tl.float32))
        tl.store(thr + 2, tl.where(need, 1.0, 0.0).to(tl.float32))
        tl.store(cnt_ptr + K * H + h, 0)

    @triton.jit
    def _channel_kernel(chan_ptr, ch_ptr, H, n_tp, C, T, KOFF, BLOCK_TP: tl.constexpr, BLOCK_C: tl.constexpr):
        # grid (channel blocks, H, tensors): the channel profiles ch[k, (absmax, max, min, mean, smoothed), h, :]
        # from the site kernel's per-program channel max/min/sum, [BLOCK_TP, BLOCK_C] partials at a time;
        # smoothed = max(max - mean, mean - min) (K as smoothing leaves it), from the float32 mean in float64
        pid_c = tl.program_id(0)
        h = tl.program_id(1)
        kk = tl.program_id(2) + KOFF
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cols < C
        tps = tl.arange(0, BLOCK_TP)
        plane = tl.cast(H, tl.int64) * n_tp * C  # H may arrive as a constexpr (Triton specializes 1)
        base = chan_ptr + kk.to(tl.int64) * 3 * plane + h.to(tl.int64) * n_tp * C
        hi = tl.full([BLOCK_TP, BLOCK_C], float("-inf"), tl.float32)
        lo = tl.full([BLOCK_TP, BLOCK_C], float("inf"), tl.float32)
        sm = tl.zeros([BLOCK_TP, BLOCK_C], dtype=tl.float64)
        for t0 in range(0, n_tp, BLOCK_TP):
            tm = (t0 + tps < n_tp)[:, None] & cm[None, :]
            off = (t0 + tps).to(tl.int64)[:, None] * C + cols[None, :]
            hi = tl.maximum(hi, tl.load(base + off, mask=tm, other=float("-inf")))
            lo = tl.minimum(lo, tl.load(base + plane + off, mask=tm, other=float("inf")))
            sm += tl.load(base + 2 * plane + off, mask=tm, other=0.0).to(tl.float64)
        hc = tl.max(hi, axis=0)
        lc = tl.min(lo, axis=0)
        out = ch_ptr + (kk * 5 * H + h).to(tl.int64) * C + cols
        hC = tl.cast(H, tl.int64) * C
        mean = (tl.sum(sm, axis=0) / T).to(tl.float32)
        tl.store(out, tl.maximum(hc, -lc), mask=cm)
        tl.store(out + hC, hc, mask=cm)
        tl.store(out + 2 * hC, lc, mask=cm)
        tl.store(out + 3 * hC, mean, mask=cm)
        m64 = mean.to(tl.float64)
        tl.store(out + 4 * hC, tl.maximum(hc.to(tl.float64) - m64, m64 - lc.to(tl.float64)).to(tl.float32), mask=cm)

    @triton.jit
    def _finish_kernel(cnt_ptr, med_ptr, ch_ptr, mom_ptr, H, C, n_f, KOFF, BLOCK_C: tl.constexpr):
        # grid (H, tensors): the outlier table's rows that need the 6-sigma count and the channel profile:
        # mom[k, 7] = count, mom[k, 3] = count / n, mom[k, 1] = max channel absmax / its median (float32 math)
        h = tl.program_id(0)
        k = tl.program_id(1) + KOFF
        row = ch_ptr + (k * 5 * H + h).to(tl.int64) * C
        top = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            top = tl.maximum(top, tl.load(row + cols, mask=cols < C, other=float("-inf")))
        med = tl.maximum(tl.load(med_ptr + (k - KOFF) * H + h), 1.1754943508222875e-38)  # float32's smallest normal
        cnt = tl.load(cnt_ptr + k * H + h).to(tl.float64)
        mom = mom_ptr + k * 8 * H + h
        tl.store(mom + H, tl.math.div_rn(tl.max(top, axis=0), med).to(tl.float64))
        tl.store(mom + 3 * H, cnt / n_f)
        tl.store(mom + 7 * H, cnt)

    @triton.jit
    def _combine_kernel(part_ptr, sums_ptr, drift_ptr, mom_ptr, thr_ptr, cnt_ptr, H, P, n_f,
                        HAS_REF: tl.constexpr, MOM_X: tl.constexpr, MOM_R: tl.constexpr, NSTAT: tl.constexpr,
                        BLOCK_P: tl.constexpr):
        # grid (H + 1,): program h < H finishes head h, program H the drift over all heads. float64 throughout.
        h = tl.program_id(0)
        if HAS_REF:
            pooled = h >= H
            row0 = tl.where(pooled, 0, h * P)
            rows = tl.where(pooled, H * P, P)
            n = tl.where(pooled, n_f * H, n_f)
            offs = tl.arange(0, BLOCK_P)
            a_xx = tl.zeros([BLOCK_P], dtype=tl.float64)
            a_rr = tl.zeros([BLOCK_P], dtype=tl.float64)
            a_dd = tl.zeros([BLOCK_P], dtype=tl.float64)
            a_ad = tl.zeros([BLOCK_P], dtype=tl.float64)
            a_ar = tl.zeros([BLOCK_P], dtype=tl.float64)
            a_md = tl.zeros([BLOCK_P], dtype=tl.float64)
            for p0 in range(0, rows, BLOCK_P):
                pm = p0 + offs < rows
                base = part_ptr + (row0 + p0 + offs).to(tl.int64) * NSTAT
                a_xx += tl.load(base, mask=pm, other=0.0).to(tl.float64)
                a_rr += tl.load(base + 1, mask=pm, other=0.0).to(tl.float64)
                a_dd += tl.load(base + 2, mask=pm, other=0.0).to(tl.float64)
                a_ad += tl.load(base + 3, mask=pm, other=0.0).to(tl.float64)
                a_ar += tl.load(base + 4, mask=pm, other=0.0).to(tl.float64)
                a_md = tl.maximum(a_md, tl.load(base + 5, mask=pm, other=0.0).to(tl.float64))
            xx = tl.sum(a_xx, axis=0)  # the same sums in the same order: xx == rr bitwise when x == r
            rr = tl.sum(a_rr, axis=0)
            dd = tl.sum(a_dd, axis=0)
            ad = tl.sum(a_ad, axis=0)
            ar = tl.sum(a_ar, axis=0)
            md = tl.max(a_md, axis=0)
            if h < H:
                tl.store(sums_ptr + h, xx)
                tl.store(sums_ptr + H + h, rr)
                tl.store(sums_ptr + 2 * H + h, dd)
                tl.store(sums_ptr + 3 * H + h, ad)
                tl.store(sums_ptr + 4 * H + h, ar)
                tl.store(sums_ptr + 5 * H + h, md)
            tiny = tl.full([], 2.2250738585072014e-308, tl.float64)
            nx = tl.sqrt(xx)
            nr = tl.sqrt(rr)
            both = nx * nr
            cos = ((nx - nr) * (nx - nr) - dd) / tl.maximum(2.0 * both, tiny) + 1.0  # exactly 1 when x == r
            cos = tl.where(both > 0.0, tl.minimum(tl.maximum(cos, -1.0), 1.0), 0.0)
            W = H + 1
            tl.store(drift_ptr + h, cos)
            tl.store(drift_ptr + W + h, tl.sqrt(dd) / tl.maximum(nr, tiny))
            tl.store(drift_ptr + 2 * W + h, ad / tl.maximum(ar, tiny))
            tl.store(drift_ptr + 3 * W + h, tl.sqrt(dd / n))
            tl.store(drift_ptr + 4 * W + h, md)
        if h < H:
            if MOM_X:
                _tl_outliers(part_ptr, mom_ptr, thr_ptr, cnt_ptr, h, H, P, 0, 6, NSTAT, BLOCK_P)
            if MOM_R:
                _tl_outliers(part_ptr, mom_ptr, thr_ptr, cnt_ptr, h, H, P, 1, 14, NSTAT, BLOCK_P)

    @triton.jit
    def _count_kernel(x_ptr, thr_ptr, cnt_ptr, T, C, sxh, sxt, sxc, iters,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NONFINITE: tl.constexpr):
        # counts per head, heads not needed load nothing: |x - mean| > lim, with thr [H, 3] = (mean, lim, needed);
        # or NONFINITE: NaN and +-inf values, needed where the head's sum thr [H] (float64) is not finite
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        h = tl.program_id(2)
        if NONFINITE:
            flag = tl.load(thr_ptr + h)
            needed = (flag != flag) | (tl.abs(flag) == float("inf"))
            mean = 0.0
            lim = 0.0
        else:
            mean = tl.load(thr_ptr + h * 3)
            lim = tl.load(thr_ptr + h * 3 + 1)
            needed = tl.load(thr_ptr + h * 3 + 2) != 0.0
        if needed:  # (a program of a head that needs no count returns at once)
            cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < C
            x_base = x_ptr + h.to(tl.int64) * sxh
            x_cols = cols.to(tl.int64)[None, :] * sxc
            cnt = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.int32)  # elementwise, reduced once
            for i in range(iters):
                rows = (pid_t * iters + i) * BLOCK_T + tl.arange(0, BLOCK_T)
                mask = (rows < T)[:, None] & cmask[None, :]
                x = tl.load(x_base + rows.to(tl.int64)[:, None] * sxt + x_cols, mask=mask, other=0.0).to(tl.float32)
                if NONFINITE:
                    hit = ((x != x) | (tl.abs(x) == float("inf"))) & mask
                else:
                    hit = (tl.abs(x - mean) > lim) & mask
                cnt += hit.to(tl.int32)
            tl.atomic_add(cnt_ptr + h, tl.sum(cnt))  # integers: the order does not matter

    @triton.jit
    def _prefix_centred_kernel(x_ptr, kept_ptr, out_ptr, R, T, BLOCK: tl.constexpr):
        # grid (N * R,): one row of x [N, R, T]: the mean of its first n entries, then their centred squares (the
        # second read of an 8-kB row comes from the cache)
        row = tl.program_id(0)
        n = tl.load(kept_ptr + row % R)
        base = x_ptr + row.to(tl.int64) * T
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t0 in range(0, n, BLOCK):
            acc += tl.load(base + t0 + offs, mask=t0 + offs < n, other=0.0)
        mean = tl.sum(acc) / tl.maximum(n, 1).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t0 in range(0, n, BLOCK):
            m = t0 + offs < n
            c = tl.where(m, tl.load(base + t0 + offs, mask=m, other=0.0) - mean, 0.0)
            acc += c * c
        tl.store(out_ptr + row, tl.sum(acc))

    @triton.jit
    def _block_absmax_kernel(x_ptr, out_ptr, T, D, sxh, sxt, sxd, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        # grid (token blocks, heads): max |x| over BLOCK tokens x D channels of one head, NaN if any value is
        b = tl.program_id(0)
        h = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        base = x_ptr + h.to(tl.int64) * sxh + cols.to(tl.int64)[None, :] * sxd
        top = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for t0 in range(0, BLOCK, ROWS):
            rows = b * BLOCK + t0 + tl.arange(0, ROWS)
            m = (rows < T)[:, None] & (cols < D)[None, :]
            v = tl.load(base + rows.to(tl.int64)[:, None] * sxt, mask=m, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        biggest = tl.max(top)
        tl.store(out_ptr + h * tl.num_programs(0) + b, tl.where(tl.max((top != top).to(tl.int32)) > 0,
                                                                  float("nan"), biggest).to(out_ptr.dtype.element_ty))

    interpreted = type(_site_kernel).__name__ == "InterpretedFunction"
    return SimpleNamespace(site=_site_kernel, combine=_combine_kernel, channels=_channel_kernel,
                           count=_count_kernel, finish=_finish_kernel, block_absmax=_block_absmax_kernel,
                           prefix_centred=_prefix_centred_kernel,
                           interpreted=interpreted)


def _launch_shape(H: int, T: int, C: int):
    """(BLOCK_T, BLOCK_C, iters, grid) for a [H, T, C] tensor: tiles of about TILE values, about PROGRAMS
    programs (more tiles per program, up to MAX_ITERS, rather than more programs)."""
    block_c = min(_next_pow2(C), 256, TILE)
    block_t = max(1, min(TILE // block_c, _next_pow2(T)))
    n_cb = -(-C // block_c)
    tiles = -(-T // block_t)
    iters = max(1, min(MAX_ITERS, tiles, H * n_cb * tiles // PROGRAMS))
    return block_t, block_c, iters, (-(-tiles // iters), n_cb, H)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _device_ctx(t: torch.Tensor):
    if t.is_cuda:  # Triton launches on the current device; a layer may live on another GPU
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def _triton_partials(x, r, want_x, want_r, positions):
    k = _triton_kernels()
    H, T, C = x.shape
    block_t, block_c, iters, grid = _launch_shape(H, T, C)
    n_tp, n_cb, _ = grid
    dev = x.device
    f32 = torch.float32
    part = torch.empty(H, n_cb * n_tp, NSTAT, dtype=f32, device=dev)  # [H, P, NSTAT], P = (n_cb, n_tp)
    chan = torch.empty(2, 3, H, n_tp, C, dtype=f32, device=dev) if (want_x or want_r) else part
    pos = torch.empty(2, H, n_cb, T, dtype=f32, device=dev) if positions else None
    rr = x if r is None else r
    with _device_ctx(x):
        k.site[grid](x, rr, part, chan, part if pos is None else pos, T, C,
                     x.stride(0), x.stride(1), x.stride(2), rr.stride(0), rr.stride(1), rr.stride(2), iters,
                     HAS_REF=r is not None, MOM_X=want_x, MOM_R=want_r, POS=positions,
                     BLOCK_T=block_t, BLOCK_C=block_c, NSTAT=NSTAT, num_warps=_warps(block_t, block_c))
    return part, chan, pos, (block_t, block_c, iters, grid)


def _triton_finish(x, r, which, part, chan, launch):
    """sums [6, H], drift table [5, H + 1] and {which: Moments} from the site kernel's partials: one combine
    launch, one count launch per tensor and a few torch ops (the channel median), all on the device."""
    k = _triton_kernels()
    block_t, block_c, iters, grid = launch
    H, T, C = x.shape
    dev = x.device
    f64 = torch.float64
    has_ref = r is not None
    sums = torch.empty(6, H, dtype=f64, device=dev) if has_ref else None
    table = torch.empty(5, H + 1, dtype=f64, device=dev) if has_ref else None
    mom = torch.empty(2, 8, H, dtype=f64, device=dev)  # [tensor (x, ref), OUTLIER_METRICS + mean/var/m4/count, H]
    thr = torch.empty(2, H, 3, dtype=torch.float32, device=dev)
    cnt = torch.empty(2, H, dtype=torch.int32, device=dev)  # the 6-sigma counts (zeroed by the combine)
    ch = torch.empty(2, 5, H, C, dtype=torch.float32, device=dev)  # absmax, max, min, mean, smoothed per channel
    P = part.shape[1]
    with _device_ctx(x):
        k.combine[(H + 1 if has_ref else H,)](
            part, sums if has_ref else mom, table if has_ref else mom, mom, thr, cnt, H, P, float(T * C),
            HAS_REF=has_ref, MOM_X="x" in which, MOM_R="ref" in which, NSTAT=NSTAT,
            BLOCK_P=min(_next_pow2(P), 1024), num_warps=4)
        moments = {}
        if which:
            kk = [("x", "ref").index(w) for w in which]
            k.channels[(-(-C // 128), H, len(kk))](chan, ch, H, grid[0], C, T, kk[0], BLOCK_TP=16,
                                                   BLOCK_C=min(_next_pow2(C), 128), num_warps=4)
            for i, w in zip(kk, which):
                t = x if w == "x" else r
                k.count[grid](t, thr[i], cnt[i], T, C, t.stride(0), t.stride(1), t.stride(2), iters,
                              BLOCK_T=block_t, BLOCK_C=block_c, NONFINITE=False, num_warps=_warps(block_t, block_c))
            median = ch[kk[0]:kk[-1] + 1, 0].median(-1).values  # torch.median's: the lower middle value
            k.finish[(H, len(kk))](cnt, median, ch, mom, H, C, float(T * C), kk[0],
                                   BLOCK_C=min(_next_pow2(C), 1024), num_warps=4)
            for i, w in zip(kk, which):
                moments[w] = Moments(T * C, mom[i], ch[i, 0], ch[i, 1], ch[i, 2], ch[i, 3], ch[i, 4])
    return sums, table, moments


def _warps(block_t: int, block_c: int) -> int:
    return WARPS if block_t * block_c >= 32 * WARPS else max(1, block_t * block_c // 32)
