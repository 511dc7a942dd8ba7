"""Micro-benchmark (issue 15): the capture's per-site statistics, the pre-fusion chain vs driftscope.measure.fused.

For each site of a propagated capture with two paths (row 1 against the reference row 0, prefill, with_stats), both
sides compute what the capture records there:
  q, k, v    per-head drift (+ pooled), outliers of both rows, the reference's channel profile (+ smoothed for k)
  attn_out   the same without the profile, plus the per-position rel-L2 curve
  resid      pooled drift, the per-position curve, outliers of both rows        [tokens, hidden]
  logits     pooled drift (the old chain in chunks of 2^22 values)              [tokens, vocab]
old = the pre-fusion chain (one elementwise chain per statistic, float64 sums), kept below as this benchmark's own
baseline now that the library computes every statistic in driftscope.measure.fused; fused = one site_stats call and
its conversions. Timings: torch.utils.benchmark.Timer.blocked_autorange (it synchronizes CUDA), median; the two sides
of a site are timed alternately, --rounds times, and the best median of each is kept, so load from other processes
on a shared CPU inflates neither side more than the other. On CUDA also the GPU busy time and kernel count of one call
(torch.profiler): what the statistics add to a long forward, whose GPU work hides their CPU dispatch. "per forward"
weights each site by how often one forward calls it (layers x sites, logits once).

    python experiments/bench_fused_stats.py                          # CPU: SmolLM2-135M and a larger shape
    python experiments/bench_fused_stats.py --device cuda --shapes llama3-8b-8k --json out.json   # H100: triton
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from driftscope.measure import fused  # noqa: E402

LOGITS_CHUNK = 1 << 22


@dataclass(frozen=True)
class Shape:
    """A model's statistics shapes at one prompt length."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    tokens: int


SHAPES = {
    "smollm2-512": Shape(30, 9, 3, 64, 576, 49152, 512),  # SmolLM2-135M, the default CPU capture's model
    "llama3-8b-1k": Shape(32, 32, 8, 128, 4096, 128256, 1024),
    "llama3-8b-8k": Shape(32, 32, 8, 128, 4096, 128256, 8192),  # DESIGN section 8's capture-overhead setting
}


# -- the pre-fusion chain, as the capture computed it before issue 15 ------------------------------------------------
# Copied from driftscope/measure/drift.py and outliers.py as they were when fused.py replaced them in the capture.
# Elementwise work in float32, every sum in float64; tensors are [heads, ...] and each value is float64 [heads].
def _drift_sums(x_HxN, ref_HxN, chunk=None):
    """Sums of x*r, x^2, r^2, d^2, |d|, |r| and max |d| per head, float64 [7, heads], over chunks of dim 1."""
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


def _pool(sums_7xH):
    """The sums of all heads together, [7, 1]."""
    return torch.cat([sums_7xH[:6].sum(1, keepdim=True), sums_7xH[6:].amax(1, keepdim=True)])


def _drift_from_sums(sums_7xH, n):
    """fused.DRIFT_METRICS from `_drift_sums` of tensors with n elements per head (the textbook cosine)."""
    xr, xx, rr, dd, d1, r1, dmax = sums_7xH
    tiny = torch.finfo(torch.float64).tiny
    return {"cosine": xr / (xx * rr).sqrt().clamp_min(tiny), "rel_l2": dd.sqrt() / rr.sqrt().clamp_min(tiny),
            "rel_l1": d1 / r1.clamp_min(tiny), "rmse": (dd / n).sqrt(), "max_abs": dmax}


def _drift(x_HxN, ref_HxN, chunk=None):
    return _drift_from_sums(_drift_sums(x_HxN, ref_HxN, chunk), x_HxN[0].numel())


def _rel_l2_by_position(x_HxTxD, ref_HxTxD, bins):
    """(bin starts [nbins], rel-L2 over heads and channels per bin of consecutive tokens [nbins] float64)."""
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


