r"""The paper's generated LaTeX: number macros and table fragments, written by `python -m driftscope.figures
--tables DIR` so that no number in paper/driftscope.tex is typed by hand.

    numbers.tex    \newcommand macros of the first capture run given (the paper's main run), \newif switches
                   for what it holds, and \dsFigDir (the folder of its figures, relative to the paper)
    runs.tex       one booktabs row per capture run: model, device, implementation, drift headlines
    smoothing.tex  the smoothing-K table per layer of the main run
    commands.tex   the exact commands: each run's argv and this figures command (verbatim, shell-wrapped)

Every string that comes from a run file is escaped (or, in verbatim, defused) and reduced to ASCII: a run
file is data, never LaTeX.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from driftscope.report import tables

NA = r"\textit{n/a}"
ROLES = {"fp32": "Full", "fp16": "Half", "sage8": "Sage", "sage8-nosmooth": "NoSmooth"}
_ESC = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "%": r"\%",
        "_": r"\_", "^": r"\^{}", "~": r"\~{}"}


def escape(text) -> str:
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    return "".join(_ESC.get(c, c) for c in s)


def num(v, digits: int = 3) -> str:
    """A number for running text: 3 significant digits, powers of ten in math mode."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NA
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}".replace(",", "{,}")
    v = float(v)
    if v == 0:
        return "0"
    if 1e3 <= abs(v) < 1e6:
        return f"{round(v):,}".replace(",", "{,}")
    if 1e-2 <= abs(v) < 1e3:
        return f"{v:.{digits}g}"
    m, e = f"{v:.{digits - 1}e}".split("e")
    return f"${m}\\times 10^{{{int(e)}}}$"


def macro(name: str, value) -> str:
    assert re.fullmatch(r"[A-Za-z]+", name), name
    return f"\\newcommand{{\\{name}}}{{{value}}}\n"


def switch(name: str, on: bool) -> str:
    return f"\\newif\\if{name}\\{name}{'true' if on else 'false'}\n"


def _wrap_command(argv: list[str], width: int = 88) -> str:
    """A shell command wrapped with backslash continuations, safe inside verbatim."""
    words = [shlex.quote("".join(c if 32 <= ord(c) < 127 else "?" for c in str(a))) for a in argv]
    lines, line = [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line + " \\")
            line = "    " + w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    return "\n".join(lines).replace("\\end{verbatim}", "\\end {verbatim}")


# -- the numbers -----------------------------------------------------------------------------------------

def drift_numbers(df: pd.DataFrame) -> dict[str, str]:
    """Per compared path (by role: Full fp32, Half fp16, Sage sage8, NoSmooth sage8-nosmooth): the attention
    output's per-head rel-L2 (isolated prefill: median, max and where; decode median), the residual's rel-L2
    after the last layer (propagated, prefill and decode) and the logits' rel-L2 and 1 - cosine."""
    out = {}
    mode = tables.available_mode(df, "attn_out")
    length = tables.longest(df)
    d = df[df["length"] == length]
    for path, role in ROLES.items():
        p = d[d["path"] == path]
        heads = p[(p["site"] == "attn_out") & (p["mode"] == mode) & (p["metric"] == "rel_l2") & (p["head_index"] >= 0)]
        pre = heads[heads["phase"] == "prefill"].groupby(["layer", "head_index"])["value"].mean()
        dec = heads[heads["phase"] == "decode"].groupby(["layer", "head_index"])["value"].mean()
        out[f"ds{role}AttnMedian"] = num(pre.median()) if len(pre) else NA
        out[f"ds{role}AttnMax"] = num(pre.max()) if len(pre) else NA
        out[f"ds{role}AttnMaxLayer"] = num(int(pre.idxmax()[0])) if len(pre) else NA
        out[f"ds{role}AttnMaxHead"] = num(int(pre.idxmax()[1])) if len(pre) else NA
        out[f"ds{role}AttnDecodeMedian"] = num(dec.median()) if len(dec) else NA
        prop = p[(p["mode"] == "propagated") & (p["head_index"] == -1)]
        resid = prop[(prop["site"] == "resid") & (prop["metric"] == "rel_l2")]
        for phase, tag in (("prefill", ""), ("decode", "Decode")):
            r = resid[resid["phase"] == phase]
            last = r[r["layer"] == r["layer"].max()]["value"].mean() if len(r) else np.nan
            out[f"ds{role}ResidLast{tag}"] = num(last)
            lg = prop[(prop["site"] == "logits") & (prop["phase"] == phase)]
            out[f"ds{role}LogitsRelLtwo{tag}"] = num(lg[lg["metric"] == "rel_l2"]["value"].mean() if len(lg) else np.nan)
            cos = lg[lg["metric"] == "cosine"]["value"].mean() if len(lg) else np.nan
            out[f"ds{role}LogitsOneMinusCos{tag}"] = num(1 - cos if np.isfinite(cos) else np.nan)
    half, sage = (d[(d["path"] == p) & (d["site"] == "attn_out") & (d["mode"] == mode) & (d["phase"] == "prefill")
                    & (d["metric"] == "rel_l2") & (d["head_index"] >= 0)]["value"] for p in ("fp16", "sage8"))
    ratio = sage.median() / half.median() if len(half) and len(sage) and half.median() > 0 else np.nan
    out["dsSageOverHalf"] = num(ratio, 2)
    out["dsAttnMode"] = mode
    return out


