"""DESIGN §8 target: propagated capture with every metric, all layers and heads, costs <= 1.10x the wall time and
<= 1.10x the peak memory of the same lockstep forward without instrumentation.

Model: random weights of Llama-3-8B's shape (fp16) on the GPU; the embedded model (smollm2-135m, bf16) on the CPU.
Paths fp16,sage8 (a lockstep batch of 2; sage8 on the compiled kernel on the GPU, emulated on the CPU). Points:
  prefill at each of --tokens (8192 and 32768 on the GPU, 2048 on the CPU): one prompt of random tokens
  decode (--decode-prompt tokens, then --decode-steps greedy steps): the decode loop's cost with capture
Variants, each timed (warmup + median of repeats, synchronize + perf_counter) with its own peak memory (GPU:
max_memory_allocated, reset before; CPU: the process's peak RSS, reset before through /proc/self/clear_refs):
  baseline    the same batch-2 forward (and decode loop) through `driftscope.run.tap.lockstep` (row r runs path r,
              the same path functions, the same torch.cat) and nothing else: no layer hooks, no metrics, no records
  full        driftscope's capture: Tap (with_stats=True) through run_prompt, then the records' one host copy
  hooks_only  the capture's machinery with every metric switched off (layer hooks, Tap dispatch)
  no_<piece>  (first prefill point) full minus one piece (Tap(pieces=...)), so piece cost = full - no_<piece>:
              attn_drift   drift of q, k, v, attn_out per head (+ per-position curve and non-finite count of attn_out)
              resid_drift  drift of the residual stream (+ per-position curve)
              logits_drift drift of the logits [2, T, vocab]
              outliers     absmax/kurtosis/6-sigma/channel profiles of q, k, v, attn_out
              resid_stats  outliers and massive activations of the residual stream
              smoothing    smoothing-K statistics (INT8 error of K and of sampled QK^T rows, both variants)
              Pieces share one fused read per site, so full - no_<piece> is what leaving a piece out saves; it can
              be negative (drift off, the reference's statistics need a read of their own) or within the noise.
Both forwards produce the full logits in prefill (as the capture does): [2, 8192, 128256] fp16 is 4 GiB in both.
A torch.profiler summary of one full capture of the first point (top ops by device time) goes into the JSON too.

    python experiments/bench_capture_overhead.py --out-dir $OUT                       # H100: about 3 min
    python experiments/bench_capture_overhead.py --device cpu --out-dir experiments/results   # 2 cores: minutes
    python experiments/bench_capture_overhead.py --device cpu --smoke --out-dir /tmp/co   # plumbing, seconds
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from driftscope.run import benchkit as bt  # noqa: E402
from driftscope import paths  # noqa: E402

TARGET_TIME, TARGET_MEMORY = 1.10, 1.10
TARGET_CPU_MEMORY = 1.5  # issue 15: on the CPU peak memory within 1.5x the uninstrumented forward's


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(ROOT / "experiments/results"))
    ap.add_argument("--model", default=None, help="a shape from driftscope.run.benchkit.SHAPES (random weights) or "
                    "a driftscope model name (default: llama3-8b-shape on the GPU, smollm2-135m on the CPU)")
    ap.add_argument("--tokens", default=None, help="prefill points, comma-separated (default 8192,32768 on the GPU, "
                    "2048 on the CPU)")
    ap.add_argument("--decode-prompt", type=int, default=None, help="decode point: prompt tokens (default 1024; 0: none)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--paths", default="fp16,sage8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=None, help="default 1 (GPU), 0 (CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (GPU), 2 (CPU)")
    ap.add_argument("--no-breakdown", action="store_true", help="only baseline, full and hooks_only")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler summary")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 64 tokens, 1 repeat (CPU plumbing check)")
    args = ap.parse_args(argv)
    device = args.device
    cuda = bt.is_cuda(device)
    args.model = args.model or ("llama3-8b-shape" if cuda else "smollm2-135m")
    args.tokens = args.tokens or ("8192,32768" if cuda else "2048")
    args.decode_prompt = 1024 if args.decode_prompt is None else args.decode_prompt
    args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
    args.repeats = (3 if cuda else 2) if args.repeats is None else args.repeats
    if args.smoke:
        args.model, args.tokens, args.decode_prompt, args.decode_steps = "tiny-llama", "64", 16, 4
        args.warmup, args.repeats = 1, 1
    if cuda:
        bt.require_cuda("bench_capture_overhead.py")
    tokens = [int(t) for t in args.tokens.split(",")]

    impl = "kernel" if cuda else "emulate"
    path_fns = [paths.get_path(p, impl, device=device) for p in args.paths.split(",")]
    t0 = time.perf_counter()
    if args.model in bt.SHAPES:
        dtype = torch.float16 if cuda else torch.bfloat16
        bt.log(f"building {args.model} ({dtype}) on {device}")
        model = bt.random_model(args.model, dtype, device)
    else:
        from driftscope.models import load_model

        bt.log(f"loading {args.model} on {device}")
        model = load_model(args.model, device=device)[0].eval()
    build_s = time.perf_counter() - t0
    info = bt.model_shape_info(model)
    bt.log(f"ready in {build_s:.1f} s: {info['n_params'] / 1e9:.2f} B parameters, {bt.gib(info['weight_bytes']):.1f} GiB")
    weights = bt.allocated(device)

    points = []
    for i, n in enumerate(tokens):
        breakdown = i == 0 and not args.no_breakdown
        points.append(measure_point(model, path_fns, info, device, args, "prefill", n, 0, breakdown))
    if args.decode_prompt:
        points.append(measure_point(model, path_fns, info, device, args, "decode", args.decode_prompt,
                                    args.decode_steps, False))
    main_point = points[0]
    main_point["profile_top_ops"] = None if args.no_profile else profile_full(
        lambda: capture(model, path_fns, ids_for(info, tokens[0], device), 0), device)

    time_ratio, mem_ratio = main_point["time_ratio"], main_point["memory_ratio"]
    mem_target = TARGET_MEMORY if cuda else TARGET_CPU_MEMORY
    result = {
        "benchmark": "capture_overhead",
        "argv": ["python", *sys.argv] if argv is None else ["python", "experiments/bench_capture_overhead.py", *argv],
        "method": __doc__.split("\n\n")[1].strip(),
        "machine": bt.machine(device),
        "versions": bt.versions(),
        "model": {"shape": args.model, **info, "build_seconds": build_s},
        "paths": [p.name for p in path_fns], "sage_impl": impl,
        "weights_bytes_allocated": weights,
        "memory_measure": "peak allocated CUDA memory" if cuda else "peak resident set size of the process",
        # the first prefill point, at the top level (the targets are judged there)
        "tokens": main_point["tokens"], "variants": main_point["variants"], "time_ratio": time_ratio,
        "memory_ratio": mem_ratio, "breakdown": main_point.get("breakdown", {}),
        "profile_top_ops": main_point.pop("profile_top_ops"),
        "targets": {"time_ratio_max": TARGET_TIME, "memory_ratio_max": mem_target,
                    "time_met": time_ratio is not None and time_ratio <= TARGET_TIME,
                    "memory_met": None if mem_ratio is None else mem_ratio <= mem_target},
        "points": points,
    }
    out_dir = Path(args.out_dir)
    name = "bench_capture_overhead" if cuda or args.smoke else "bench_capture_overhead_cpu"
    path = bt.write_json(result, out_dir / f"{name}.json")
    plot(result, out_dir / f"{name}.png")
    for p in points:
        bt.log(f"{p['phase']} {p['tokens']} tokens" + (f" + {p['decode_steps']} steps" if p["decode_steps"] else "")
               + f": time x{p['time_ratio']:.3f}, memory "
               + ("n/a" if p["memory_ratio"] is None else f"x{p['memory_ratio']:.3f}"))
    for piece, b in result["breakdown"].items():
        bt.log(f"  {piece:<20} {b['seconds'] * 1e3:9.1f} ms  ({100 * b['fraction_of_baseline']:+.1f}% of the baseline)")
    bt.log(f"-> {path}")
    return 0


def ids_for(info, n: int, device) -> torch.Tensor:
    return torch.randint(info["vocab_size"], (n,), generator=torch.Generator().manual_seed(0)).to(device)


def capture(model, path_fns, ids_T, steps: int, skip=frozenset()) -> int:
    """One capture of the prompt (+ steps greedy decode steps); returns the number of metric rows."""
    from driftscope.measure.records import Records
    from driftscope.run.tap import PIECES, Tap, run_prompt

    records = Records()
    tap = Tap(path_fns, "propagated", records, with_stats=True, pieces=PIECES - frozenset(skip))
    run_prompt(model, ids_T, tap, steps)
    return len(records.columns()["value"])  # the one host copy of the metrics


def measure_point(model, path_fns, info, device, args, phase: str, n: int, steps: int, breakdown: bool) -> dict:
    from driftscope.hooks import decode
    from driftscope.hooks.layers import instrumented
    from driftscope.run.tap import PIECES, lockstep

    ids_T = ids_for(info, n, device)
    ids = ids_T[None].expand(len(path_fns), -1).contiguous()

    def run_baseline():
        with instrumented(model, lockstep(path_fns)), torch.inference_mode():
            if steps:
                decode.greedy(model, ids, steps, on_logits=lambda *_: None)  # full prefill logits, as the capture
            else:
                decode.forward(model, ids, use_cache=False)

    n_rows = [0]

    def run_capture(skip=frozenset()):
        n_rows[0] = capture(model, path_fns, ids_T, steps, skip)

    variants = [("baseline", run_baseline), ("full", run_capture), ("hooks_only", lambda: run_capture(PIECES))]
    if breakdown:
        variants += [(f"no_{p}", (lambda p=p: run_capture({p}))) for p in sorted(PIECES)]
    label = f"{phase} {n}" + (f"+{steps}" if steps else "")
    results = {}
    for name, fn in variants:
        bt.release(device)
        _trim_host_heap()
        with peak(device) as mem:
            times = bt.wall_it(fn, device, warmup=args.warmup, repeats=args.repeats)
        results[name] = {"seconds": bt.median(times), "times_s": times, "peak_bytes": mem["peak_bytes"],
                         "metric_rows": n_rows[0] if name != "baseline" else 0}
        bt.log(f"{label:<14} {name:<16} {bt.median(times):8.3f} s  peak {bt.gib(mem['peak_bytes']):6.2f} GiB"
               + (f"  {n_rows[0]:,} metric rows" if name != "baseline" else ""))
    base, full = results["baseline"], results["full"]
    point = {"phase": phase, "tokens": n, "decode_steps": steps, "variants": results,
             "time_ratio": bt.ratio(full["seconds"], base["seconds"]),
             "memory_ratio": bt.ratio(full["peak_bytes"], base["peak_bytes"])}
    if breakdown:
        point["breakdown"] = {}
        for p in sorted(PIECES):
            r = results[f"no_{p}"]
            point["breakdown"][p] = {"seconds": full["seconds"] - r["seconds"],
                                     "fraction_of_baseline": (full["seconds"] - r["seconds"]) / base["seconds"],
                                     "peak_bytes_saved_without_it": full["peak_bytes"] - r["peak_bytes"]}
        hooks = results["hooks_only"]
        point["breakdown"]["hooks_and_dispatch"] = {"seconds": hooks["seconds"] - base["seconds"],
                                                    "fraction_of_baseline": hooks["seconds"] / base["seconds"] - 1}
    return point


def peak(device):
    """Peak memory of a block: allocated CUDA memory on the GPU, the process's resident set on the CPU."""
    return bt.peak_memory(device) if bt.is_cuda(device) else _peak_rss()


