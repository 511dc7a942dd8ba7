"""Micro-benchmark: the sage8 emulator vs the interpreted kernel vs fp32 SDPA on this CPU.

Causal prefill, batch 1, 9 query heads / 3 KV heads, head_dim 64, fp16 inputs. Each timing is the best of
--repeats runs (the interpreter: --interp-repeats), so load from other processes inflates nothing but the spread.

    python experiments/bench_emulator.py --out experiments/results/bench_emulator.json
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before sageattention is imported (the 'interpret' impl)

import torch  # noqa: E402

from driftscope import paths  # noqa: E402


def best_of(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    except OSError:
        return platform.processor() or "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--interp-repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import sageattention  # noqa: F401  (interpreted, see above)
    import triton
    emulate, interp, fp32 = (paths.get_path("sage8", "emulate"), paths.get_path("sage8", "interpret"),
                             paths.get_path("fp32"))
    rows = []
    for T in args.lens:
        g = torch.Generator().manual_seed(T)
        q = (torch.randn(1, 9, T, 64, generator=g) * 1.5).half()
        k = (torch.randn(1, 3, T, 64, generator=g) * 1.5).half()
        v = torch.randn(1, 3, T, 64, generator=g).half()
        emulate(q, k, v, causal=True)  # warm-up
        t_emu, all_emu = best_of(lambda: emulate(q, k, v, causal=True), args.repeats)
        t_int, all_int = best_of(lambda: interp(q, k, v, causal=True), args.interp_repeats)
        t_sdpa, _ = best_of(lambda: fp32(q, k, v, causal=True), args.repeats)
        row = dict(tokens=T, emulate_s=t_emu, interpret_s=t_int, fp32_sdpa_s=t_sdpa,
                   speedup_emulate_vs_interpret=t_int / t_emu, emulate_vs_fp32_sdpa=t_emu / t_sdpa,
                   emulate_runs_s=all_emu, interpret_runs_s=all_int)
        rows.append(row)
        print(f"T={T:5d}  emulate {t_emu*1e3:8.1f} ms  interpret {t_int*1e3:9.1f} ms  fp32 SDPA {t_sdpa*1e3:7.1f} ms"
              f"  emulate is {t_int/t_emu:6.1f}x faster than interpret, {t_emu/t_sdpa:5.1f}x slower than SDPA",
              flush=True)
    result = dict(
        command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        machine=dict(cpu=cpu_model(), nproc=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     platform=platform.platform()),
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                      sageattention="1.0.6"),
        shape="q [1, 9, T, 64], k/v [1, 3, T, 64], fp16, causal prefill, smooth-K on",
        timing="best of repeats (seconds)", rows=rows,
        min_speedup_emulate_vs_interpret=min(r["speedup_emulate_vs_interpret"] for r in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
