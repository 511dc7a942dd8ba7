"""Where the capture's remaining overhead goes (issue 15), on the GPU: host syncs, the enqueue/sync/host-copy split,
GPU busy time and idle gaps of baseline and full capture at one prefill point.

    python experiments/gpu/diag_overhead.py --out $OUT/diag.json [--tokens 8192]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import torch  # noqa: E402

import bench_capture_overhead as bco  # noqa: E402
from driftscope import paths  # noqa: E402
from driftscope.hooks import decode  # noqa: E402
from driftscope.hooks.layers import instrumented  # noqa: E402
from driftscope.measure.records import Records  # noqa: E402
from driftscope.run import benchkit as bt  # noqa: E402
from driftscope.run.tap import PIECES, Tap, lockstep, run_prompt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--model", default="llama3-8b-shape")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    dev = args.device
    cuda = dev == "cuda"
    path_fns = [paths.get_path(p, "kernel" if cuda else "emulate", device=dev) for p in ("fp16", "sage8")]
    model = bt.random_model(args.model, torch.float16 if cuda else torch.bfloat16, dev)
    info = bt.model_shape_info(model)
    ids_T = bco.ids_for(info, args.tokens, dev)
    ids = ids_T[None].expand(2, -1).contiguous()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict = {"tokens": args.tokens, "device": torch.cuda.get_device_name() if cuda else "cpu"}

    def baseline():
        with instrumented(model, lockstep(path_fns)), torch.inference_mode():
            decode.forward(model, ids, use_cache=False)

    def capture(skip=frozenset()):
        rec = Records()
        tap = Tap(path_fns, "propagated", rec, with_stats=True, pieces=PIECES - frozenset(skip))
        t0 = time.perf_counter()
        run_prompt(model, ids_T, tap, 0)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        n_keys = len(rec._keys)
        dtypes = collections.Counter(str(v.dtype) for v in rec._values)
        cols = rec.columns()
        t3 = time.perf_counter()
        return {"enqueue_s": t1 - t0, "sync_s": t2 - t1, "columns_s": t3 - t2, "total_s": t3 - t0,
                "keys": n_keys, "rows": len(cols["value"]), "value_dtypes": dict(dtypes)}

    def timed_baseline():
        t0 = time.perf_counter()
        baseline()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        return {"enqueue_s": t1 - t0, "sync_s": t2 - t1, "total_s": t2 - t0}

    for _ in range(2):
        baseline(), capture()
    sync()

    # 1. synchronizing calls inside a capture, with where they come from
    syncs = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "driftscope" in f.filename or "hooks" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:][::-1])
        syncs[f"{str(message)[:80]} @ {where}"] += 1

    old = warnings.showwarning
    warnings.showwarning = show
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            capture()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old
    out["syncs"] = dict(syncs.most_common(40))
    print("syncs:", json.dumps(out["syncs"], indent=1), flush=True)

    # 2. split timings, alternating; and a whole capture (no sync before the records' host copy) with the
    # garbage collector on and off
    import gc

    def whole(off: bool):
        if off:
            gc.disable()
        try:
            t0 = time.perf_counter()
            rec = Records()
            run_prompt(model, ids_T, Tap(path_fns, "propagated", rec, with_stats=True), 0)
            rec.columns()
            return {"total_s": time.perf_counter() - t0}
        finally:
            gc.enable()

    runs = collections.defaultdict(list)
    for _ in range(args.repeats):
        runs["baseline"].append(timed_baseline())
        runs["full"].append(capture())
        runs["hooks_only"].append(capture(PIECES))
        runs["whole_gc_on"].append(whole(False))
        runs["whole_gc_off"].append(whole(True))
    out["timings"] = runs
    for k, v in runs.items():
        print(k, [{a: round(b, 4) if isinstance(b, float) else b for a, b in r.items()} for r in v], flush=True)

    # 3. GPU busy time and idle gaps (profiler trace)
    from torch.profiler import ProfilerActivity, profile

    for name, fn in () if args.no_profile else (("baseline", baseline), ("full", capture)):
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            fn()
            sync()
        trace = Path(f"/tmp/trace_{name}.json")
        prof.export_chrome_trace(str(trace))
        ev = json.loads(trace.read_text())["traceEvents"]
        kern = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
                      if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
        rt = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") == "cuda_runtime" and "dur" in e)
        cpu_ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") == "cpu_op" and "dur" in e)
        busy, gaps, end = 0.0, [], None
        for s, e, n in kern:
            if end is not None and s > end:
                gaps.append((s - end, end, n))
            busy += max(0.0, e - max(s, end or s)) if end is not None else e - s
            end = e if end is None else max(end, e)
        gaps.sort(reverse=True)

        def around(t):
            c = [n for s, e, n in rt if s <= t <= e or (t - 200 <= s <= t)]
            o = [n for s, e, n in cpu_ops if s <= t <= e]
            return {"runtime": c[-3:], "cpu_ops": o[-4:]}

        kernel_time = collections.Counter()
        for s, e, n in kern:
            kernel_time[n[:90]] += e - s
        out[f"profile_{name}"] = {
            "kernels": len(kern), "kernel_sum_ms": sum(e - s for s, e, _ in kern) / 1e3, "busy_ms": busy / 1e3,
            "span_ms": (kern[-1][1] - kern[0][0]) / 1e3, "gap_ms": sum(g for g, *_ in gaps) / 1e3,
            "gaps_over_20us": sum(1 for g, *_ in gaps if g > 20), "gap_ms_over_20us": sum(g for g, *_ in gaps if g > 20) / 1e3,
            "runtime_calls": dict(collections.Counter(n for *_, n in rt).most_common(12)),
            "top_gaps": [{"us": g, "next_kernel": n[:80], **around(t)} for g, t, n in gaps[:15]],
            "top_kernels_ms": {k: v / 1e3 for k, v in kernel_time.most_common(30)},
        }
        print(name, json.dumps({k: v for k, v in out[f"profile_{name}"].items() if k != "top_kernels_ms"}, indent=1)[:6000],
              flush=True)
        with gzip.open(Path(args.out).with_name(f"trace_{name}.json.gz"), "wt") as f:
            f.write(trace.read_text())
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