def smoothing_numbers(df: pd.DataFrame) -> tuple[dict[str, str], bool, bool]:
    try:
        t = tables.smoothing_table(df)
    except tables.AnalysisError:
        return {}, False, False
    s = tables.smoothing_summary(t)
    m = {"dsSmoothPairs": num(s["pairs"]), "dsSmoothHelps": num(s["helps"]), "dsSmoothNeutral": num(s["neutral"]),
         "dsSmoothHurts": num(s["hurts"]), "dsBiasMedian": num(s["bias_median"], 2), "dsBiasMin": num(s["bias_min"], 2),
         "dsBiasMax": num(s["bias_max"], 2), "dsQKReductionMedian": num(s["qk_reduction_median"]),
         "dsQKReductionMin": num(s["qk_reduction_min"]), "dsQKReductionMax": num(s["qk_reduction_max"]),
         "dsKReductionMedian": num(s["k_reduction_median"]), "dsBiasSpearman": num(s["bias_vs_qk_reduction_spearman"], 2),
         "dsQKLeastLayer": num(s.get("least_layer")), "dsQKLeastHead": num(s.get("least_kv_head")),
         "dsQKMostLayer": num(s.get("most_layer")), "dsQKMostHead": num(s.get("most_kv_head")),
         "dsAttnReductionMedian": num(s["attn_reduction_median"]), "dsAttnSmoothHurts": num(s["attn_hurts"]),
         "dsAttnSmoothPairs": num(s["attn_pairs"])}
    return m, True, s["attn_pairs"] > 0


def massive_numbers(df: pd.DataFrame) -> dict[str, str]:
    try:
        mv = tables.massive_activations(df)
    except tables.AnalysisError:
        return {k: NA for k in ("dsMassiveValue", "dsMassiveLayer", "dsMassiveToken", "dsMassiveChannel",
                                "dsMassiveFirstLayer", "dsMassiveRatio")}
    top = mv[mv["rank"] == 0].set_index("layer")
    best = top["value"].idxmax()
    first = int(top.index[top["value"] >= 0.5 * top["value"].max()][0])
    kth = mv[mv["rank"] == mv["rank"].max()].set_index("layer")["value"]
    return {"dsMassiveValue": num(top.loc[best, "value"]), "dsMassiveLayer": num(int(best)),
            "dsMassiveToken": num(int(top.loc[best, "token"])), "dsMassiveChannel": num(int(top.loc[best, "channel"])),
            "dsMassiveFirstLayer": num(first), "dsMassiveRatio": num(top.loc[best, "value"] / kth.loc[best], 2)}


