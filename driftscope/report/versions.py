"""SageAttention families side by side: each compiled sage path's drift, cost and emulator fidelity, from results files.

SageAttention 1.0.6 and 2.x share the import name ``sageattention``, so one process compiles one family: a comparison
reads one set of result files per family (the other family's paths ran emulated there) and takes each path's numbers
from the file where its compiled kernel ran, which the files record:

- capture runs: ``environment["sage_impl"]`` (path -> "kernel" | "emulate" | "interpret" | "sdpa") and
  ``environment["sageattention"]`` (the installed version); the metrics give isolated attention-output drift;
- evaluate runs: the same two records; the ``summary`` and ``decode_summary`` tables (``driftscope.run.evaluate``);
- throughput JSON (``python -m driftscope.bench``): records with ``sage_impl`` per path, fp16 measured in the same file;
- model-fidelity JSON (``experiments/model_fidelity.py``): ``summary[path]["worst_ratio"]``, ``kernel_impl``.

    layers = attn_out_by_layer(run.metrics(mode="isolated", site="attn_out", metric="rel_l2", head_index=-1))
    classes = layer_classes(layers)            # median over the early / middle / late third of the layers

Every function is a pure transform of what those files hold; ``experiments/sage_versions.py`` reads the files and
writes the Markdown table and the figure.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from driftscope.report.tables import AnalysisError, bench_table

LAYER_CLASSES = ("early", "middle", "late")
KERNEL = "kernel"


# -- which path ran compiled where -------------------------------------------------------------------

def compiled_paths(sources: dict[str, dict]) -> pd.DataFrame:
    """One row per path that ran its compiled kernel in one of ``sources`` (name -> environment record of a run):
    columns path, version (the installed sageattention), source (the name). A path compiled in two sources
    raises AnalysisError: which one to report would be a guess."""
    rows = []
    for name, env in sources.items():
        impls = env.get("sage_impl") or {}
        rows += [{"path": p, "version": str(env.get("sageattention")), "source": name}
                 for p, impl in impls.items() if impl == KERNEL]
    out = pd.DataFrame(rows, columns=["path", "version", "source"])
    twice = out[out["path"].duplicated(keep=False)]
    if len(twice):
        raise AnalysisError(f"paths compiled in more than one file: "
                            f"{twice.groupby('path')['source'].agg(list).to_dict()}")
    return out


# -- attention-output drift by layer -------------------------------------------------------------------

def attn_out_by_layer(metrics: pd.DataFrame) -> pd.DataFrame:
    """Isolated attention-output rel-L2 over all heads (head_index -1) per (path, phase, layer), the mean over prompts
    and decode steps; columns path, phase, layer, value. ``metrics`` is a capture's metrics DataFrame."""
    d = metrics[(metrics["mode"] == "isolated") & (metrics["site"] == "attn_out") & (metrics["metric"] == "rel_l2")
                & (metrics["head_index"] == -1)]
    if d.empty:
        raise AnalysisError("this capture holds no isolated attn_out rel_l2 rows: capture with --mode isolated or both")
    return d.groupby(["path", "phase", "layer"], observed=True, sort=True)["value"].mean().reset_index()


def layer_thirds(n_layers: int) -> dict[str, np.ndarray]:
    """The layers of each class: the first, middle and last third (np.array_split's split of range(n_layers))."""
    return dict(zip(LAYER_CLASSES, np.array_split(np.arange(n_layers), len(LAYER_CLASSES))))


def layer_classes(layers: pd.DataFrame) -> pd.DataFrame:
    """Per (path, phase), the median over the layers of each third (``layer_thirds``) of ``attn_out_by_layer``'s
    values; columns path, phase, cls, value."""
    thirds = layer_thirds(int(layers["layer"].max()) + 1)
    cls = pd.Series({int(layer): c for c, ls in thirds.items() for layer in ls})
    d = layers.assign(cls=pd.Categorical(layers["layer"].map(cls), categories=LAYER_CLASSES, ordered=True))
    return d.groupby(["path", "phase", "cls"], observed=True, sort=True)["value"].median().reset_index()


