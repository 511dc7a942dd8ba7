"""The emulator's and the interpreter's fidelity against the compiled SageAttention kernel on a CUDA GPU.

For every case of `driftscope.paths.sage_emulate.fidelity_cases()` (the CPU test grid, same seeded inputs):
  kernel     the compiled sageattention 1.0.6 kernel on the GPU, with its output in the input dtype and (a second
             call) in fp32, i.e. before the final cast
  emulate    the emulator on the GPU, default and diagnostic variants (VARIANTS: fp16 P.V accumulation rounded every
             16 keys, to nearest or toward zero; P.V in fp32; padded keys dropped), compared in the input dtype
             and in fp32; bf16 also with the interpreter's truncating cast
  interpret  the same Triton kernels under TRITON_INTERPRET=1 on the CPU
  fp32       SDPA in float32 on the GPU
plus the CUDA test's own inputs (tests/test_paths.py::test_kernel_on_cuda), and writes rel-L2 distances per case, the
worst cases and a summary (closest variant per case class) to a small JSON.

The interpreter needs triton >= 3.9, which the GPU machine may lack (3.6's interpreter fails on these kernels). Then
compute its outputs on a CPU machine and carry the file (raw output bits + sha256 of each case's inputs; the GPU
side regenerates the inputs from the seeds and aborts if any hash differs):
    python experiments/gpu_fidelity.py --save-interpret .fid/interpret_outputs.npz            # CPU, triton >= 3.9
    python experiments/gpu_fidelity.py --interpret-from .fid/interpret_outputs.npz \
        --out experiments/results/gpu_fidelity.json                                            # GPU
Without --interpret-from the interpreter runs here in a subprocess, in parallel with the GPU part.

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
    outs, t0 = {}, time.time()
    with mp.get_context("fork").Pool(workers) as pool:
        for i, (cid, out) in enumerate(pool.imap_unordered(_interp_one, cases), 1):
            outs[cid] = out
            if i % 16 == 0 or i == len(cases):
                print(f"  interpret {i}/{len(cases)} ({time.time() - t0:.0f} s)", flush=True)
    torch.save(outs, out_path)


def run_interpreter(cases, workers):
    """The interpreter's outputs {case id: CPU tensor}, computed in a TRITON_INTERPRET=1 subprocess."""
    import torch
    tmp = tempfile.mkdtemp(prefix="gpu_fidelity_")
    ids_path, interp_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "interp.pt")
    with open(ids_path, "w") as f:
        json.dump([c["id"] for c in cases], f)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--workers", str(workers),
                          "--_interpret-worker", ids_path, interp_path], env=env)
    if rc != 0:
        sys.exit(f"the interpreter subprocess failed (exit {rc})")
    return torch.load(interp_path, weights_only=True)


# ---- the interpreter's outputs carried to the GPU machine (its triton may be too old for the interpreter) ----
_BITS = {"float16": "uint16", "bfloat16": "uint16", "float32": "uint32"}


def input_sha256(q, k, v) -> str:
    """sha256 over the dtype, shape and raw bytes of q, k, v (CPU tensors as fidelity_inputs makes them)."""
    import hashlib
    import torch
    h = hashlib.sha256()
    for t in (q, k, v):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint16 if t.element_size() == 2 else torch.int32).numpy().tobytes())
    return h.hexdigest()


def save_interpret(path, cases, workers):
    """Run the interpreter over `cases` here (triton >= 3.9) and save its outputs as raw bits + input hashes."""
    import numpy as np
    import torch
    import triton
    from driftscope.paths import sage_emulate as emu
    t0 = time.time()
    outs = run_interpreter(cases, workers)
    arrays = {}
    for c in cases:
        o = outs[c["id"]]
        assert str(o.dtype).removeprefix("torch.") == c["dtype"], (c["id"], o.dtype)
        arrays[f"out/{c['id']}"] = o.contiguous().view(getattr(torch, _BITS[c["dtype"]])).numpy()
        arrays[f"sha/{c['id']}"] = np.array(input_sha256(*emu.fidelity_inputs(c)))
    meta = dict(argv=sys.argv, made=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cases=len(cases), host=platform.node(),
                cpu=platform.processor() or platform.machine(), seconds=round(time.time() - t0, 1),
                versions=dict(torch=torch.__version__, triton=triton.__version__, numpy=np.__version__,
                              sageattention=_sage_version(), python=platform.python_version()))
    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {len(cases)} cases, {os.path.getsize(path) / 1e6:.1f} MB, {time.time() - t0:.0f} s",
          flush=True)


