"""Every figure, table and paper number, regenerated from stored run files (the library behind `driftscope.figures`).

For each run file NAME.h5 (kind capture) it writes, under --out:
    NAME/<figure>.png and .pdf        the figures (driftscope.report.plots), see FIGURES
    data/NAME/<figure>.csv            each figure's data (driftscope.report.tables): a reproducible digest; PNG bytes
                                      differ across matplotlib versions, these CSVs do not
A capture with decode steps also gives NAME/decode_kv (decode-step attention drift against kv_len mod 64). An
evaluate run file gives NAME/perplexity and, with teacher-forced decode, NAME/decode; a benchmark JSON (a list of records, or {"records": [...]}, each with
path, context, phase, tokens_per_s, peak_memory_gib) gives NAME/throughput. With --tables DIR it also writes
the paper's LaTeX fragments there (numbers.tex: \\newcommand macros of the first capture run; runs.tex,
smoothing.tex, commands.tex). Figures whose inputs a run lacks are skipped with a note.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from driftscope import environment, store
from driftscope.errors import DriftscopeError, OutputExistsError
from driftscope.report import latex, plots, tables, text

CAPTURE_FIGURES = ("heatmap", "depth", "position", "smoothing", "k_profile", "massive", "decode_kv")
QUICK_FIGURES = ("heatmap", "depth", "smoothing")
CSV_FLOAT = "%.6g"


class FiguresError(DriftscopeError):
    pass


# -- one run's figures ---------------------------------------------------------------------------------

def run_name(path: Path) -> str:
    """A file-system and LaTeX-safe name for a run: its file stem, other characters replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", Path(path).stem) or "run"


def capture_figure(name: str, df: pd.DataFrame, save_to, run=None):
    """(data, figure) of one capture figure. ``run`` (an open run) lets k_profile use stored K tensors."""
    if name == "heatmap":
        mode = tables.available_mode(df, "attn_out")
        return tables.head_drift(df, mode=mode), plots.drift_heatmap(df, save_to, mode=mode)
    if name == "depth":
        return tables.depth_drift(df), plots.drift_through_depth(df, save_to)
    if name == "position":
        return tables.position_summary(df), plots.drift_vs_position(df, save_to)
    if name == "smoothing":
        return tables.smoothing_table(df), plots.smoothing_effect(df, save_to)
    if name == "massive":
        return tables.massive_activations(df), plots.massive_activations(df, save_to)
    if name == "k_profile":
        layer, head = tables.worst_k_head(df)
        k, prompt = stored_k(run, df, layer, head) if run is not None else (None, None)
        prof = tables.k_channel_profile(df, layer, head, k, prompt=prompt)
        return prof, plots.k_channel_profile(prof, save_to, layer=layer, kv_head=head, title_df=df)
    if name == "decode_kv":
        data = capture_decode_table(df)
        return data, plots.decode_drift_vs_kv(data, save_to)
    raise FiguresError(f"unknown figure {name!r}; expected one of {', '.join(CAPTURE_FIGURES)}")


def stored_k(run, df: pd.DataFrame, layer: int, kv_head: int):
    """The reference's stored prefill K [tokens, head_dim] of one KV head (first prompt of the longest length),
    and that prompt's index, or (None, None) when the run did not store it (`capture --store k`) in full."""
    if "k" not in (run.config.get("store") or []):
        return None, None
    heads = run.config.get("heads")
    tokens = run.config.get("tokens")
    if tokens is not None or heads is not None:
        return None, None  # a token slice or a head subset would not smooth as the kernel does
    length = tables.longest(df)
    prompt = int(df.loc[df["length"] == length, "prompt"].min())
    ref = tables.reference(df)
    mode = str(df.loc[df["metric"] == "channel_bias", "mode"].iloc[0])
    try:
        k_HxTxD = run.activations(prompt=prompt, layer=layer, path=ref, site="k", mode=mode)
    except store.NotStoredError:
        return None, None
    return k_HxTxD[kv_head], prompt


def metrics_with_meta(run) -> pd.DataFrame:
    """The run's metrics with df.attrs naming the model, device and reference (the figures' titles use them)."""
    df = run.metrics()
    env = run.environment or {}
    impl = env.get("sage_impl") or {}
    sage = sorted({v for k, v in impl.items() if k.startswith("sage")})
    device = env.get("device_name") or env.get("device") or ""
    df.attrs.update(model=run.model.get("name", ""), reference=(run.config.get("paths") or [""])[0],
                    device=f"{device}{' (' + '/'.join(sage) + ')' if sage else ''}")
    return df