def emulator_agreement(captures: dict[str, tuple[pd.DataFrame, dict]]) -> pd.DataFrame:
    """The same path compiled in one capture and emulated in another (same model, prompts and card): the median over
    layers of each side's isolated attn_out rel-L2 vs the reference, per phase. ``captures`` maps a name to
    (``attn_out_by_layer`` table, environment record). Columns path, phase, compiled_in, emulated_in, compiled,
    emulated, ratio (emulated / compiled)."""
    rows = []
    for name_k, (layers_k, env_k) in captures.items():
        for path, impl in (env_k.get("sage_impl") or {}).items():
            if impl != KERNEL:
                continue
            for name_e, (layers_e, env_e) in captures.items():
                if (env_e.get("sage_impl") or {}).get(path) != "emulate":
                    continue
                for phase in ("prefill", "decode"):
                    k = layers_k[(layers_k["path"] == path) & (layers_k["phase"] == phase)]["value"]
                    e = layers_e[(layers_e["path"] == path) & (layers_e["phase"] == phase)]["value"]
                    if len(k) and len(e):
                        rows.append({"path": path, "phase": phase, "compiled_in": name_k, "emulated_in": name_e,
                                     "compiled": float(k.median()), "emulated": float(e.median())})
    out = pd.DataFrame(rows, columns=["path", "phase", "compiled_in", "emulated_in", "compiled", "emulated"])
    return out.assign(ratio=out["emulated"] / out["compiled"])


# -- evaluate -----------------------------------------------------------------------------------------------

def evaluate_measures(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """An evaluate run's headline numbers per path, long form: columns path, name, key, value, low, high.

    name "ppl_delta_pct" (key: context; low/high: the paired-bootstrap 95% interval, percent), "prefill_kl" (key:
    context), "decode_kl" (key: prompt length; low: the prefill KL of the same prompts, high: decode over it)."""
    s, d = tables.get("summary"), tables.get("decode_summary")
    if s is None or d is None:
        raise AnalysisError(f"an evaluate run with summary and decode_summary tables is needed; it holds "
                            f"{sorted(tables)}")
    rows = [pd.DataFrame({"path": s["path"], "name": "ppl_delta_pct", "key": s["context"], "value": s["ppl_delta_pct"],
                          "low": s["ci_low_pct"], "high": s["ci_high_pct"]}),
            pd.DataFrame({"path": s["path"], "name": "prefill_kl", "key": s["context"], "value": s["kl_mean"],
                          "low": np.nan, "high": np.nan}),
            pd.DataFrame({"path": d["path"], "name": "decode_kl", "key": d["prompt_length"], "value": d["kl_mean"],
                          "low": d["prefill_kl"], "high": d["ratio"]})]
    out = pd.concat(rows, ignore_index=True)
    return out.astype({"path": str, "key": np.int64, "value": float, "low": float, "high": float})


# -- throughput and fidelity files -------------------------------------------------------------------------

def throughput_ratios(records: list[dict]) -> pd.DataFrame:
    """Tokens/s of each path that ran its compiled kernel over fp16's, per phase and context, from one benchmark
    file's records (fp16 measured in the same file); columns path, phase, context, tokens_per_s, ratio."""
    kept = [r for r in records if r.get("path") == "fp16" or r.get("sage_impl") == KERNEL]
    t = bench_table(kept)
    base = t[t["path"] == "fp16"].set_index(["phase", "context"])["tokens_per_s"]
    t = t[t["path"] != "fp16"]
    ratio = t["tokens_per_s"].to_numpy() / base.reindex(pd.MultiIndex.from_frame(t[["phase", "context"]])).to_numpy()
    return t.assign(ratio=ratio)[["path", "phase", "context", "tokens_per_s", "ratio"]].reset_index(drop=True)


def fidelity_worst(report: dict) -> pd.DataFrame:
    """One row per path of a model-fidelity report whose compiled kernel ran: path, worst_ratio (the largest
    rel-L2(emulator, kernel) / rel-L2(kernel, fp32) over its cases), phase, length, layer (that case), cases,
    target, goal."""
    if report.get("kernel_impl") != KERNEL:
        return pd.DataFrame(columns=["path", "worst_ratio", "phase", "length", "layer", "cases", "target", "goal"])
    rows = [{"path": p, "worst_ratio": float(s["worst_ratio"]), **s["worst_case"], "cases": int(s["cases"]),
             "target": report.get("target"), "goal": report.get("goal")}
            for p, s in (report.get("summary") or {}).items()]
    return pd.DataFrame(rows, columns=["path", "worst_ratio", "phase", "length", "layer", "cases", "target", "goal"])