def load_interpret(path, cases):
    """{case id: CPU tensor} from a --save-interpret file, after checking every case's input hash; exits on a
    mismatch (torch's seeded CPU RNG made other inputs here than where the file was made)."""
    import numpy as np
    import torch
    from driftscope.paths import sage_emulate as emu
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        missing = [c["id"] for c in cases if f"out/{c['id']}" not in z.files]
        if missing:
            sys.exit(f"{path} lacks {len(missing)} of the {len(cases)} cases, e.g. {missing[:3]}")
        bad, outs = [], {}
        for c in cases:
            q, k, v = emu.fidelity_inputs(c)
            if str(z[f"sha/{c['id']}"]) != input_sha256(q, k, v):
                bad.append(c["id"])
                continue
            outs[c["id"]] = torch.from_numpy(z[f"out/{c['id']}"].copy()).view(getattr(torch, c["dtype"]))
    if bad:
        sys.exit(f"ABORT: the seeded inputs of {len(bad)} of {len(cases)} cases (e.g. {bad[:3]}) differ from those "
                 f"the interpreter outputs in {path} were computed from (made with torch "
                 f"{meta['versions']['torch']}; here torch {torch.__version__}): torch's CPU RNG gives other numbers "
                 "here. Regenerate the file with the same torch version as this machine, or carry the inputs.")
    print(f"interpreter outputs of {len(outs)} cases from {path} (made with torch {meta['versions']['torch']}, "
          f"triton {meta['versions']['triton']}); every input sha256 matches", flush=True)
    return outs, meta


