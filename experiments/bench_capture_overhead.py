"""DESIGN §8 target: propagated capture with every metric, all layers and heads, costs <= 1.10x the wall time and
<= 1.10x the peak GPU memory of the same lockstep forward without instrumentation.

Model: random weights of Llama-3-8B's shape (fp16), one prompt of --tokens random tokens (8192), paths fp16,sage8
(a lockstep batch of 2, sage8 on the compiled kernel). Variants, each timed (warmup + median of repeats,
synchronize + perf_counter) with its own peak memory (max_memory_allocated, reset before):
  baseline    the same batch-2 forward through `driftscope.run.tap.lockstep` (row r runs path r, the same path
              functions, the same torch.cat) and nothing else: no layer hooks, no metrics, no records
  full        driftscope's capture: Tap (with_stats=True) through run_prompt(decode_steps=0), then the
              records' one host copy (Records.columns)
  hooks_only  the capture's machinery with every metric switched off (layer hooks, Tap dispatch)
  no_<piece>  full minus one piece (Tap(pieces=...)), so piece cost = full - no_<piece>:
              attn_drift   drift of q, k, v, attn_out per head (+ per-position curve of attn_out)
              resid_drift  drift of the residual stream (+ per-position curve)
              logits_drift drift of the logits [2, T, vocab] (chunked float64 sums)
              outliers     absmax/kurtosis/6-sigma/channel profiles of q, k, v, attn_out
              resid_stats  outliers and massive activations of the residual stream
              smoothing    smoothing-K statistics (INT8 error of K and of sampled QK^T rows, both variants)
Both forwards produce the full logits (as the capture does): [2, 8192, 128256] fp16 is 4 GiB in both.
A torch.profiler summary of one full capture (top ops by device time) goes into the JSON too.

    python experiments/bench_capture_overhead.py --out-dir $OUT                     # H100: about 2-3 min
    python experiments/bench_capture_overhead.py --device cpu --smoke --out-dir /tmp/co   # plumbing, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from driftscope.run import benchkit as bt  # noqa: E402
from driftscope import paths  # noqa: E402

TARGET_TIME, TARGET_MEMORY = 1.10, 1.10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(ROOT / "experiments/results"))
    ap.add_argument("--model", default="llama3-8b-shape", help="a shape from driftscope.benchkit.SHAPES")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--paths", default="fp16,sage8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-breakdown", action="store_true", help="only baseline, full and hooks_only")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler summary")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64 tokens, 1 repeat (CPU plumbing check)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.tokens, args.warmup, args.repeats = "tiny-llama", 64, 1, 1
    device = args.device
    if bt.is_cuda(device):
        bt.require_cuda("bench_capture_overhead.py")
    elif not args.smoke:
        sys.exit("bench_capture_overhead.py: --device cpu is only for plumbing checks; add --smoke")

    from driftscope.hooks import decode
    from driftscope.hooks.layers import instrumented
    from driftscope.measure.records import Records
    from driftscope.run.tap import PIECES, Tap, lockstep, run_prompt

    impl = "kernel" if bt.is_cuda(device) else "emulate"
    path_fns = [paths.get_path(p, impl, device=device) for p in args.paths.split(",")]
    dtype = torch.float16 if bt.is_cuda(device) else torch.bfloat16
    bt.log(f"building {args.model} ({dtype}) on {device}")
    t0 = time.perf_counter()
    model = bt.random_model(args.model, dtype, device)
    build_s = time.perf_counter() - t0
    info = bt.model_shape_info(model)
    bt.log(f"built in {build_s:.1f} s: {info['n_params'] / 1e9:.2f} B parameters, {bt.gib(info['weight_bytes']):.1f} GiB")
    ids_T = torch.randint(info["vocab_size"], (args.tokens,), generator=torch.Generator().manual_seed(0))
    rows = len(path_fns)
    ids = ids_T.to(device)[None].expand(rows, -1).contiguous()

    def run_baseline():
        with instrumented(model, lockstep(path_fns)), torch.inference_mode():
            decode.forward(model, ids, use_cache=False)

    n_rows = [0]

    def run_capture(skip=frozenset()):
        records = Records()
        tap = Tap(path_fns, "propagated", records, with_stats=True, pieces=PIECES - frozenset(skip))
        run_prompt(model, ids_T, tap, 0)
        n_rows[0] = len(records.columns()["value"])  # the one host copy of the metrics

    variants = [("baseline", run_baseline), ("full", run_capture),
                ("hooks_only", lambda: run_capture(PIECES))]
    if not args.no_breakdown:
        variants += [(f"no_{p}", (lambda p=p: run_capture({p}))) for p in sorted(PIECES)]
    results = {}
    weights = bt.allocated(device)
    for name, fn in variants:
        bt.release(device)
        with bt.peak_memory(device) as mem:
            times = bt.wall_it(fn, device, warmup=args.warmup, repeats=args.repeats)
        results[name] = {"seconds": bt.median(times), "times_s": times, "peak_bytes": mem["peak_bytes"],
                         "metric_rows": n_rows[0] if name != "baseline" else 0}
        peak = bt.gib(mem["peak_bytes"])
        bt.log(f"{name:<16} {bt.median(times):8.3f} s" + (f"  peak {peak:6.2f} GiB" if peak else "")
               + (f"  {n_rows[0]:,} metric rows" if name != "baseline" else ""))
    profile = None if args.no_profile else profile_full(run_capture, device)

    base, full = results["baseline"], results["full"]
    time_ratio = bt.ratio(full["seconds"], base["seconds"])
    mem_ratio = bt.ratio(full["peak_bytes"], base["peak_bytes"])
    breakdown = {}
    for p in sorted(PIECES):
        r = results.get(f"no_{p}")
        if r is not None:
            breakdown[p] = {"seconds": full["seconds"] - r["seconds"],
                            "fraction_of_baseline": (full["seconds"] - r["seconds"]) / base["seconds"],
                            "peak_bytes_saved_without_it": None if full["peak_bytes"] is None
                            else full["peak_bytes"] - r["peak_bytes"]}
    hooks = results["hooks_only"]
    breakdown["hooks_and_dispatch"] = {"seconds": hooks["seconds"] - base["seconds"],
                                       "fraction_of_baseline": (hooks["seconds"] - base["seconds"]) / base["seconds"]}
    result = {
        "benchmark": "capture_overhead",
        "argv": ["python", *sys.argv] if argv is None else ["python", "experiments/bench_capture_overhead.py", *argv],
        "method": __doc__.split("\n\n")[1].strip(),
        "machine": bt.machine(device),
        "versions": bt.versions(),
        "model": {"shape": args.model, **info, "build_seconds": build_s},
        "tokens": args.tokens, "paths": [p.name for p in path_fns], "sage_impl": impl,
        "weights_bytes_allocated": weights,
        "variants": results,
        "time_ratio": time_ratio, "memory_ratio": mem_ratio,
        "activation_memory_ratio": None if weights is None else
        bt.ratio(full["peak_bytes"] - weights, base["peak_bytes"] - weights),
        "targets": {"time_ratio_max": TARGET_TIME, "memory_ratio_max": TARGET_MEMORY,
                    "time_met": time_ratio is not None and time_ratio <= TARGET_TIME,
                    "memory_met": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY},
        "breakdown": breakdown,
        "profile_top_ops": profile,
    }
    out_dir = Path(args.out_dir)
    path = bt.write_json(result, out_dir / "bench_capture_overhead.json")
    plot(result, out_dir / "bench_capture_overhead.png")
    bt.log(f"time x{time_ratio:.3f} (target <= {TARGET_TIME}), memory "
           + (f"x{mem_ratio:.3f} (target <= {TARGET_MEMORY})" if mem_ratio else "n/a on the CPU")
           + f"; -> {path}")
    for p, b in breakdown.items():
        bt.log(f"  {p:<20} {b['seconds'] * 1e3:9.1f} ms  ({100 * b['fraction_of_baseline']:+.1f}% of the baseline)")
    return 0


def profile_full(run_capture, device, top: int = 25):
    """Top ops of one full capture by self device time (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bt.is_cuda(device) else [])
    try:
        with profile(activities=acts) as prof:
            run_capture()
            bt.sync(device)
        rows = []
        for e in prof.key_averages():
            dev = getattr(e, "self_device_time_total", None)
            if dev is None:
                dev = getattr(e, "self_cuda_time_total", 0)
            rows.append({"op": e.key, "count": e.count, "self_device_ms": dev / 1e3,
                         "self_cpu_ms": e.self_cpu_time_total / 1e3})
        key = "self_device_ms" if bt.is_cuda(device) else "self_cpu_ms"
        rows.sort(key=lambda r: -r[key])
        return rows[:top]
    except Exception as e:  # the profiler is a diagnostic: never lose the measurement for it
        return [{"error": f"{type(e).__name__}: {e}"}]