def run_numbers(facts: dict, fig_dir: str, figures: dict) -> str:
    """numbers.tex for one capture run."""
    df, cfg, env, model = facts["df"], facts["config"], facts["environment"], facts["model"]
    impl = env.get("sage_impl") or {}
    lengths = sorted(df["length"].unique())
    m = {
        "dsRunName": escape(facts["name"]), "dsModel": escape(model.get("name", "")),
        "dsModelSource": escape(model.get("source", "") or model.get("revision", "")),
        "dsModelDtype": escape(model.get("dtype", "")), "dsLayers": num(model.get("n_layers")),
        "dsHeads": num(model.get("n_heads")), "dsKVHeads": num(model.get("n_kv_heads")),
        "dsHeadDim": num(model.get("head_dim")),
        "dsDevice": escape(env.get("device_name") or env.get("device", "")),
        "dsSageImpl": escape(", ".join(f"{k}: {v}" for k, v in impl.items() if k.startswith("sage")) or "none"),
        "dsTorch": escape(env.get("torch", "")), "dsTransformers": escape(env.get("transformers", "")),
        "dsSageattention": escape(env.get("sageattention", "")), "dsTriton": escape(env.get("triton", "")),
        "dsReference": escape(tables.reference(df)),
        "dsPaths": escape(", ".join(cfg.get("paths") or [])),
        "dsCompared": escape(", ".join(tables.compared_paths(df))),
        "dsLengths": escape(", ".join(map(str, lengths))), "dsLongest": num(int(max(lengths))),
        "dsPrompts": num(int(df["prompt"].nunique())), "dsDecodeSteps": num(int(cfg.get("decode", 0))),
        "dsModes": escape(", ".join(sorted(df["mode"].unique()))),
        "dsFigDir": fig_dir,
    }
    m.update(drift_numbers(df))
    sm, have_smooth, have_attn = smoothing_numbers(df)
    m.update(sm)
    m.update(massive_numbers(df))
    kp = figures.get("k_profile")
    if kp is not None:
        layer, head = tables.worst_k_head(df)
        m.update(dsWorstKLayer=num(layer), dsWorstKHead=num(head))
    text = "% generated by python -m driftscope.figures: do not edit\n"
    text += "".join(macro(k, v) for k, v in m.items())
    for k in ("dsWorstKLayer", "dsWorstKHead"):
        if k not in m:
            text += macro(k, NA)
    if not have_smooth:
        text += "".join(macro(k, NA) for k in smoothing_numbers_keys())
    has_decode = (df["phase"] == "decode").any()
    text += switch("dsHaveSmoothing", have_smooth and "smoothing" in figures)
    text += switch("dsHaveSmoothAttn", have_attn)
    text += switch("dsHaveKSmoothed", kp is not None and (kp["statistic"] == "absmax smoothed").any())
    text += switch("dsHaveKProfile", kp is not None)
    text += switch("dsHaveDecode", bool(has_decode))
    text += switch("dsRefIsFull", tables.reference(df) == "fp32")
    text += switch("dsHaveHalf", "fp16" in tables.compared_paths(df))
    text += switch("dsHaveMassive", "massive" in figures)
    text += switch("dsHavePosition", "position" in figures)
    return text


def smoothing_numbers_keys() -> list[str]:
    return ["dsSmoothPairs", "dsSmoothHelps", "dsSmoothNeutral", "dsSmoothHurts", "dsBiasMedian", "dsBiasMin",
            "dsBiasMax", "dsQKReductionMedian", "dsQKReductionMin", "dsQKReductionMax", "dsKReductionMedian",
            "dsBiasSpearman", "dsQKLeastLayer", "dsQKLeastHead", "dsQKMostLayer", "dsQKMostHead",
            "dsAttnReductionMedian", "dsAttnSmoothHurts", "dsAttnSmoothPairs"]


# -- tables ----------------------------------------------------------------------------------------------

def runs_table(captures: list[dict]) -> str:
    """One row per capture run (the body of a booktabs tabular with 8 columns)."""
    rows = []
    for f in captures:
        df = f["df"]
        n = drift_numbers(df)
        env = f["environment"]
        impl = sorted({v for k, v in (env.get("sage_impl") or {}).items() if k.startswith("sage")})
        rows.append(" & ".join([
            r"\texttt{" + escape(f["name"]) + "}", escape(f["model"].get("name", "")),
            escape(env.get("device_name") or env.get("device", "")), escape("/".join(impl) or "none"),
            escape(tables.reference(df)), num(int(df["length"].max())),
            n["dsSageAttnMedian"], n["dsSageLogitsRelLtwo"]]) + r" \\")
    return "% generated by python -m driftscope.figures: do not edit\n" + "\n".join(rows) + "\n"