def _sage_version():
    try:
        from importlib.metadata import version
        return version("sageattention")
    except Exception:
        return "?"


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
    ap.add_argument("--save-interpret", metavar="NPZ", help="run the interpreter over the grid HERE (CPU, triton >= "
                    "3.9) and save its outputs (raw bits) and each case's input sha256 to NPZ, then exit")
    ap.add_argument("--interpret-from", metavar="NPZ", help="take the interpreter's outputs from a --save-interpret "
                    "file (inputs verified by sha256) instead of running the interpreter here")
    ap.add_argument("--_interpret-worker", nargs=2, metavar=("CASES_JSON", "OUT_PT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._interpret_worker:
        with open(args._interpret_worker[0]) as f:
            interpret_worker(json.load(f), args._interpret_worker[1], args.workers)
        return

    if args.save_interpret:
        from driftscope.paths import sage_emulate as emu
        save_interpret(args.save_interpret, emu.fidelity_cases()[: args.limit], args.workers)
        return

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run this script without TRITON_INTERPRET: the kernel part needs the compiled kernels")
    import inspect
    import torch
    from driftscope.paths import sage_emulate as emu
    if "pv_accum" not in inspect.signature(emu.sage_emulate).parameters:
        sys.exit(f"the driftscope imported from {emu.__file__} predates this script (sage_emulate has no pv_accum/"
                 "out_dtype): rebuild/reinstall the driftscope wheel from this tree, or put the repo root first on "
                 "PYTHONPATH")

    t_start = time.time()
    cases = emu.fidelity_cases()[: args.limit]
    if args.interpret_from:  # verify every input hash before spending any GPU time
        interp, interp_meta = load_interpret(args.interpret_from, cases)
        worker = None
    else:  # the interpreter here, in a subprocess, while the GPU works
        tmp = tempfile.mkdtemp(prefix="gpu_fidelity_")
        ids_path, interp_path = os.path.join(tmp, "cases.json"), os.path.join(tmp, "interp.pt")
        with open(ids_path, "w") as f:
            json.dump([c["id"] for c in cases], f)
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--workers", str(args.workers),
                                   "--_interpret-worker", ids_path, interp_path], env=env)
        interp_meta = dict(computed="here, in a TRITON_INTERPRET=1 subprocess")

    dev = torch.device(args.device)
    kernel = make_kernel(args.kernel_impl)
    per_case, gpu_outs = [], {}
    t_gpu = time.time()
    for i, c in enumerate(cases, 1):
        q, k, v = (t.to(dev) for t in emu.fidelity_inputs(c))
        causal = c["phase"] == "prefill" and c["n"] > 1
        row, kern, ref = measure(q, k, v, causal, c["smooth"], kernel)
        row = dict(case=c["id"], cls=f"{c['phase']}-{'fp16' if c['dtype'] == 'float16' else 'bf16'}", **row)
        per_case.append(row)
        gpu_outs[c["id"]] = (kern.cpu(), ref.cpu())
        if i % 32 == 0 or i == len(cases):
            print(f"  {args.kernel_impl} {i}/{len(cases)} ({time.time() - t_gpu:.0f} s)", flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_gpu = time.time() - t_gpu

    # the CUDA test's own inputs (tests/test_paths.py::test_kernel_on_cuda: 9 q heads, 3 kv heads, d64, seed 0)
    test_rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for tq, tk in ((300, 300), (1, 300), (1, 128)):
            q, k, v = (t.to(dev) for t in _test_qkv(tq, tk, dtype))
            row, _, _ = measure(q, k, v, tq > 1, True, kernel)
            test_rows.append(dict(case=f"test_kernel_on_cuda[{tq}-{tk}-{str(dtype)[6:]}]", **row))

    if worker is not None:
        rc = worker.wait()
        if rc != 0:
            sys.exit(f"the interpreter subprocess failed (exit {rc})")
        interp = torch.load(interp_path, weights_only=True)
    for row in per_case:
        kern, ref = gpu_outs[row["case"]]
        it = interp[row["case"]]
        row["interpret_vs_kernel"] = _r(rel(it, kern))
        row["interpret_vs_fp32"] = _r(rel(it, ref))
        row["interpret_ratio"] = _r(_ratio(rel(it, kern), row["kernel_vs_fp32"]))

    import triton
    result = dict(
        argv=sys.argv, command="python " + " ".join(sys.argv),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        kernel_impl=args.kernel_impl,
        versions=dict(torch=torch.__version__, triton=triton.__version__, sageattention=_sage_version(),
                      cuda=torch.version.cuda, python=platform.python_version()),
        interpret_source=dict(file=args.interpret_from, **interp_meta) if args.interpret_from else interp_meta,
        legend=LEGEND,
        summary=summarize(per_case, args.worst),
        seconds=dict(total=round(time.time() - t_start, 1), gpu_part=round(t_gpu, 1)),
        cuda_test_cases=test_rows, cases=per_case)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, separators=(",", ":"))
    print_summary(result)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)", flush=True)


# ---- what is measured per case ----
VARIANTS = {  # emulator options that could explain differences from the GPU kernel; "default" is the emulator
    "default": {},
    "pv16": dict(pv_chunk=16),  # tensor cores: fp16 P.V accumulator rounded (to nearest) every 16 keys
    "pv16_rz": dict(pv_chunk=16, pv_accum="fp16-rz"),  # ... rounded toward zero every 16 keys
    "pv64_rz": dict(pv_accum="fp16-rz"),  # one rounding per 64-key block, toward zero
    "pv_fp32": dict(pv_accum="fp32"),  # no fp16 rounding of P.V (as if the add were fused into an fp32 dot)
    "nopad": dict(pad_keys=False),  # decode: padded keys dropped (only where kv_len % 64 != 0)
}
LEGEND = {
    "rel": "rel-L2(a, b) = |a - b| / |b| over the whole output; ratio = rel(X, kernel) / rel(kernel, fp32) "
           "(test tolerance 0.10, goal 0.03)",
    "kernel_vs_fp32": "the compiled kernel (output in the input dtype) against SDPA in fp32",
    "<variant>": "rel(emulator variant, kernel), both in the input dtype (emulator bf16 rounded to nearest)",
    "<variant>_f32": "the same before the final cast: the kernel run with output_dtype=float32 vs the emulator's "
                     "fp32 output; separates the internal numerics from the output rounding",
    "default_trunc": "bf16 only: the emulator with the output truncated to bf16 (the interpreter's cast)",
    "cast_rn / cast_trunc": "fraction of the kernel's outputs bitwise equal to its own fp32 output rounded to "
                            "nearest / truncated (bf16 only; fp16 cast_rn only)",
    "variants": {k: str(v) for k, v in VARIANTS.items()},
}


