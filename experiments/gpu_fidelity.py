"""The emulator's fidelity grid against the compiled SageAttention kernel on a CUDA GPU.

For every case of `driftscope.paths.sage_emulate.fidelity_cases()` (the CPU test grid, same seeded inputs):
  kernel     the compiled sageattention 1.0.6 kernel on the GPU
  emulate    the emulator on the GPU (flavor "kernel"); also with pv_chunk=16 (tensor-core fp16 accumulation model)
             and, for decode, with pad_keys=False (to test whether the GPU's masked key loads are zeros)
  interpret  the same Triton kernels under TRITON_INTERPRET=1 on CPU copies of the inputs, computed in a
             subprocess (the variable must be set before triton/sageattention are imported), spread over CPU cores
  fp32       SDPA in float32 on the GPU
and writes rel-L2 distances per case, the worst cases and a summary to a small JSON.

    python experiments/gpu_fidelity.py --out experiments/results/gpu_fidelity.json

Plumbing check on a CPU-only machine (the emulator stands in for the kernel):
    python experiments/gpu_fidelity.py --kernel-impl emulate --device cpu --limit 12 --out /tmp/gf.json
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def rel(a, b):
    a, b = a.double(), b.double()
    num, den = (a - b).norm().item(), b.norm().item()
    return 0.0 if num == 0 else num / den if den > 0 else float("inf")


def _interp_one(case):
    import torch
    torch.set_num_threads(1)
    from driftscope import paths
    from driftscope.paths import sage_emulate as emu
    q, k, v = emu.fidelity_inputs(case)
    name = "sage8" if case["smooth"] else "sage8-nosmooth"
    return case["id"], paths.get_path(name, "interpret")(q, k, v, causal=True)


def interpret_worker(cases_ids, out_path, workers):
    """Runs in the TRITON_INTERPRET=1 subprocess: interpreted outputs of the cases, saved with torch.save."""
    import multiprocessing as mp
    import torch
    from driftscope.paths import sage_emulate as emu
    cases = [c for c in emu.fidelity_cases() if c["id"] in set(cases_ids)]
    cases.sort(key=lambda c: -c["n"] * c["hq"] * (c["n"] if c["phase"] == "prefill" else 1))  # longest first
    with mp.get_context("fork").Pool(workers) as pool:
        outs = dict(pool.imap_unordered(_interp_one, cases))
    torch.save(outs, out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/gpu_fidelity.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernel-impl", default="kernel", choices=["kernel", "emulate"],
                    help="'emulate' only to check the script's plumbing without a GPU")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="CPU processes for the interpreter part")
    ap.add_argument("--limit", type=int, default=None, help="first N cases only (plumbing checks)")
    ap.add_argument("--worst", type=int, default=10)
    ap.add_argument("--_interpret-worker", nargs=2, metavar=("CASES_JSON", "OUT_PT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._interpret_worker:
        with open(args._interpret_worker[0]) as f:
            interpret_worker(json.load(f), args._interpret_worker[1], args.workers)
        return

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run this script without TRITON_INTERPRET: the kernel part needs the compiled kernels")
    import torch
    from driftscope import paths
    from driftscope.paths import sage_emulate as emu

    t_start = time.time()
    cases = emu.fidelity_cases()[: args.limit]
    tmp = tempfile.mkdtemp(prefix="gpu_fidelity_")
    ids_path, interp_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "interp.pt")
    with open(ids_path, "w") as f:
        json.dump([c["id"] for c in cases], f)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--workers", str(args.workers),
                               "--_interpret-worker", ids_path, interp_path], env=env)

    dev = torch.device(args.device)
    kernel_name = args.kernel_impl
    per_case, gpu_outs = [], {}
    t_gpu = time.time()
    for c in cases:
        q, k, v = (t.to(dev) for t in emu.fidelity_inputs(c))
        name = "sage8" if c["smooth"] else "sage8-nosmooth"
        causal = c["phase"] == "prefill" and c["n"] > 1
        kern = paths.get_path(name, kernel_name)(q, k, v, causal=True)
        e = paths.get_path(name, "emulate")(q, k, v, causal=True)
        e16 = emu.sage_emulate(q, k, v, causal=causal, smooth_k=c["smooth"], pv_chunk=16)
        ref = paths.get_path("fp32")(q, k, v, causal=True)
        row = dict(case=c["id"], kernel_vs_fp32=rel(kern, ref), emulate_vs_kernel=rel(e, kern),
                   emulate_pv16_vs_kernel=rel(e16, kern), emulate_vs_fp32=rel(e, ref))
        if c["phase"] == "decode" and c["n"] % 64:
            e_nopad = emu.sage_emulate(q, k, v, causal=False, smooth_k=c["smooth"], pad_keys=False)
            row["emulate_without_pad_keys_vs_kernel"] = rel(e_nopad, kern)
        per_case.append(row)
        gpu_outs[c["id"]] = (kern.cpu(), ref.cpu())
    t_gpu = time.time() - t_gpu

    rc = worker.wait()
    if rc != 0:
        sys.exit(f"the interpreter subprocess failed (exit {rc})")
    interp = torch.load(interp_path, weights_only=True)
    for row in per_case:
        kern, ref = gpu_outs[row["case"]]
        it = interp[row["case"]]
        row["interpret_vs_kernel"] = rel(it, kern)
        row["interpret_vs_fp32"] = rel(it, ref)
        d = row["kernel_vs_fp32"]
        for key in ("emulate", "interpret"):
            row[f"{key}_ratio"] = row[f"{key}_vs_kernel"] / d if d > 0 else (0.0 if row[f"{key}_vs_kernel"] == 0
                                                                             else float("inf"))

    def worst(key):
        return sorted(per_case, key=lambda r: -r[key])[: args.worst]

    import triton
    nopad = [r for r in per_case if "emulate_without_pad_keys_vs_kernel" in r]
    result = dict(
        argv=sys.argv, command="python " + " ".join(sys.argv),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        kernel_impl=kernel_name,
        versions=dict(torch=torch.__version__, triton=triton.__version__, sageattention="1.0.6",
                      cuda=torch.version.cuda, python=platform.python_version()),
        tolerance="ratio = rel-L2(X, kernel) / rel-L2(kernel, fp32); test tolerance 0.10, goal 0.03",
        summary=dict(
            cases=len(per_case),
            worst_emulate_ratio=worst("emulate_ratio")[0], worst_interpret_ratio=worst("interpret_ratio")[0],
            max_emulate_vs_kernel=max(r["emulate_vs_kernel"] for r in per_case),
            max_emulate_pv16_vs_kernel=max(r["emulate_pv16_vs_kernel"] for r in per_case),
            max_interpret_vs_kernel=max(r["interpret_vs_kernel"] for r in per_case),
            decode_pad_key_cases=len(nopad),
            pad_keys_model_better_in=sum(r["emulate_vs_kernel"] < r["emulate_without_pad_keys_vs_kernel"]
                                         for r in nopad),
            cases_over_tolerance=[r["case"] for r in per_case if r["emulate_ratio"] > 0.10],
            seconds=dict(total=time.time() - t_start, gpu_part=t_gpu)),
        worst_emulate=worst("emulate_ratio"), worst_interpret=worst("interpret_ratio"), cases=per_case)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    s = result["summary"]
    print(f"{s['cases']} cases in {s['seconds']['total']:.0f} s on {result['device']}")
    print(f"worst emulate ratio  {s['worst_emulate_ratio']['emulate_ratio']:.2e} ({s['worst_emulate_ratio']['case']})")
    print(f"worst interpret ratio {s['worst_interpret_ratio']['interpret_ratio']:.2e} "
          f"({s['worst_interpret_ratio']['case']})")
    print(f"pad-key model closer to the kernel in {s['pad_keys_model_better_in']}/{len(nopad)} decode cases")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