def smoothing_rows(df: pd.DataFrame) -> str:
    """Per layer of the main run: channel bias, QK error with / without smoothing, reduction, attention error
    of sage8 and sage8-nosmooth (the body of a booktabs tabular with 7 columns; mean over KV heads)."""
    try:
        t = tables.smoothing_table(df)
    except tables.AnalysisError:
        return "% no smoothing-K statistics in this run\n\\multicolumn{7}{c}{(not in this run)} \\\\\n"
    g = t.groupby("layer")[["channel_bias", "qk_err_smooth", "qk_err_nosmooth", "attn_err_smooth",
                            "attn_err_nosmooth"]].mean()
    g["reduction"] = g["qk_err_nosmooth"] / g["qk_err_smooth"]
    lines = []
    for layer, r in g.iterrows():
        cells = [str(layer), f"{r['channel_bias']:.2f}", f"{r['qk_err_smooth']:.4f}", f"{r['qk_err_nosmooth']:.4f}",
                 f"{r['reduction']:.2f}"]
        cells += [f"{r[c]:.4f}" if np.isfinite(r[c]) else NA for c in ("attn_err_smooth", "attn_err_nosmooth")]
        lines.append(" & ".join(cells) + r" \\")
    return "% generated by python -m driftscope.figures: do not edit\n" + "\n".join(lines) + "\n"


def commands(captures: list[dict], others: list[tuple[str, list[str]]], figures_argv: list[str]) -> str:
    parts = ["% generated by python -m driftscope.figures: do not edit\n"]
    for f in captures:
        parts.append(f"\\paragraph{{Run \\texttt{{{escape(f['name'])}}}}}\n\\begin{{verbatim}}\n"
                     f"{_wrap_command(f['argv'] or ['(argv not recorded)'])}\n\\end{{verbatim}}\n")
    for name, argv in others:
        parts.append(f"\\paragraph{{Run \\texttt{{{escape(name)}}}}}\n\\begin{{verbatim}}\n"
                     f"{_wrap_command(argv or ['(argv not recorded)'])}\n\\end{{verbatim}}\n")
    parts.append("\\paragraph{Every figure and table}\n\\begin{verbatim}\n"
                 f"{_wrap_command(figures_argv)}\n\\end{{verbatim}}\n")
    return "".join(parts)


def write_all(folder: Path, out: Path, captures: list[dict], results: dict, names: list[str],
              figures_argv: list[str]) -> list[Path]:
    """Writes numbers.tex, runs.tex, smoothing.tex and commands.tex into ``folder``."""
    from driftscope.errors import DriftscopeError

    if not captures:
        raise DriftscopeError("--tables needs at least one capture run file (the paper's main run)")
    folder.mkdir(parents=True, exist_ok=True)
    main = captures[0]
    paper_dir = folder.resolve().parent
    fig_dir = Path(os.path.relpath((out / main["name"]).resolve(), paper_dir)).as_posix()
    text = run_numbers(main, fig_dir, results.get(main["name"], {}))
    ppl = next((n for n in names if "perplexity" in results.get(n, {})), None)
    bench = next((n for n in names if "throughput" in results.get(n, {})), None)
    dec = next((n for n in names if "decode" in results.get(n, {})), None)  # an evaluate run's decode figure
    text += switch("dsHavePerplexity", ppl is not None)
    text += switch("dsHaveBench", bench is not None)
    text += switch("dsHaveDecodeKL", dec is not None)
    text += macro("dsDecodeRun", r"\texttt{" + escape(dec or "") + "}")
    bench_fig = "throughput"
    if bench is not None and "model" in results[bench]["throughput"]:  # one figure per benchmarked model
        model = results[bench]["throughput"]["model"].dropna()
        bench_fig = f"throughput-{model.iloc[0]}" if len(model) else bench_fig
    for key, name, fig in (("dsPerplexityFig", ppl, "perplexity"), ("dsBenchFig", bench, bench_fig),
                           ("dsDecodeFig", dec, "decode")):
        path = Path(os.path.relpath((out / name / fig).resolve(), paper_dir)).as_posix() if name else ""
        text += macro(key, path)
    text += macro("dsRunCount", num(len(captures)))
    text += macro("dsFiguresCommand", r"\texttt{" + escape(" ".join(figures_argv[:3])) + "}")
    written = []
    for fname, body in (("numbers.tex", text), ("runs.tex", runs_table(captures)),
                        ("smoothing.tex", smoothing_rows(main["df"])),
                        ("commands.tex", commands(captures, [], figures_argv))):
        p = folder / fname
        p.write_text(body, encoding="ascii")
        written.append(p)
    return written