def _outliers(x_HxTxC):
    """fused.OUTLIER_METRICS per head of a [heads, tokens, channels] tensor."""
    x = x_HxTxC.float().reshape(x_HxTxC.shape[0], -1)
    f64 = torch.float64
    n = x.shape[1]
    ch = _channel_absmax(x_HxTxC)
    mean = x.sum(1, dtype=f64) / n
    c2 = (x - mean.float()[:, None]).square()  # float32; the moments accumulate in float64
    var = c2.sum(1, dtype=f64) / n
    return {
        "absmax": x.abs().amax(1).to(f64),
        "channel_max_median": (ch.amax(1) / ch.median(1).values.clamp_min(torch.finfo(torch.float32).tiny)).to(f64),
        "kurtosis": (c2.square().sum(1, dtype=f64) / n) / var.square().clamp_min(torch.finfo(f64).tiny),
        "frac_6sigma": (c2 > (36 * var).float()[:, None]).sum(1).to(f64) / n,
    }


def _channel_absmax(x_HxTxC):
    """Per-channel absmax [heads, channels] float32 (max over tokens)."""
    return x_HxTxC.abs().amax(dim=1).to(torch.float32)


def old_site(site, x, r):
    if site in ("resid", "logits"):
        _drift(x.reshape(1, -1), r.reshape(1, -1), chunk=LOGITS_CHUNK if site == "logits" else None)
        if site == "resid":
            _rel_l2_by_position(x[None], r[None], 128)
            _outliers(r[None]), _outliers(x[None])
        return
    sums = _drift_sums(x, r)
    n = x[0].numel()
    _drift_from_sums(sums, n), _drift_from_sums(_pool(sums), n * x.shape[0])
    if site == "attn_out":
        _rel_l2_by_position(x, r, 128)
    _outliers(r), _outliers(x)
    if site in ("q", "k", "v"):
        _channel_absmax(r)
        if site == "k":
            _channel_absmax(r - r.mean(dim=1, keepdim=True))


# -- the fused statistics ---------------------------------------------------------------------------------------------
def fused_site(site, x, r, backend):
    if site == "logits":
        fused.drift(fused.site_stats(x, r, backend=backend), pooled=True)
        return
    s = fused.site_stats(x, r, stats_of=("ref", "x"), positions=site in ("attn_out", "resid"), backend=backend)
    if site != "resid":
        fused.drift(s)
    fused.drift(s, pooled=True)
    if site in ("attn_out", "resid"):
        fused.rel_l2_by_position(s, 128)
    fused.outliers(s, "ref"), fused.outliers(s, "x")
    if site in ("q", "k", "v"):
        fused.channel_absmax(s, "ref")
        if site == "k":
            fused.channel_absmax(s, "ref", smoothed=True)


def tensors(shape: Shape, site: str, dtype, device, seed=0):
    """(path row, reference row) of one site: random, with a massive channel and an offset like real activations."""
    g = torch.Generator().manual_seed(seed)
    T = shape.tokens
    dims = {"q": (shape.heads, T, shape.head_dim), "k": (shape.kv_heads, T, shape.head_dim),
            "v": (shape.kv_heads, T, shape.head_dim), "attn_out": (shape.heads, T, shape.head_dim),
            "resid": (T, shape.hidden), "logits": (T, shape.vocab)}[site]
    r = torch.randn(dims, generator=g)
    r[..., 3] += 50.0
    x = r + 0.01 * torch.randn(dims, generator=g)
    return x.to(device, dtype), r.to(device, dtype)


def check(site, x, r, backend) -> dict[str, float]:
    """Largest relative difference, per metric, between the old chain's and the fused values at one site."""
    s = fused.site_stats(x, r, stats_of=("ref", "x"), positions=site not in ("logits",), backend=backend)
    if site in ("resid", "logits"):
        pairs = [(_drift(x.reshape(1, -1), r.reshape(1, -1), chunk=LOGITS_CHUNK), fused.drift(s, pooled=True))]
    else:
        pairs = [(_drift_from_sums(_drift_sums(x, r), x[0].numel()), fused.drift(s))]
    if site != "logits":
        x3, r3 = (x[None], r[None]) if x.dim() == 2 else (x, r)
        pairs += [({"rel_l2_pos": _rel_l2_by_position(x3, r3, 128)[1]},
                   {"rel_l2_pos": fused.rel_l2_by_position(s, 128)[1]})]
        for which, t in (("ref", r3), ("x", x3)):
            pairs.append(({f"{k}[{which}]": v for k, v in _outliers(t).items()},
                          {f"{k}[{which}]": v for k, v in fused.outliers(s, which).items()}))
            pairs.append(({f"channel_absmax[{which}]": _channel_absmax(t)},
                          {f"channel_absmax[{which}]": fused.channel_absmax(s, which)}))
    out = {}
    for old, new in pairs:
        for k, v in old.items():
            a, b = new[k].double(), v.double()
            out[k] = ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()
    return out


