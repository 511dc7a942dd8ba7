"""DESIGN §8 target: the default `python -m driftscope.capture` finishes within 3 minutes on 2 CPU cores,
first run included.

Runs the default command in a subprocess with a fresh, empty `DRIFTSCOPE_CACHE` (so the one-time GGUF -> fp16
conversion and the corpus cleaning are timed too) and writes its wall time, the machine (lscpu model name, nproc,
load average before and after: other processes on a shared machine slow it down) and the command to a JSON.

    python experiments/bench_cpu_capture.py --out experiments/results/bench_cpu_capture.json
    python experiments/bench_cpu_capture.py --smoke --out /tmp/cpu_capture.json   # plumbing check, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from driftscope.run import benchkit as common  # noqa: E402

TARGET_S = 180.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/bench_cpu_capture.json"))
    ap.add_argument("--smoke", action="store_true",
                    help="time `python -m driftscope.capture --help` instead (checks the plumbing only)")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the user's cache (not a first run)")
    ap.add_argument("--append", action="store_true",
                    help="add this run to the runs already in --out (same command) instead of replacing them")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ds-cpu-capture-"))
    env = dict(os.environ)
    if not args.keep_cache:
        env["DRIFTSCOPE_CACHE"] = str(work / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "driftscope.capture", "--out", str(work / "run.h5")]
    if args.smoke:
        cmd = [sys.executable, "-m", "driftscope.capture", "--help"]
    shown = "python -m driftscope.capture" + ("  --help" if args.smoke else "") + \
            ("" if args.keep_cache else "   # DRIFTSCOPE_CACHE=<fresh empty dir>, --out <temp>/run.h5")
    load_before = os.getloadavg()
    print(f"running: {' '.join(cmd)}", flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    load_after = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    run = {"wall_s": wall, "cpu_s": cpu_s, "returncode": proc.returncode,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_before": load_before, "loadavg_after": load_after,
           "stdout_tail": proc.stdout[-2000:], "stderr_tail": proc.stderr[-1200:]}
    runs = []
    if args.append and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old.get("command") == shown:
            runs = old.get("runs", [])
    runs.append(run)
    ok = [r for r in runs if r["returncode"] == 0]
    best = min(ok, key=lambda r: r["wall_s"]) if ok else run
    result = {
        "benchmark": "cpu_capture_wall_time",
        "command": shown,
        "script": "python experiments/bench_cpu_capture.py" + (" --smoke" if args.smoke else ""),
        "argv": sys.argv,
        "first_run": not args.keep_cache,
        "returncode": run["returncode"],
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "wall_s_all_runs": [r["wall_s"] for r in runs],
        "wall_s_best": best["wall_s"],
        "cpu_s_all_runs": [r["cpu_s"] for r in runs],
        "target_s": TARGET_S,
        "target_met_latest": run["returncode"] == 0 and run["wall_s"] <= TARGET_S,
        "target_met_runs": [r["returncode"] == 0 and r["wall_s"] <= TARGET_S for r in runs],
        "cpu_s_over_cores": run["cpu_s"] / (os.cpu_count() or 1),
        "note": "shared 2-core machine: other sessions load the cores at the same time, so wall time varies with "
                "their load (loadavg_before/after: 1/5/15-minute averages; 2.0 = both cores busy). cpu_s is the "
                "capture's own user+sys CPU time, which contention inflates much less; cpu_s / 2 is the wall time "
                "it would take on 2 otherwise idle cores if it used both fully.",
        "machine": common.cpu_machine(),
        "versions": common.versions(),
        "runs": runs,
    }
    common.write_json(result, args.out)
    print(f"wall {wall:.1f} s, cpu {cpu_s:.1f} s (target {TARGET_S:.0f} s wall): "
          f"{'met' if result['target_met_latest'] else 'NOT met'}; runs so far {result['wall_s_all_runs']}; "
          f"-> {args.out}", flush=True)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