class _peak_rss:
    """Peak RSS of this process inside the block (Linux: VmHWM after resetting it with /proc/self/clear_refs)."""

    def __enter__(self):
        self.box = {"peak_bytes": None}
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux: no reset, so no honest peak of this block
            self.box["reset"] = False
        return self.box

    def __exit__(self, *exc):
        if self.box.get("reset", True):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.box["peak_bytes"] = int(line.split()[1]) * 1024
        return False


def _trim_host_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so that one variant's peak RSS does not start at another's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    colors = ["tab:gray", "tab:red"] + ["tab:blue"] * (len(names) - 2)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    axes[0].barh(names, [v[n]["seconds"] for n in names], color=colors)
    axes[0].axvline(v["baseline"]["seconds"] * TARGET_TIME, color="k", ls="--", lw=1, label="1.10x baseline")
    axes[0].set_xlabel("seconds (median)")
    axes[0].set_title(f"{result['tokens']} tokens: wall time x{result['time_ratio']:.3f}")
    axes[0].legend(fontsize=8)
    if v["baseline"]["peak_bytes"]:
        axes[1].barh(names, [v[n]["peak_bytes"] / 2**30 for n in names], color=colors)
        axes[1].axvline(v["baseline"]["peak_bytes"] / 2**30 * result["targets"]["memory_ratio_max"], color="k",
                        ls="--", lw=1)
        axes[1].set_title(f"peak memory x{result['memory_ratio']:.3f}")
    axes[1].set_xlabel(f"GiB ({result['memory_measure']})")
    for ax in axes[:2]:
        ax.invert_yaxis()
    labels = [f"{p['phase']} {p['tokens']}" + (f"+{p['decode_steps']}" if p["decode_steps"] else "")
              for p in result["points"]]
    x = range(len(labels))
    axes[2].bar([i - 0.2 for i in x], [p["time_ratio"] for p in result["points"]], 0.4, label="time")
    axes[2].bar([i + 0.2 for i in x], [p["memory_ratio"] or 0 for p in result["points"]], 0.4, label="memory")
    axes[2].axhline(TARGET_TIME, color="k", ls="--", lw=1)
    axes[2].set_xticks(list(x), labels)
    axes[2].set_ylabel("capture / baseline")
    axes[2].set_title("every point")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"capture overhead, {result['model']['shape']}, paths {','.join(result['paths'])} "
                 f"({result['sage_impl']}), {result['machine']['device_name']}")
    fig.tight_layout()
    fig.savefig(save_to, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(bt.run_script(main, "bench_capture_overhead.py"))