def best_median(stmt_fn, min_run_time):
    return Timer("f()", globals={"f": stmt_fn}).blocked_autorange(min_run_time=min_run_time).median


def device_time(fn, n: int = 3) -> tuple[float, float]:
    """(GPU busy time, kernels) of one call of fn: the durations of the kernels it launches, summed (torch.profiler,
    CUDA activity), without the CPU time between them. In the capture the CPU queues the statistics while the GPU
    still runs the layer, so this is what they add to a long forward; the wall time (Timer) is what they cost alone,
    CPU dispatch included."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return busy_us / 1e6 / n, len(kernels) / n


def run(shape_name: str, device: str, dtype, backend: str, rounds: int, min_run_time: float, sites,
        checks: bool = False) -> list[dict]:
    shape = SHAPES[shape_name]
    calls = {"q": shape.layers, "k": shape.layers, "v": shape.layers, "attn_out": shape.layers,
             "resid": shape.layers, "logits": 1}
    rows = []
    for site in sites:
        x, r = tensors(shape, site, dtype, device)
        fns = {"old": lambda: old_site(site, x, r), "fused": lambda: fused_site(site, x, r, backend)}
        for f in fns.values():  # warm up (and compile the Triton kernels)
            f()
        best = {k: float("inf") for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                best[k] = min(best[k], best_median(f, min_run_time))
        gpu, kernels = {}, {}
        if x.is_cuda:
            for k, f in fns.items():
                gpu[k], kernels[k] = device_time(f)
        used = fused.site_stats(x, r, backend=backend).backend
        if checks:
            diffs = check(site, x, r, backend)
            print(f"{shape_name:14s} {site:9s} max relative difference to the old chain: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
        rows.append({"shape": shape_name, "site": site, "dims": list(x.shape), "dtype": str(dtype).split(".")[-1],
                     "device": device, "backend": used, "old_s": best["old"], "fused_s": best["fused"],
                     "speedup": best["old"] / best["fused"], "calls_per_forward": calls[site],
                     "old_gpu_s": gpu.get("old"), "fused_gpu_s": gpu.get("fused"),
                     "old_kernels": kernels.get("old"), "fused_kernels": kernels.get("fused")})
        print(f"{shape_name:14s} {site:9s} {str(list(x.shape)):18s} old {best['old'] * 1e3:9.3f} ms  "
              f"fused[{used}] {best['fused'] * 1e3:9.3f} ms  x{best['old'] / best['fused']:6.2f}"
              + ("" if not gpu else f"   GPU busy: old {gpu['old'] * 1e3:.3f} ms ({kernels['old']:.0f} kernels)  "
                 f"fused {gpu['fused'] * 1e3:.3f} ms ({kernels['fused']:.0f} kernels)"),
              flush=True)
        del x, r
    total = {k: sum(r[k] * r["calls_per_forward"] for r in rows) if all(r[k] is not None for r in rows) else None
             for k in ("old_s", "fused_s", "old_gpu_s", "fused_gpu_s")}
    print(f"{shape_name:14s} per forward ({'+'.join(sites)}): old {total['old_s']:.3f} s  "
          f"fused {total['fused_s']:.3f} s  x{total['old_s'] / total['fused_s']:.2f}"
          + ("" if total["old_gpu_s"] is None or total["fused_gpu_s"] is None else
             f"   GPU busy: old {total['old_gpu_s']:.3f} s  fused {total['fused_gpu_s']:.3f} s"))
    rows.append({"shape": shape_name, "site": "per_forward", **total, "speedup": total["old_s"] / total["fused_s"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="smollm2-512,llama3-8b-1k", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on the CPU (as the CPU capture), float16 on CUDA")
    ap.add_argument("--backend", default="auto", choices=fused.BACKENDS)
    ap.add_argument("--sites", default="q,k,v,attn_out,resid,logits")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds per blocked_autorange")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--check", action="store_true", help="also print each metric's largest relative difference")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda")
                                                           else torch.bfloat16)
    sites = args.sites.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = []
    for name in args.shapes.split(","):
        rows += run(name, args.device, dtype, args.backend, args.rounds, args.min_run_time, sites, args.check)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "torch": torch.__version__,
                                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
