"""SageAttention 1.0.6 vs 2.x on the embedded model, compiled kernels side by side (issue 14, item 5).

Reads committed GPU results and writes one Markdown table (a row per compiled sage path: its version and kernel,
isolated attn_out rel-L2 vs fp16 by layer third, Δppl, prefill and decode KL, tokens/s over fp16, emulator fidelity),
a second table of the emulators against the compiled kernels at model scale (a path compiled in one capture and
emulated in the other), and a figure. Each path's numbers come from the file where its compiled kernel ran (the run
files record the implementation per path), so nothing is typed in.

The inputs come from experiments/gpu/session.sh (1.0.6 and 2.x share the import name `sageattention`, so each
family ran in its own process; the other family's paths ran emulated there):

    bash experiments/gpu/session.sh sa1 evaluate capture     # smollm2-135m-<card>-evaluate-sa1.h5, ...-sa1-512.h5
    bash experiments/gpu/session.sh sa1 bench fidelity       # bench_throughput.json (renamed ..._sa1_<card>.json),
                                                             # model_fidelity_sa1.json
    bash experiments/gpu/session.sh sa2 evaluate capture     # ...-evaluate-sa2.h5, ...-sa2-512.h5
    bash experiments/gpu/session.sh sa2 bench fidelity       # bench_throughput_sa2_<card>.json, model_fidelity_sa2.json

whose stages run:

    python -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage8-nosmooth,sage2-triton,sage2-fp8 \\
        --mode both --lengths 512 --prompts 2 --decode 70 --no-figures --quiet --out ...-sa1-512.h5
    python -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage2-triton,sage2-fp8,sage2-fp8-nosmooth \\
        --mode both --lengths 512 --prompts 2 --decode 70 --no-figures --quiet --out ...-sa2-512.h5
    python -m driftscope.evaluate --device cuda --paths sage8,sage8-nosmooth (sa1) | sage2-fp8,sage2-triton,\\
        sage2-fp8-nosmooth (sa2) --contexts 512,2048 --windows 10 --decode-windows 6 --quiet --out ...
    python -m driftscope.bench --models llama3-8b-shape --paths fp16,sage8 (sa1) | fp16,sage2-fp8,sage2-triton (sa2) \\
        --prefill 1024,4096,16384 --decode 4096 --repeats 3 --out-dir ...
    python experiments/model_fidelity.py --out model_fidelity_<family>.json

Then, on any machine (the defaults are the committed H200 files; a default throughput file that does not exist yet is
left out, and its family's throughput cells say "not measured"):

    python experiments/sage_versions.py
    python experiments/sage_versions.py --bench experiments/results/bench_throughput_sa2_h200.json --out-md /tmp/v.md \\
        --out-fig /tmp/v
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import driftscope as ds  # noqa: E402
from driftscope.paths.catalog import SAGE_PATHS  # noqa: E402
from driftscope.report import plots, versions  # noqa: E402
from driftscope.report.figures import read_bench  # noqa: E402
from driftscope.report.tables import AnalysisError  # noqa: E402
from driftscope.report.text import markdown_table  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
CAPTURES = [RESULTS / "smollm2-135m-h200-sa1-512.h5", RESULTS / "smollm2-135m-h200-sa2-512.h5"]
EVALUATES = [RESULTS / "smollm2-135m-h200-evaluate-sa1.h5", RESULTS / "smollm2-135m-h200-evaluate-sa2.h5"]
BENCH = [RESULTS / "bench_throughput_sa1_h200.json", RESULTS / "bench_throughput_sa2_h200.json"]
FIDELITY = [RESULTS / "model_fidelity_sa1.json", RESULTS / "model_fidelity_sa2.json"]
NOT_MEASURED = "not measured"


@dataclass
class Comparison:
    """Everything the table and the figure show, as long-form tables (``driftscope.report.versions``)."""

    model: str
    device: str
    paths: pd.DataFrame  # path, version, source (the capture where its kernel ran), function
    layers: pd.DataFrame  # path, phase, layer, value: isolated attn_out rel-L2 of each compiled path
    classes: pd.DataFrame  # path, phase, cls, value: the median over each third of the layers
    evaluate: pd.DataFrame  # path, name, key, value, low, high (compiled paths only)
    speed: pd.DataFrame  # path, phase, context, tokens_per_s, ratio, source (compiled paths only)
    fidelity: pd.DataFrame  # path, worst_ratio, phase, length, layer, cases, target, goal, source
    agreement: pd.DataFrame  # path, phase, compiled_in, emulated_in, compiled, emulated, ratio
    facts: dict = field(default_factory=dict)  # what the notes under the tables name


def _one(values: set, what: str):
    if len(values) != 1:
        raise AnalysisError(f"the inputs disagree on {what}: {sorted(map(str, values))}; compare runs of one setup")
    return next(iter(values))


def _check_family(path: str, version: str) -> None:
    family = SAGE_PATHS[path].family
    if not (version == family or (family == "2.x" and version.startswith("2."))):
        raise AnalysisError(f"{path} models SageAttention {family}, but its kernel ran with sageattention {version}")


def load(captures, evaluates, bench, fidelity) -> Comparison:
    """Reads the result files and builds the comparison (the captures decide which paths are compared)."""
    caps = {Path(p).name: ds.open_run(p) for p in captures}
    evals = {Path(p).name: ds.open_run(p) for p in evaluates}
    try:
        runs = {**caps, **evals}
        for name, run in runs.items():
            if run.status != "complete":
                raise AnalysisError(f"{name} is {run.status}, not complete")
        device = _one({r.environment.get("device_name") for r in runs.values()}, "the card")
        model = _one({r.model["name"] for r in runs.values()}, "the model")
        _one({r.model["sha256"] for r in runs.values()}, "the model weights (sha256)")
        _one({r.config["paths"][0] for r in caps.values()} | {"fp16"}, "the captures' reference path")
        for name, run in evals.items():
            if run.environment.get("attn_implementation", {}).get("base") != "sdpa":
                raise AnalysisError(f"{name}'s baseline is not fp16 SDPA: {run.environment.get('attn_implementation')}")

        compiled = versions.compiled_paths({n: r.environment for n, r in caps.items()})
        order = list(SAGE_PATHS)
        compiled = compiled[compiled["path"].isin(order)].sort_values("path", key=lambda s: s.map(order.index))
        compiled = compiled.assign(function=compiled["path"].map(lambda p: SAGE_PATHS[p].function))
        for r in compiled.itertuples():
            _check_family(r.path, r.version)
        by_layer = {n: versions.attn_out_by_layer(r.metrics(mode="isolated", site="attn_out", metric="rel_l2",
                                                            head_index=-1)) for n, r in caps.items()}
        layers = pd.concat([by_layer[r.source][by_layer[r.source]["path"] == r.path] for r in compiled.itertuples()],
                           ignore_index=True)
        agreement = versions.emulator_agreement({n: (by_layer[n], caps[n].environment) for n in caps})

        ev_compiled = versions.compiled_paths({n: r.environment for n, r in evals.items()})
        measures = []
        for r in ev_compiled.itertuples():
            if r.path in set(compiled["path"]):
                if r.version != compiled.set_index("path").loc[r.path, "version"]:
                    raise AnalysisError(f"{r.path} ran sageattention {r.version} in {r.source} but another version "
                                        f"in the capture")
                t = {name: evals[r.source].table(name) for name in ("summary", "decode_summary")}
                e = versions.evaluate_measures(t)
                measures.append(e[e["path"] == r.path])
        evaluate = pd.concat(measures, ignore_index=True) if measures else versions.evaluate_measures(
            {"summary": pd.DataFrame(columns=["path", "context", "ppl_delta_pct", "ci_low_pct", "ci_high_pct",
                                              "kl_mean"]),
             "decode_summary": pd.DataFrame(columns=["path", "prompt_length", "kl_mean", "prefill_kl", "ratio"])})
        ev = next(iter(evals.values()))

        speeds, bench_facts = [], {}
        for p in bench:
            records, card = read_bench(Path(p))
            if card != device:
                raise AnalysisError(f"{Path(p).name} was measured on {card}, the runs on {device}")
            meta = json.loads(Path(p).read_text())
            speeds.append(versions.throughput_ratios(records).assign(source=Path(p).name))
            bench_facts = {"models": [m["name"] for m in meta.get("models", [])], "repeats": meta["config"]["repeats"],
                           "decode_steps": meta["config"]["decode_steps"]}
        speed = pd.concat(speeds, ignore_index=True) if speeds else pd.DataFrame(
            columns=["path", "phase", "context", "tokens_per_s", "ratio", "source"])
        twice = speed.drop_duplicates(["path", "source"])["path"].duplicated()
        if twice.any():
            raise AnalysisError(f"paths measured compiled in more than one throughput file: "
                                f"{set(speed['path'][twice])}")
        speed = speed[speed["path"].isin(compiled["path"])]

        fids = []
        for p in fidelity:
            report = json.loads(Path(p).read_text())
            if report.get("machine", {}).get("device_name") != device:
                raise AnalysisError(f"{Path(p).name} ran on {report.get('machine', {}).get('device_name')}, the runs "
                                    f"on {device}")
            fids.append(versions.fidelity_worst(report).assign(source=Path(p).name))
        fid = pd.concat(fids, ignore_index=True)
        fid = fid[fid["path"].isin(compiled["path"])]

        cap = next(iter(caps.values()))
        same_prompts = all(
            np.array_equal(cap.prompt_tokens(i), other.prompt_tokens(i))
            for other in caps.values() for i in cap.prompts()["index"])
        facts = {"versions": {n: r.environment.get("sageattention") for n, r in caps.items()},
                 "prompts": cap.config["prompts"], "lengths": cap.config["lengths"], "decode": cap.config["decode"],
                 "n_layers": cap.model["n_layers"], "windows": ev.config["windows"],
                 "decode_windows": ev.config["decode_windows"], "decode_steps": ev.config["decode_steps"],
                 "same_prompts": same_prompts, "bench": bench_facts,
                 "inputs": [Path(p).name for p in [*captures, *evaluates, *bench, *fidelity]]}
        layers.attrs.update(model=model, device=device)
        return Comparison(model, device, compiled.reset_index(drop=True), layers, versions.layer_classes(layers),
                          evaluate, speed.reset_index(drop=True), fid.reset_index(drop=True), agreement, facts)
    finally:
        for run in {**caps, **evals}.values():
            run.close()


# -- the Markdown ---------------------------------------------------------------------------------------

def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _kl(v: float) -> str:
    return f"{v:.2e}"


def _times(v: float) -> str:
    return f"{v:.0f}×" if v >= 10 else f"{v:.2f}×"


def _pct(v: float) -> str:
    return f"{v:+.2f}%".replace("-", "−")


def main_table(c: Comparison) -> pd.DataFrame:
    """One row per compiled path, cells formatted."""
    ev = c.evaluate
    contexts = sorted(ev.loc[ev["name"] == "ppl_delta_pct", "key"].unique())
    plens = sorted(ev.loc[ev["name"] == "decode_kl", "key"].unique())
    plens = [plens[0], plens[-1]] if plens else []
    top = {ph: int(c.speed.loc[c.speed["phase"] == ph, "context"].max()) if (c.speed["phase"] == ph).any() else None
           for ph in ("prefill", "decode")}
    rows = []
    for p in c.paths.itertuples():
        row = {"path": p.path, "SageAttention": p.version, "kernel that ran": f"`{p.function}` (compiled)"}
        for phase in ("prefill", "decode"):
            cl = c.classes[(c.classes["path"] == p.path) & (c.classes["phase"] == phase)].set_index("cls")["value"]
            row[f"attn_out rel-L2, isolated {phase} (early / middle / late)"] = " / ".join(
                f"{cl[k]:.4f}" for k in versions.LAYER_CLASSES)
        m = ev[ev["path"] == p.path]
        for ctx in contexts:
            r = m[(m["name"] == "ppl_delta_pct") & (m["key"] == ctx)]
            row[f"Δppl @{ctx}"] = (f"{_pct(r['value'].iloc[0])} [{_pct(r['low'].iloc[0])[:-1]}, "
                                   f"{_pct(r['high'].iloc[0])[:-1]}]") if len(r) else NOT_MEASURED
        kl = m[m["name"] == "prefill_kl"].set_index("key")["value"]
        row[f"prefill KL @{' / '.join(map(str, contexts))}"] = " / ".join(
            _kl(kl[ctx]) if ctx in kl else NOT_MEASURED for ctx in contexts)
        for n in plens:
            r = m[(m["name"] == "decode_kl") & (m["key"] == n)]
            row[f"decode KL after {n}-token prompts (× prefill)"] = (
                f"{_kl(r['value'].iloc[0])} ({_times(r['high'].iloc[0])})" if len(r) else NOT_MEASURED)
        for phase, what in (("prefill", "prefill tok/s ÷ fp16 @{}"), ("decode", "decode tok/s ÷ fp16 @{} KV")):
            ctx = top[phase]
            col = what.format(_k(ctx) if ctx else "longest")
            r = c.speed[(c.speed["path"] == p.path) & (c.speed["phase"] == phase) & (c.speed["context"] == ctx)]
            row[col] = f"{r['ratio'].iloc[0]:.2f}" if len(r) else NOT_MEASURED
        f = c.fidelity[c.fidelity["path"] == p.path]
        row["emulator worst ratio (case)"] = (
            f"{f['worst_ratio'].iloc[0]:.2%} ({f['phase'].iloc[0]} {f['length'].iloc[0]}, layer {f['layer'].iloc[0]})"
            if len(f) else NOT_MEASURED)
        rows.append(row)
    return pd.DataFrame(rows)


def agreement_table(c: Comparison) -> pd.DataFrame:
    rows = []
    for (path, ci, ei), g in c.agreement.groupby(["path", "compiled_in", "emulated_in"], sort=False):
        row = {"path": path, "compiled in the run with": c.facts["versions"][ci],
               "emulated in the run with": c.facts["versions"][ei]}
        for r in g.itertuples():
            row[f"{r.phase}: compiled / emulated (ratio)"] = f"{r.compiled:.4f} / {r.emulated:.4f} ({r.ratio:.3f})"
        rows.append(row)
    order = list(SAGE_PATHS)
    return pd.DataFrame(rows).sort_values("path", key=lambda s: s.map(order.index), ignore_index=True)


def markdown(c: Comparison) -> str:
    f = c.facts
    thirds = versions.layer_thirds(f["n_layers"])
    third_words = ", ".join(f"{k} = layers {v[0]}–{v[-1]}" for k, v in thirds.items())
    vs = sorted(set(c.paths["version"]))
    fids = c.fidelity.drop_duplicates("source")
    bench = f["bench"]
    speed_note = (f"tokens/s ÷ fp16: `python -m driftscope.bench` on {', '.join(bench['models'])} (random weights, "
                  f"batch 1, median of {bench['repeats']} repeats; decode: {bench['decode_steps']} steps after a "
                  f"prefilled context), each path over the fp16 SDPA measured in the same file; \"{NOT_MEASURED}\" "
                  f"where no throughput file has the path's compiled kernel." if bench else
                  f"tokens/s ÷ fp16: \"{NOT_MEASURED}\": no throughput file was given.")
    lines = [
        f"# SageAttention {' vs '.join(vs)} on {c.model}: compiled kernels on one {c.device}",
        "",
        markdown_table(main_table(c)),
        "",
        f"- attn_out rel-L2: ‖path − fp16‖ / ‖fp16‖ of the attention output over all heads, isolated mode (every "
        f"path gets the fp16 run's q, k, v), the mean over {f['prompts']} prompts of "
        f"{', '.join(map(str, f['lengths']))} tokens (decode: and over {f['decode']} steps), then the median over the "
        f"layers of each third of the {f['n_layers']}: {third_words}.",
        f"- Δppl: perplexity change vs fp16 SDPA with its paired-bootstrap 95% interval, over {f['windows']} windows "
        f"per context; prefill KL: KL(fp16 ‖ path) per token over the same windows; decode KL: teacher-forced, "
        f"{f['decode_steps']} steps after prompts of the given length ({f['decode_windows']} windows), in brackets "
        f"its ratio to the prefill KL of the same prompts.",
        f"- {speed_note}",
        f"- emulator worst ratio: the largest rel-L2(driftscope's emulator, compiled kernel) / rel-L2(kernel, fp32 "
        f"SDPA) over layers, phases and lengths on the model's own q, k, v (`experiments/model_fidelity.py`; "
        f"target ≤ {fids['target'].iloc[0]:.0%}, goal ≤ {fids['goal'].iloc[0]:.0%})." if len(fids) else
        "- emulator worst ratio: no model-fidelity file was given.",
        "",
        "## The emulators at model scale",
        "",
        "The same path compiled in one capture and emulated by driftscope in the other family's process:",
        "",
        markdown_table(agreement_table(c)),
        "",
        f"- The median over the {f['n_layers']} layers of the per-layer attn_out rel-L2 vs fp16 (isolated, as above); "
        f"ratio = emulated / compiled. The two captures ran "
        f"{'token-identical prompts' if f['same_prompts'] else 'DIFFERENT prompts'} on the same card.",
        "",
        f"Made by `python experiments/sage_versions.py` from {', '.join(f['inputs'])}.",
        "",
    ]
    return "\n".join(lines)


def figure(c: Comparison, save_to) -> None:
    decode = c.evaluate[c.evaluate["name"] == "decode_kl"].rename(
        columns={"key": "prompt_length", "value": "kl", "low": "prefill_kl"})
    labels = {r.path: f"{r.path} ({r.version})" for r in c.paths.itertuples()}
    models = c.facts["bench"].get("models") if c.facts["bench"] else None
    detail = ("(a) capture run, mean over prompts and decode steps; (b) evaluate run; "
              + (f"(c) {', '.join(models)}, random weights" if models else ""))
    plots.sage_versions(c.layers, decode, c.speed if c.facts["bench"] else None, save_to=save_to, labels=labels,
                        detail=detail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captures", nargs="+", type=Path, default=CAPTURES, help="capture runs, one per family")
    ap.add_argument("--evaluates", nargs="+", type=Path, default=EVALUATES, help="evaluate runs, one per family")
    ap.add_argument("--bench", nargs="*", type=Path, default=None,
                    help="throughput JSON files (default: the committed H200 ones that exist)")
    ap.add_argument("--fidelity", nargs="+", type=Path, default=FIDELITY, help="model_fidelity.py JSON files")
    ap.add_argument("--out-md", type=Path, default=RESULTS / "sage_versions.md")
    ap.add_argument("--out-fig", type=Path, default=ROOT / "figures" / "sage_versions",
                    help="figure path without extension (writes .png and .pdf)")
    args = ap.parse_args(argv)
    bench = args.bench
    if bench is None:
        bench = [p for p in BENCH if p.is_file()]
        for p in BENCH:
            if not p.is_file():
                print(f"note: {p.relative_to(ROOT)} does not exist (yet): its paths' throughput is \"{NOT_MEASURED}\"")
    for p in [*args.captures, *args.evaluates, *bench, *args.fidelity]:
        if not p.is_file():
            ap.error(f"{p} does not exist")
    try:
        c = load(args.captures, args.evaluates, bench, args.fidelity)
    except AnalysisError as e:
        ap.error(str(e))
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(c), encoding="utf-8")
    figure(c, args.out_fig)
    print(f"wrote {args.out_md} and {args.out_fig}.png/.pdf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