def write_csv(data: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(path, index=False, float_format=CSV_FLOAT, lineterminator="\n")
    return path


def capture_figures(run, out: Path, name: str, figures: Sequence[str] = CAPTURE_FIGURES, log=print,
                    df: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every capture figure of one run into out/NAME/ and its data into out/data/NAME/; returns the data."""
    df = metrics_with_meta(run) if df is None else df
    if df.empty:
        raise FiguresError(f"{run.path} holds no metrics rows (no prompt finished); nothing to plot")
    data = {}
    for fig in figures:
        try:
            data[fig], _ = capture_figure(fig, df, out / name / fig, run)
        except tables.AnalysisError as e:
            log(f"  skipped {name}/{fig}: {e}")
            continue
        write_csv(data[fig], out / "data" / name / f"{fig}.csv")
        log(f"  {out / name / fig}.png/.pdf")
    return data


def figure_dir(run_file) -> Path:
    """Where a capture writes its quick figures: beside the run file, in a folder named like it without its
    extension (runs/NAME.h5 -> runs/NAME/), or NAME-figures/ for a run file named without an extension."""
    run_file = Path(run_file)
    return run_file.with_suffix("") if run_file.suffix else run_file.with_name(f"{run_file.name}-figures")


def quick_figure_files(prefix) -> list[Path]:
    """Every file quick_figures may write into the folder ``prefix``."""
    return [Path(prefix) / f"{fig}{ext}" for fig in QUICK_FIGURES for ext in (".png", ".pdf")]


def check_quick_figures(prefix, overwrite: bool = False) -> list[Path]:
    """That quick_figures can write into ``prefix`` without replacing figures (unless ``overwrite``); writes
    nothing. Returns the directories it will create."""
    made = environment.check_output_dir(prefix, what=f"the figures in {prefix}/")
    existing = [p.name for p in quick_figure_files(prefix) if os.path.lexists(p)]
    if existing and not overwrite:
        raise OutputExistsError(f"{prefix}/ already holds figures ({', '.join(existing[:3])}"
                                f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them, "
                                f"--no-figures to skip them, or choose another --out")
    return made


def quick_figures(df: pd.DataFrame, prefix) -> list[Path]:
    """The capture-time subset (heatmap, drift through depth, smoothing-K when present) into the folder
    ``prefix`` (``figure_dir(run file)``, e.g. runs/NAME/ beside runs/NAME.h5). Returns the PNG paths written;
    never raises on a figure the run cannot make."""
    prefix = Path(prefix)
    if not df.attrs.get("model") and prefix.with_suffix(".h5").is_file():
        try:
            with store.open_run(prefix.with_suffix(".h5")) as run:
                df = df.copy()
                df.attrs.update(metrics_with_meta(run).attrs)
        except (store.RunFileError, OSError):
            pass
    written = []
    for fig in QUICK_FIGURES:
        try:
            capture_figure(fig, df, prefix / fig)
        except tables.AnalysisError:
            continue
        except OSError as e:
            raise FiguresError(f"writing {prefix / fig}.png failed ({e.strerror or e}); free space or choose "
                               f"another --out") from None
        written.append(prefix / f"{fig}.png")
    return written


# -- evaluate and bench --------------------------------------------------------------------------------

def capture_decode_table(df: pd.DataFrame) -> pd.DataFrame:
    """The data of ``plots.decode_drift_vs_kv`` from a capture's metrics: per (path, mode, length, step), the decode
    step's attn_out rel-L2 over all heads (the mean over heads where a run has only per-head rows), mean over layers
    and prompts; kv_len = length + step (the keys the step attends to, its own included)."""
    head = "head_index" if "head_index" in df else "head"
    d = df[(df["phase"] == "decode") & (df["site"] == "attn_out") & (df["metric"] == "rel_l2")]
    if d.empty:
        raise tables.AnalysisError("no decode-step attn_out rel_l2 rows in this run (capture with --decode N)")
    d = d[d[head] == -1] if (d[head] == -1).any() else d[d[head] >= 0]
    keys = ["path", "mode", "length", "step"]
    layer = d.groupby([*keys, "prompt", "layer"], observed=True)["value"].mean().reset_index()
    out = layer.groupby(keys, observed=True)["value"].mean().reset_index()
    out["kv_len"] = out["length"] + out["step"]
    out = out[[*keys, "kv_len", "value"]]
    out.attrs.update(df.attrs)
    return out


def decode_table(decode: pd.DataFrame, prefill: pd.DataFrame) -> pd.DataFrame:
    """The data of ``plots.decode_kl`` from an evaluate run's ``decode`` and ``decode_prefill`` tables: per (path,
    prompt_length, kv_len), the mean KL over windows, beside the prefill KL of the same prompts."""
    keys = ["path", "prompt_length", "kv_len"]
    out = decode.groupby(keys, observed=True)["kl"].mean().reset_index()
    ref = prefill.groupby(["path", "prompt_length"], observed=True)["kl_mean"].mean().rename("prefill_kl")
    return out.merge(ref.reset_index(), on=["path", "prompt_length"], how="left")


def evaluation_data(stored: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``plots.perplexity_logits``' data from an evaluate run's tables: runs with a ``path`` column in their summary
    (one row per compared path and context) are brought to the long shape here, older runs by
    ``tables.evaluation_long``."""
    s = stored.get("summary")
    if s is None or "path" not in s:
        return tables.evaluation_long(stored)
    base = s.drop_duplicates("context")
    parts = [pd.DataFrame({"path": "base", "context": base["context"], "metric": "perplexity",
                           "value": base["ppl_base"]}),
             pd.DataFrame({"path": s["path"], "context": s["context"], "metric": "perplexity", "value": s["ppl_path"]})]
    for m in ("kl_mean", "top1_agree", "max_abs_dlogit"):
        parts.append(pd.DataFrame({"path": s["path"], "context": s["context"], "metric": m, "value": s[m]}))
    data = tables.evaluation_long({"long": pd.concat(parts, ignore_index=True)})
    data.attrs["reference"] = "base"
    return data


def evaluate_figure(run, out: Path, name: str, log=print) -> dict[str, pd.DataFrame]:
    """An evaluate run's figures: perplexity and logit drift against context, and (runs with teacher-forced
    decode) the decode KL against prompt length and kv_len mod 64. Returns {figure: data}."""
    stored = {t: run.table(t) for t in run.tables() if t in ("summary", "perplexity", "logits", "decode",
                                                             "decode_prefill")}
    meta = dict(model=run.model.get("name", ""), device=(run.environment or {}).get("device_name", ""))
    results = {}
    try:
        data = evaluation_data(stored)
    except tables.AnalysisError as e:
        log(f"  skipped {name}/perplexity: {e}")
    else:
        data.attrs.update(meta)
        plots.perplexity_logits(data, out / name / "perplexity", reference=data.attrs.get("reference"))
        write_csv(data, out / "data" / name / "perplexity.csv")
        log(f"  {out / name / 'perplexity'}.png/.pdf")
        results["perplexity"] = data
    if "decode" in stored and "decode_prefill" in stored:
        data = decode_table(stored["decode"], stored["decode_prefill"])
        data.attrs.update(meta)
        plots.decode_kl(data, out / name / "decode")
        write_csv(data, out / "data" / name / "decode.csv")
        log(f"  {out / name / 'decode'}.png/.pdf")
        results["decode"] = data
    return results


def read_bench(path: Path) -> tuple[list[dict], str | None]:
    """Benchmark records from a JSON file (a list of records or an object with a "records" list), and the
    card they were measured on where the file says (`machine.device_name`)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FiguresError(f"{path} is not a readable benchmark JSON file ({type(e).__name__})") from None
    records = obj.get("records") if isinstance(obj, dict) else obj
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise FiguresError(f"{path} holds no benchmark records: expected a list of objects or {{\"records\": [...]}}")
    machine = obj.get("machine") if isinstance(obj, dict) else None
    return records, machine.get("device_name") if isinstance(machine, dict) else None


def bench_figure(path: Path, out: Path, name: str, log=print) -> pd.DataFrame | None:
    records, card = read_bench(path)
    models = sorted({str(r["model"]) for r in records if "model" in r}) or [None]
    parts = []
    for model in models:  # one figure per benchmarked model
        stem = "throughput" if model is None else f"throughput-{model}"
        try:
            data = tables.bench_table([r for r in records if model is None or r.get("model") == model])
        except tables.AnalysisError as e:
            log(f"  skipped {name}/{stem}: {e}")
            continue
        data.attrs.update(model=model, device=card)
        plots.throughput_memory(data, out / name / stem)
        write_csv(data, out / "data" / name / f"{stem}.csv")
        log(f"  {out / name / stem}.png/.pdf")
        parts.append(data.assign(model=model))
    return pd.concat(parts, ignore_index=True) if parts else None


# -- everything ----------------------------------------------------------------------------------------

TABLE_FILES = ("numbers.tex", "runs.tex", "smoothing.tex", "commands.tex")  # what latex.write_all writes


def check_inputs(inputs: Sequence[Path]) -> list[str]:
    """Every input readable and plottable before anything is written: returns each one's kind."""
    kinds = []
    for path in inputs:
        if path.suffix.lower() == ".json":
            if not path.is_file():
                raise FiguresError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}; give a "
                                   f"benchmark JSON file written by driftscope.bench")
            read_bench(path)
            kinds.append("bench")
            continue
        with store.open_run(path) as run:
            kinds.append(run.kind)
            if run.kind == "capture" and not run.prompts()["complete"].any():
                raise FiguresError(f"{path} is a capture that finished no prompt (status {run.status}): nothing to "
                                   f"plot; continue it with python -m driftscope.capture --resume and its options")
    return kinds