def _r(x):
    return float(f"{x:.4g}") if x == x and abs(x) != float("inf") else x


def _ratio(num, den):
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _test_qkv(tq, tk, dtype):
    """tests/test_paths.py's qkv(Hq=9, Hkv=3, Tq, Tk, D=64, dtype, seed=0), repeated here (tests/ is not installed)."""
    import torch
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 9, tq, 64, generator=g) * 1.5).to(dtype)
    k = (torch.randn(1, 3, tk, 64, generator=g) * 1.5 + torch.randn(64, generator=g) * 3).to(dtype)
    v = torch.randn(1, 3, tk, 64, generator=g).to(dtype)
    return q, k, v


def make_kernel(impl):
    """kernel(q, k, v, causal, smooth_k, out_dtype) -> output; the compiled sageattention kernel as
    driftscope.paths.sage_triton.sage_forward calls it, with the output dtype overridable (fp32: before the cast)."""
    import torch
    from driftscope.paths import sage_emulate as emu
    if impl == "emulate":  # plumbing check without a GPU
        return lambda q, k, v, causal, smooth_k, out_dtype: emu.sage_emulate(
            q, k, v, causal=causal, smooth_k=smooth_k, out_dtype=out_dtype)
    from driftscope.paths import sage_triton

    def kernel(q, k, v, causal, smooth_k, out_dtype):
        return sage_triton.sage_forward(q, k, v, causal=causal, scale=None, smooth_k=smooth_k, mode="kernel",
                                        out_dtype=out_dtype)
    return kernel


def measure(q, k, v, causal, smooth_k, kernel):
    """One case: the kernel (input dtype and fp32 output), fp32 SDPA and every emulator variant."""
    import torch
    from driftscope import paths
    from driftscope.paths import sage_emulate as emu
    dtype = q.dtype
    kern = kernel(q, k, v, causal, smooth_k, dtype)
    kern32 = kernel(q, k, v, causal, smooth_k, torch.float32)
    # the driftscope path itself must give the same bits as the direct call
    name = "sage8" if smooth_k else "sage8-nosmooth"
    same_as_path = None
    if q.is_cuda:
        same_as_path = bool(torch.equal(paths.get_path(name, "kernel")(q, k, v, causal=True), kern))
    ref = paths.get_path("fp32")(q, k, v, causal=True)
    d = rel(kern, ref)
    row = dict(kernel_vs_fp32=_r(d), kernel_f32_vs_fp32=_r(rel(kern32, ref)), path_bitwise_equal=same_as_path,
               cast_rn=_r(float((kern32.to(dtype) == kern).float().mean())))
    pad = not causal and k.shape[2] % 64 != 0
    for name_v, kw in VARIANTS.items():
        if name_v == "nopad" and not pad:
            continue
        e32 = emu.sage_emulate(q, k, v, causal=causal, smooth_k=smooth_k, out_dtype=torch.float32, **kw)
        row[name_v] = _r(rel(e32.to(dtype), kern))
        row[name_v + "_f32"] = _r(rel(e32, kern32))
        if name_v == "default":
            row["emulate_vs_fp32"] = _r(rel(e32.to(dtype), ref))
            if dtype == torch.bfloat16:
                row["default_trunc"] = _r(rel(emu._round_out(e32, dtype, "interpret"), kern))
    if dtype == torch.bfloat16:
        row["cast_trunc"] = _r(float((emu._round_out(kern32, dtype, "interpret") == kern).float().mean()))
    row["emulate_ratio"] = _r(_ratio(row["default"], d))
    return row, kern, ref