def plot(result, save_to):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = result["variants"]
    names = list(v)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    secs = [v[n]["seconds"] for n in names]
    axes[0].barh(names, secs, color=["tab:gray", "tab:red"] + ["tab:blue"] * (len(names) - 2))
    axes[0].axvline(v["baseline"]["seconds"] * TARGET_TIME, color="k", ls="--", lw=1, label="1.10x baseline")
    axes[0].set_xlabel("seconds (median)")
    axes[0].set_title(f"wall time: full/baseline = x{result['time_ratio']:.3f}")
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8)
    if v["baseline"]["peak_bytes"]:
        peaks = [v[n]["peak_bytes"] / 2**30 for n in names]
        axes[1].barh(names, peaks, color=["tab:gray", "tab:red"] + ["tab:blue"] * (len(names) - 2))
        axes[1].axvline(v["baseline"]["peak_bytes"] / 2**30 * TARGET_MEMORY, color="k", ls="--", lw=1)
        axes[1].set_xlabel("peak allocated GiB")
        axes[1].set_title(f"peak memory: full/baseline = x{result['memory_ratio']:.3f}")
        axes[1].invert_yaxis()
    else:
        axes[1].text(0.5, 0.5, "no GPU memory on the CPU", ha="center")
    fig.suptitle(f"capture overhead, {result['model']['shape']}, {result['tokens']} tokens, "
                 f"paths {','.join(result['paths'])}, {result['machine']['device_name']}")
    fig.tight_layout()
    fig.savefig(save_to, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(bt.run_script(main, "bench_capture_overhead.py"))