def check_outputs(out: Path, names: Sequence[str], tables: Path | None, overwrite: bool) -> None:
    """The figure and table folders writable, and no earlier output replaced unless ``overwrite``."""
    environment.check_output_dir(out, what=f"figures into {out}/")
    if tables is not None:
        environment.check_output_dir(tables, what=f"tables into {tables}/")
    folders = [d for name in names for d in (out / name, out / "data" / name)]
    for d in [*folders, out / "data"]:
        if os.path.lexists(d) and not d.is_dir():
            raise FiguresError(f"cannot write figures into {d}/: it exists and is not a directory; choose another "
                               f"--out")
    if overwrite:
        return
    existing = [d for d in folders if d.is_dir() and any(d.iterdir())]
    existing += [tables / f for f in TABLE_FILES if tables is not None and os.path.lexists(tables / f)]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]}{'/ already holds figures' if existing[0].is_dir() else ' exists'}"
                                f"{more}; pass --overwrite to replace them, or choose another --out"
                                f"{' or --tables' if tables is not None else ''}")


def regenerate(inputs: Sequence[str | Path], out: str | Path = "figures", tables: str | Path | None = None,
               argv: list[str] | None = None, log=print, overwrite: bool = False) -> dict:
    """The library behind the CLI: every figure (and, with ``tables``, the paper's LaTeX fragments) from the
    given run files and benchmark JSON files. Returns {name: {figure: data}}.

    Every input is read and every output folder checked before anything is written; figures or tables already
    there are replaced only with ``overwrite``."""
    out = Path(out)
    tables = Path(tables) if tables is not None else None
    inputs = [Path(p) for p in inputs]
    names = [run_name(p) for p in inputs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FiguresError(f"several inputs are named {dup[0]!r} (figures go to out/<name>/); rename one of them")
    kinds = check_inputs(inputs)
    if tables is not None and "capture" not in kinds:
        raise FiguresError("--tables needs at least one capture run file (the paper's main run)")
    check_outputs(out, names, tables, overwrite)
    try:
        return _regenerate(inputs, names, out, tables, argv, log)
    except OSError as e:
        raise FiguresError(f"writing figures into {out} failed ({e.strerror or e}); free space or choose another "
                           f"--out") from None


def _regenerate(inputs: list[Path], names: list[str], out: Path, tables: Path | None, argv, log) -> dict:
    results: dict[str, dict] = {}
    captures = []
    for path, name in zip(inputs, names):
        log(f"{path}:")
        if path.suffix.lower() == ".json":
            data = bench_figure(path, out, name, log)
            results[name] = {"throughput": data} if data is not None else {}
            continue
        with store.open_run(path) as run:
            if run.kind == "capture":
                df = metrics_with_meta(run)
                results[name] = capture_figures(run, out, name, log=log, df=df)
                captures.append(_run_facts(run, name, df))
                bad = text.nonfinite_warnings(df)
            elif run.kind == "evaluate":
                results[name] = evaluate_figure(run, out, name, log)
                bad = (text.evaluate_nonfinite_warnings(run.table("nonfinite"))
                       if "nonfinite" in run.tables() else [])
            else:
                log(f"  skipped: a run file of kind {run.kind!r} has no figures")
                bad = []
        for line in bad:  # no figure shows them
            log(f"  {line}")
    if tables is not None:
        figures_argv = argv or ["python", "-m", "driftscope.figures", *map(str, inputs), "--out", str(out),
                                "--tables", str(tables)]
        written = latex.write_all(tables, out, captures, results, names, figures_argv)
        log(f"tables: {', '.join(str(w) for w in written)}")
    return results


def _run_facts(run, name: str, df: pd.DataFrame) -> dict:
    """What the LaTeX tables need from an open capture run besides its figures' data."""
    return {"name": name, "path": str(run.path), "argv": list(run.argv or []), "config": dict(run.config or {}),
            "environment": dict(run.environment or {}), "model": dict(run.model), "df": df}
