"""SageAttention 2.2.0's own outputs (`../shared/data/sa2-reference`), read and scored against driftscope's emulators.

File layout (written by whoever ran the kernels; read-only here): one HDF5 file per head_dim and dtype,
`sa2_ref_d{64,128}_{float16,bfloat16}.h5`, each holding groups `caseNNN` with attributes tq, tk, d, dtype, k_bias,
causal and datasets q [1,4,tq,d], k and v [1,2,tk,d], out_<variant> [1,4,tq,d], all the raw 16-bit patterns of the
case's dtype stored as int16. The commit-ready subset `tests/data/sa2_ref_subset.h5` has the same case groups one
level down, under a group named after their source file (`sa2_ref_d64_float16/case002`), made by `write_subset`.

A case's score is rel-L2(emulator, kernel) / rel-L2(kernel, fp32 SDPA): the emulator's distance from the kernel as
a fraction of the kernel's own error. Cases whose kernel output is not finite are kernel findings, not scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# reference variant -> the driftscope path that models it
VARIANT_PATHS = {"triton": "sage2-triton", "triton_nosmooth": "sage2-triton-nosmooth", "sm90": "sage2-fp8",
                 "sm90_nosmooth": "sage2-fp8-nosmooth", "sm89": "sage2-fp8-ada", "sm80": "sage2-fp16-ampere"}


def read_cases(path: str | Path) -> list[dict]:
    """Every case under `path` (the reference folder, one of its files, or the subset file), as CPU tensors.

    Each case: id ("sa2_ref_d64_float16/case002"), tq, tk, d, dtype, k_bias, causal, q, k, v and out[variant].
    """
    import h5py

    path = Path(path)
    files = sorted(path.glob("sa2_ref_*.h5")) if path.is_dir() else [path]
    cases = []
    for file in files:
        with h5py.File(file, "r") as f:
            groups = [(f"{file.stem}/{n}", g) for n, g in f.items() if "q" in g]
            groups += [(f"{n}/{m}", h) for n, g in f.items() if "q" not in g for m, h in g.items()]
            for cid, g in sorted(groups):
                dtype = getattr(torch, g.attrs["dtype"])
                raw = {n: torch.from_numpy(np.asarray(g[n])).view(dtype) for n in g}
                cases.append(dict(id=cid, tq=int(g.attrs["tq"]), tk=int(g.attrs["tk"]), d=int(g.attrs["d"]),
                                  dtype=g.attrs["dtype"], k_bias=float(g.attrs["k_bias"]),
                                  causal=bool(g.attrs["causal"]), q=raw["q"], k=raw["k"], v=raw["v"],
                                  out={n[4:]: t for n, t in raw.items() if n.startswith("out_")}))
    return cases


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; 0 when a equals b."""
    a, b = a.double(), b.double()
    num = (a - b).norm().item()
    return 0.0 if num == 0 else num / b.norm().item()


def nonfinite(cases: list[dict]) -> list[tuple[str, str]]:
    """(case id, variant) of every kernel output with a NaN or inf: the kernel findings."""
    return sorted((c["id"], var) for c in cases for var, out in c["out"].items()
                  if not torch.isfinite(out.float()).all())


def score(case: dict, variant: str) -> dict:
    """The emulator of `variant` on one case: its distance to the kernel, the kernel's to fp32, their ratio."""
    from . import get_path, reference

    q, k, v = case["q"], case["k"], case["v"]
    kernel = case["out"][variant]
    emulated = get_path(VARIANT_PATHS[variant], "emulate")(q, k, v, causal=case["causal"])
    exact = reference.fp32(q.float(), k.float(), v.float(), causal=case["causal"])  # fp32 SDPA, not rounded
    d_emu, d_kernel = rel_l2(emulated, kernel), rel_l2(kernel, exact)
    ratio = d_emu / d_kernel if d_kernel > 0 else (0.0 if d_emu == 0 else float("inf"))
    return dict(case=case["id"], variant=variant, emu_vs_kernel=d_emu, kernel_vs_fp32=d_kernel, ratio=ratio,
                bitwise=float((emulated == kernel).float().mean()))


def summarize(scores: list[dict], source: str) -> dict:
    """Worst and median ratio per variant (the JSON that experiments/results/sa2_emulator_fidelity.json holds)."""
    out = {"what": "rel-L2(driftscope emulator, SageAttention 2.2.0 kernel) / rel-L2(kernel, fp32 SDPA) per case",
           "source": source,
           "kernels": "SageAttention 2.2.0 (thu-ml/SageAttention d1a57a5) built for sm90, run on an NVIDIA H200; "
                      "sm89 and sm80 variants ran there too: on Ada or Ampere their accumulators may round differently",
           "variants": {}}
    for variant, path in VARIANT_PATHS.items():
        rows = sorted((s for s in scores if s["variant"] == variant), key=lambda s: s["ratio"])
        if rows:
            out["variants"][variant] = dict(
                path=path, cases=len(rows), worst_ratio=round(rows[-1]["ratio"], 4), worst_case=rows[-1]["case"],
                median_ratio=round(float(np.median([s["ratio"] for s in rows])), 4),
                bitwise_cases=sum(s["bitwise"] == 1.0 for s in rows))
    return out


def write_summary(summary: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=1) + "\n")


def write_subset(src_dir: str | Path, dst: str | Path, keep) -> list[str]:
    """Copy the cases for which keep(attrs) is true from the reference folder into one file `dst` (same datasets and
    attributes, grouped by source file); returns the copied ids."""
    import h5py

    copied = []
    with h5py.File(dst, "w") as out:
        out.attrs["note"] = ("a subset of SageAttention 2.2.0's reference outputs (../shared/data/sa2-reference); half "
                             "tensors stored as their raw 16-bit patterns (int16); view as attrs['dtype']")
        for file in sorted(Path(src_dir).glob("sa2_ref_*.h5")):
            with h5py.File(file, "r") as f:
                for name, g in f.items():
                    if keep(dict(g.attrs)):
                        f.copy(g, out.require_group(file.stem), name=name)
                        copied.append(f"{file.stem}/{name}")
    return copied