def summarize(rows, n_worst):
    import statistics
    keys = [k for k in VARIANTS] + ["default_trunc"]

    def ratios(rs, key):
        return [_ratio(r[key], r["kernel_vs_fp32"]) for r in rs if key in r]

    def best(rs, suffix=""):
        wins = {}
        for r in rs:
            cand = {k: r[k + suffix] for k in keys if k + suffix in r}
            if cand:
                b = min(cand, key=cand.get)
                wins[b] = wins.get(b, 0) + 1
        return wins

    def stats(rs):
        out = {}
        for k in keys:
            for suffix in ("", "_f32"):
                rr = ratios(rs, k + suffix)
                if rr:
                    out[k + suffix] = dict(median_ratio=_r(statistics.median(rr)), max_ratio=_r(max(rr)), n=len(rr))
        return out

    classes = sorted({r["cls"] for r in rows})
    by_cls = {c: [r for r in rows if r["cls"] == c] for c in classes}
    pads = [r for r in rows if "nopad" in r]
    worst_e = sorted(rows, key=lambda r: -r["emulate_ratio"])[:n_worst]
    worst_i = sorted(rows, key=lambda r: -r.get("interpret_ratio", 0))[:n_worst]
    return dict(
        cases=len(rows),
        worst_emulate=dict(case=worst_e[0]["case"], ratio=worst_e[0]["emulate_ratio"],
                           emulate_vs_kernel=worst_e[0]["default"], kernel_vs_fp32=worst_e[0]["kernel_vs_fp32"]),
        worst_interpret=dict(case=worst_i[0]["case"], ratio=worst_i[0].get("interpret_ratio"),
                             interpret_vs_kernel=worst_i[0].get("interpret_vs_kernel"),
                             kernel_vs_fp32=worst_i[0]["kernel_vs_fp32"]),
        worst_emulate_cases=[r["case"] for r in worst_e], worst_interpret_cases=[r["case"] for r in worst_i],
        emulate_over_tolerance=[r["case"] for r in rows if r["emulate_ratio"] > 0.10],
        closest_variant=dict(all=best(rows), all_f32=best(rows, "_f32"),
                             **{c: best(rs) for c, rs in by_cls.items()},
                             **{c + "_f32": best(rs, "_f32") for c, rs in by_cls.items()}),
        ratio_stats=dict(all=stats(rows), **{c: stats(rs) for c, rs in by_cls.items()}),
        pad_keys=dict(noncausal_pad_cases=len(pads), default_closer=sum(r["default"] < r["nopad"] for r in pads),
                      default_closer_f32=sum(r["default_f32"] < r["nopad_f32"] for r in pads)),
        output_cast=dict(min_cast_rn=min(r["cast_rn"] for r in rows),
                         bf16_min_cast_rn=min((r["cast_rn"] for r in rows if "cast_trunc" in r), default=None),
                         bf16_mean_cast_trunc=_r(statistics.fmean(r["cast_trunc"] for r in rows if "cast_trunc" in r)) if any(
                             "cast_trunc" in r for r in rows) else None),
        path_bitwise_equal=all(r["path_bitwise_equal"] is not False for r in rows),
    )


def print_summary(result):
    s = result["summary"]
    print(f"{s['cases']} cases in {result['seconds']['total']:.0f} s on {result['device']} "
          f"(kernel part {result['seconds']['gpu_part']:.0f} s)")
    we, wi = s["worst_emulate"], s["worst_interpret"]
    print(f"worst emulate ratio   {we['ratio']:.2e} ({we['case']}: emu-kernel {we['emulate_vs_kernel']:.2e}, "
          f"kernel-fp32 {we['kernel_vs_fp32']:.2e})")
    print(f"worst interpret ratio {wi['ratio']:.2e} ({wi['case']})")
    print(f"over tolerance: {len(s['emulate_over_tolerance'])} {s['emulate_over_tolerance'][:6]}")
    for cls, st in s["ratio_stats"].items():
        print(f"  {cls:14s} " + " ".join(f"{k} {v['median_ratio']:.1e}/{v['max_ratio']:.1e}" for k, v in st.items()))
    print("closest variant (output dtype):", s["closest_variant"]["all"], " (fp32 out):",
          s["closest_variant"]["all_f32"])
    print("pad keys:", s["pad_keys"], " output cast:", s["output_cast"], " path==direct:", s["path_bitwise_equal"])
    print("CUDA test cases (ratio = variant / kernel-fp32):")
    for r in result["cuda_test_cases"]:
        d = r["kernel_vs_fp32"]
        print(f"  {r['case']:36s} kernel-fp32 {d:.2e} " + " ".join(
            f"{k} {_ratio(r[k], d):.3f}" for k in list(VARIANTS) + ["default_trunc"] if k in r)
            + f" | f32: default {_ratio(r['default_f32'], d):.3f} pv16_rz {_ratio(r['pv16_rz_f32'], d):.3f}"
            + f" cast_rn {r['cast_rn']}", flush=True)


if __name__ == "__main__":
    main()
