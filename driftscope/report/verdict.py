"""The verdict of an evaluate run: what turning 8-bit attention on costs, per compared path (DESIGN §4b).

Pure functions of an evaluate run's stored tables (``driftscope.run.evaluate``: summary, decode_summary,
generation_summary, nonfinite), so ``python -m driftscope.evaluate`` (which stores the rows as the ``verdict`` table),
a notebook or a report can rebuild it from a run file:

    rows = verdict_rows({name: run.table(name) for name in run.tables()})
    print(format_verdict(rows))

Each block shows Δppl in percent with its paired bootstrap 95% interval, the prefill KL(base ‖ path) per context,
the teacher-forced decode KL per prompt length (with its ratio to the prefill KL of the same prompts), the
generations' NLL ratio under the baseline (the path's continuations' mean NLL per token over the baseline's own; 1 =
as likely) and the non-finite logit counts. Then plain flags, raised at these thresholds:

- decode kernel: decode KL >= DECODE_RATIO_FLAG (10) x the prefill KL of the same prompts *and* >= DECODE_KL_FLAG
  (0.01 nats per token): the decode kernel, not quantization noise (which the prefill shows at the same size);
  from DECODE_RATIO_NOTE (3) x up, a note says the decode drift is above the prefill's;
- garbage generations: generation NLL ratio >= GENERATION_RATIO_FLAG (1.5) for a prompt group of at least
  MIN_PROMPTS (4) prompts: the path writes text the baseline finds far less likely than its own (on fewer prompts, a
  note); below the ratio, diverging generations are noted as harmless flips;
- perplexity: |Δppl| >= PPL_FLAG_PCT (1%) with an interval that excludes 0, over at least MIN_WINDOWS windows (a note
  on fewer);
- non-finite: any NaN or ±inf logit on the path's side;
and a warning where the Δppl interval rests on fewer than MIN_WINDOWS (10) windows.

Verdict rows: path, kind ("measure" | "flag" | "note" | "warning" | "ok"), name, key (the context, prompt length or
prompt group, as text; "" where none), value (float), text (the measure's fragment, or the whole sentence).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

DECODE_RATIO_FLAG = 10.0  # decode KL over the prefill KL of the same prompts ...
DECODE_KL_FLAG = 0.01  # ... and at least this KL (nats per token): the decode kernel, not quantization noise
DECODE_RATIO_NOTE = 3.0  # from here to the flag, a note: decode drift above the prefill's
GENERATION_RATIO_FLAG = 1.5  # the path's continuations' NLL under the baseline over the baseline's own
PPL_FLAG_PCT = 1.0  # |Δppl| in percent, with an interval that excludes 0
MIN_WINDOWS = 10  # fewer windows under a bootstrap interval: a warning
MIN_PROMPTS = 4  # fewer prompts in a generation group: a high NLL ratio is a note, not a flag

THRESHOLDS_HELP = (f"flags: decode KL >= {DECODE_RATIO_FLAG:g}x the prefill KL of the same prompts and >= "
                   f"{DECODE_KL_FLAG:g} nats (the decode kernel); generation NLL ratio under the baseline >= "
                   f"{GENERATION_RATIO_FLAG:g} over >= {MIN_PROMPTS} prompts (garbage, not harmless flips); |Δppl| >= {PPL_FLAG_PCT:g}% with an "
                   f"interval excluding 0; any non-finite logit; a warning below {MIN_WINDOWS} windows per interval")

LABELS = {"ppl_delta_pct": "Δppl", "prefill_kl": "prefill KL", "decode_kl": "decode KL",
          "generation_nll_ratio": "generation NLL ratio", "nonfinite": "non-finite logits"}
COLUMNS = ("path", "kind", "name", "key", "value", "text")


def _group_words(group: str) -> str:
    if group.startswith("corpus-"):
        return f"{group.removeprefix('corpus-')}-token corpus prompts"
    return {"chat": "chat prompts", "file": "the prompts file", "all": "all prompts"}.get(group, f"{group} prompts")


def _kl(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


def _times(v: float) -> str:
    return f"{v:.0f}×" if v >= 10 else f"{v:.1f}×"


def _rows_for(path: str, t: dict[str, pd.DataFrame]) -> list[dict]:
    rows: list[dict] = []

    def add(kind, name, key, value, text):
        rows.append({"path": path, "kind": kind, "name": name, "key": str(key),
                     "value": float(value) if value is not None else math.nan, "text": text})

    flagged = False
    s = _pick(t.get("summary"), path)
    for r in s.itertuples(index=False):
        pct, lo, hi = _pct(r)
        add("measure", "ppl_delta_pct", r.context, pct,
            f"{pct:+.2f}% [{lo:+.2f}%, {hi:+.2f}%] at {r.context} tokens ({r.windows} windows)")
    for r in s.itertuples(index=False):
        add("measure", "prefill_kl", r.context, r.kl_mean,
            f"{_kl(r.kl_mean)} at {r.context} tokens (top-1 {r.top1_agree:.1%})")
    d = _pick(t.get("decode_summary"), path)
    for r in d.itertuples(index=False):
        ratio = f", {_times(r.ratio)} its prefill" if np.isfinite(r.ratio) else ""
        add("measure", "decode_kl", r.prompt_length, r.kl_mean,
            f"{_kl(r.kl_mean)} after {r.prompt_length} tokens (top-1 {r.top1:.0%}{ratio})")
    g = _pick(t.get("generation_summary"), path)
    for r in g.itertuples(index=False):
        if r.group == "all" and len(g) > 1:
            continue
        add("measure", "generation_nll_ratio", r.group, r.nll_ratio,
            f"{r.nll_ratio:.2f} ({r.group}: exact match {r.exact_match_rate:.0%} of {r.prompts})")
    bad = t.get("nonfinite")
    counts = None
    if bad is not None and len(bad):
        counts = bad.groupby("side")["nonfinite"].sum()
        n_path, n_base = int(counts.get(path, 0)), int(counts.get("base", 0))
        add("measure", "nonfinite", "", n_path, f"{n_path} on the {path} side, {n_base} on the baseline's")

    for r in d.itertuples(index=False):
        if r.kl_mean >= DECODE_KL_FLAG and (not np.isfinite(r.ratio) or r.ratio >= DECODE_RATIO_FLAG):
            flagged = True
            times = f"{_times(r.ratio)} " if np.isfinite(r.ratio) else "far above "
            add("flag", "decode_kernel", r.prompt_length, r.ratio,
                f"decode drift after {r.prompt_length}-token prompts is {times}the prefill drift of the same prompts "
                f"(KL {_kl(r.kl_mean)} vs {_kl(r.prefill_kl)}, top-1 {r.top1:.0%}): the decode kernel, not "
                f"quantization noise")
        elif r.kl_mean >= DECODE_KL_FLAG and np.isfinite(r.ratio) and r.ratio >= DECODE_RATIO_NOTE:
            add("note", "decode_above_prefill", r.prompt_length, r.ratio,
                f"decode drift after {r.prompt_length}-token prompts is {_times(r.ratio)} the prefill drift of the "
                f"same prompts (KL {_kl(r.kl_mean)} vs {_kl(r.prefill_kl)}): above quantization noise, below the "
                f"{DECODE_RATIO_FLAG:g}× flag")
    for r in g.itertuples(index=False):
        if r.group == "all" and len(g) > 1:
            continue
        if np.isfinite(r.nll_ratio) and r.nll_ratio >= GENERATION_RATIO_FLAG:
            sentence = (f"generations from {_group_words(r.group)} are {r.nll_ratio:.1f}× less likely under the "
                        f"baseline than its own ({r.nll_path_cont:.2f} vs {r.nll_base_cont:.2f} nats per token)")
            if r.prompts >= MIN_PROMPTS:
                flagged = True
                add("flag", "generation_garbage", r.group, r.nll_ratio, sentence + ": garbage, not harmless flips")
            else:  # one confident answer that words itself differently can double the ratio
                add("note", "generation_garbage", r.group, r.nll_ratio,
                    sentence + f", on {r.prompts} prompt{'s' if r.prompts > 1 else ''} only: no flag")
        elif r.exact_match_rate < 1:
            add("note", "harmless_flips", r.group, r.nll_ratio,
                f"generations from {_group_words(r.group)} diverge (exact match {r.exact_match_rate:.0%}) but stay "
                f"about as likely under the baseline (NLL ratio {r.nll_ratio:.2f}): harmless flips")
    for r in s.itertuples(index=False):
        pct, lo, hi = _pct(r)
        if abs(pct) >= PPL_FLAG_PCT and (lo > 0 or hi < 0):
            moves = (f"perplexity {'rises' if pct > 0 else 'falls'} by {abs(pct):.2f}% at {r.context} tokens "
                     f"(interval [{lo:+.2f}%, {hi:+.2f}%]")
            if r.windows >= MIN_WINDOWS:
                flagged = True
                add("flag", "perplexity", r.context, pct, moves + ")")
            else:
                add("note", "perplexity", r.context, pct, moves + f", on {r.windows} windows only: no flag)")
    if counts is not None and int(counts.get(path, 0)) > 0:
        flagged = True
        add("flag", "nonfinite", "", int(counts[path]),
            f"{int(counts[path])} non-finite logit values on the {path} side (baseline: {int(counts.get('base', 0))})")
    few = s[s["windows"] < MIN_WINDOWS] if len(s) else s
    if len(few):
        contexts = ", ".join(str(c) for c in few["context"])
        add("warning", "few_windows", contexts, few["windows"].min(),
            f"the Δppl interval at {contexts} tokens rests on {few['windows'].min()} windows (fewer than "
            f"{MIN_WINDOWS}): pass --windows {MIN_WINDOWS} or more before trusting it")
    if not flagged and rows:
        add("ok", "no_flag", "", None, f"no flag raised: no decode drift >= {DECODE_RATIO_FLAG:g}× its prefill's, no "
            f"generation NLL ratio >= {GENERATION_RATIO_FLAG:g}, no |Δppl| >= {PPL_FLAG_PCT:g}%, no non-finite logit")
    return rows


def _pick(df: pd.DataFrame | None, path: str) -> pd.DataFrame:
    if df is None or "path" not in df or not len(df):
        return pd.DataFrame()
    return df[df["path"] == path]


def _pct(r) -> tuple[float, float, float]:
    if hasattr(r, "ppl_delta_pct"):
        return r.ppl_delta_pct, r.ci_low_pct, r.ci_high_pct
    return 100 * r.ppl_delta / r.ppl_base, 100 * r.ci_low / r.ppl_base, 100 * r.ci_high / r.ppl_base


def compared(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The compared paths of an evaluate run, in the order they were compared."""
    found: list[str] = []
    for name in ("summary", "decode_summary", "generation_summary"):
        df = tables.get(name)
        if df is not None and "path" in df:
            found += [str(p) for p in df["path"]]
    return list(dict.fromkeys(found))


def verdict_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The verdict rows (see the module docstring) of every compared path, from an evaluate run's tables."""
    rows = [r for path in compared(tables) for r in _rows_for(path, tables)]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def format_verdict(rows: pd.DataFrame, baseline: str = "the baseline", impls: dict | None = None) -> str:
    """One block per compared path: its measures, one line each, then its flags, notes and warnings. `impls` (the
    run's environment["sage_impl"]) names how each sage path ran."""
    blocks = []
    for path, v in rows.groupby("path", sort=False):
        how = f" ({impls[path]})" if impls and path in impls else ""
        lines = [f"Verdict: {path}{how} vs {baseline} (KL(base ‖ {path}) in nats per token)"]
        measures = v[v["kind"] == "measure"]
        width = max((len(LABELS.get(n, n)) for n in measures["name"]), default=0)
        for name, m in measures.groupby("name", sort=False):
            lines.append(f"  {LABELS.get(name, name):<{width}}  " + "; ".join(m["text"]))
        for kind, tag in (("flag", "FLAG"), ("note", "note"), ("warning", "warning"), ("ok", "ok")):
            lines += [f"  {tag}: {text}" for text in v.loc[v["kind"] == kind, "text"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
