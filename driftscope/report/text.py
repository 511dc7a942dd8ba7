"""Terminal and Markdown text made only from stored tables: a capture's per-layer worst-head summary, an evaluate
run's summary, teacher-forced decode, generations and verdict; ``markdown_table`` for any table of formatted cells."""
from __future__ import annotations

import textwrap

import pandas as pd

SUMMARY_COLUMNS = {  # stored column -> (printed header, format)
    "path": ("path", "{}"),
    "context": ("context", "{:d}"),
    "windows": ("windows", "{:d}"),
    "ppl_base": ("ppl base", "{:.4f}"),
    "ppl_path": ("ppl path", "{:.4f}"),
    "ppl_delta_pct": ("Δppl", "{:+.3f}%"),
    "ci": ("Δppl 95% CI", "[{:+.3f}%, {:+.3f}%]"),
    "kl_mean": ("KL mean", "{:.3e}"),
    "kl_max": ("KL max", "{:.3e}"),
    "top1_agree": ("top-1 agree", "{:.4f}"),
    "max_abs_dlogit": ("max |Δlogit|", "{:.4f}"),
}
DECODE_COLUMNS = {  # decode_summary column -> (printed header, format)
    "path": ("path", "{}"),
    "prompt_length": ("prompt", "{:d}"),
    "windows": ("windows", "{:d}"),
    "steps": ("steps", "{:d}"),
    "kl_mean": ("decode KL", "{:.3e}"),
    "kl_max": ("KL max", "{:.3e}"),
    "top1": ("top-1", "{:.3f}"),
    "nll_base": ("NLL base", "{:.3f}"),
    "nll_path": ("NLL path", "{:.3f}"),
    "prefill_kl": ("prefill KL", "{:.3e}"),
    "ratio": ("decode/prefill", "{:.1f}"),
}


def _table(df: pd.DataFrame, columns: dict) -> str:
    rows = []
    for r in df.itertuples(index=False):
        row = {}
        for col, (header, fmt) in columns.items():
            if col == "ci":
                values = (r.ci_low_pct, r.ci_high_pct)
            else:
                value = getattr(r, col)
                values = (int(value) if "d}" in fmt else str(value) if fmt == "{}" else float(value),)
            row[header] = fmt.format(*values)
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False)


def format_summary(summary: pd.DataFrame) -> str:
    """The per-(path, context) table: perplexity of both sides, the delta in percent with its 95% interval, and
    the prefill logit drift."""
    return _table(summary, SUMMARY_COLUMNS)


def format_decode(decode_summary: pd.DataFrame) -> str:
    """The per-(path, prompt length) table of teacher-forced decode: KL(base ‖ path), top-1, the baseline tokens'
    NLL on each side, and the prefill KL of the same prompts."""
    return _table(decode_summary, DECODE_COLUMNS)


def _flat(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎ ")


def format_generations(gen: pd.DataFrame, gen_summary: pd.DataFrame | None = None, width: int = 48) -> str:
    """Each path's greedy continuation beside the baseline's, with where they first diverge and how likely the
    baseline finds each (mean NLL per token; the ratio tells garbage from a harmless flip)."""
    lines = []
    if gen_summary is not None and len(gen_summary):
        for s in gen_summary.itertuples(index=False):
            lines.append(f"{s.path}, {s.group}: exact match {s.exact_match_rate:.0%} of {int(s.prompts)} prompts; "
                         f"mean tokens before the first divergence {s.mean_first_divergence:.1f} of "
                         f"{int(s.new_tokens)}; NLL under the baseline {s.nll_path_cont:.2f} vs its own "
                         f"{s.nll_base_cont:.2f} (ratio {s.nll_ratio:.2f})")
    for g in gen.itertuples(index=False):
        verdict = ("identical" if g.exact_match else f"diverges after {g.first_divergence} tokens; NLL under the "
                   f"baseline {g.nll_path_cont:.2f} vs {g.nll_base_cont:.2f} (ratio {g.nll_ratio:.2f})")
        lines.append(f"\nprompt {g.prompt} ({g.source}, {g.prompt_tokens} tokens, ends "
                     f"…{_flat(g.prompt_text)[-40:]!r}), {g.path}: {verdict}")
        left = textwrap.wrap(_flat(g.base_text), width) or [""]
        right = textwrap.wrap(_flat(g.path_text), width) or [""]
        lines.append(f"  {'base':<{width}} | {g.path}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"  {a:<{width}} | {b}")
    return "\n".join(lines)


def format_evaluation(tables: dict[str, pd.DataFrame], dtype: str = "", compared: dict | None = None,
                      impls: dict | None = None) -> str:
    """What `python -m driftscope.evaluate` prints, from the run file's tables: perplexity and prefill logits,
    teacher-forced decode, generations, then the verdict (stored in the `verdict` table, else rebuilt). `compared`
    and `impls` are the run's environment["compared"] and ["sage_impl"]."""
    from driftscope.report import verdict

    base = f"the SDPA baseline{f' ({dtype})' if dtype else ''}"
    how = f" [{compared.get('flag')}: {compared.get('by')}]" if compared else ""
    parts = [f"Compared with {base}{how}. KL(base ‖ path) in nats per token; Δppl = path − base.",
             "\nPerplexity and prefill logits, per context:", format_summary(tables["summary"])]
    if "decode_summary" in tables:
        parts += ["\nTeacher-forced decode (the baseline's greedy continuation fed to every side), per prompt length:",
                  format_decode(tables["decode_summary"])]
    if "generations" in tables:
        parts += ["\nGreedy generations:", format_generations(tables["generations"], tables.get("generation_summary"))]
    rows = tables["verdict"] if "verdict" in tables else verdict.verdict_rows(tables)
    parts += ["", verdict.format_verdict(rows, base, impls)]
    return "\n".join(parts)


def layer_summary(df: pd.DataFrame, site: str = "attn_out") -> pd.DataFrame:
    """Per layer, the worst head's cosine (min) and rel-L2 (max) for each mode, phase and path.

    Rows: layer. Columns: (mode, phase, path, metric). Decode values are the worst over all steps.
    """
    d = df[(df["site"] == site) & (df["head_index"] >= 0) & (df["metric"].isin(["cosine", "rel_l2"]))]
    if d.empty:
        return pd.DataFrame()
    worst = d.groupby(["layer", "mode", "phase", "path", "metric"], observed=True)["value"].agg(["min", "max"])
    worst = worst["min"].where(worst.index.get_level_values("metric") == "cosine", worst["max"])
    table = worst.unstack(["mode", "phase", "path", "metric"])
    return table.sort_index(axis=1)


def format_layer_summary(table: pd.DataFrame) -> str:
    """`layer_summary` for a terminal: one block per compared path (rows: layer; columns: mode, phase, cos and
    relL2), so that the width does not grow with the number of paths (about 90 columns for both modes)."""
    if table.empty:
        return "(no attention-output drift rows in this run)"
    blocks = []
    for path in dict.fromkeys(table.columns.get_level_values("path")):
        sub = table.xs(path, axis=1, level="path")
        sub = sub.rename(columns={"cosine": "cos", "rel_l2": "relL2"}, level="metric")
        sub.columns.names = [None] * sub.columns.nlevels
        sub.index.name = "layer"
        blocks.append(f"{path}:\n" + sub.to_string(float_format=lambda v: f"{v:.6f}"))
    return "\n\n".join(blocks)


def markdown_layer_summary(table: pd.DataFrame, path: str) -> str:
    """One path's columns of `layer_summary` as a Markdown table: worst-head cos / rel-L2 per mode and phase."""
    sub = table.xs(path, axis=1, level="path")
    groups = list(dict.fromkeys((m, p) for m, p, _ in sub.columns))
    head = "| layer | " + " | ".join(f"{m} {p}: cos / rel-L2" for m, p in groups) + " |"
    lines = [head, "|" + " ---: |" * (len(groups) + 1)]
    for layer, row in sub.iterrows():
        cells = [f"{row[(m, p, 'cosine')]:.5f} / {row[(m, p, 'rel_l2')]:.4f}" for m, p in groups]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(df: pd.DataFrame, align: dict[str, str] | None = None) -> str:
    """A DataFrame of already formatted cells as a GitHub Markdown table (pandas' to_markdown needs tabulate, which
    driftscope does not depend on). ``align`` maps a column to "left" or "right" (default: left for text columns,
    right for numeric ones); a "|" inside a cell is escaped."""
    align = align or {}

    def side(c) -> str:
        return align.get(c, "right" if pd.api.types.is_numeric_dtype(df[c]) else "left")

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join(" ---: " if side(c) == "right" else " --- " for c in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _ranges(values) -> str:
    """Sorted integers as runs: [0, 1, 2, 3, 7] -> "0-3, 7"."""
    runs: list[list[int]] = []
    for v in sorted({int(v) for v in values}):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def nonfinite_warnings(metrics: pd.DataFrame) -> list[str]:
    """One line per (path, phase) of a capture whose attention outputs held NaN or ±inf (metric "nonfinite", one row
    per layer, path and phase); none when all were finite."""
    bad = metrics[(metrics["metric"] == "nonfinite") & (metrics["value"] > 0)]
    return [f"warning: {path} returned {int(g['value'].sum())} non-finite attention outputs ({phase}, "
            f"layer{'s' if g['layer'].nunique() > 1 else ''} {_ranges(g['layer'])})"
            for (path, phase), g in bad.groupby(["path", "phase"], observed=True)]


def evaluate_nonfinite_warnings(nonfinite: pd.DataFrame) -> list[str]:
    """One line per (side, stage) of an evaluate run whose logits held NaN or ±inf (its `nonfinite` table)."""
    bad = nonfinite[nonfinite["nonfinite"] > 0]
    return [f"warning: {side} returned {int(g['nonfinite'].sum())} non-finite logits ({stage}, "
            f"{g['prompt'].nunique()} prompt{'s' if g['prompt'].nunique() > 1 else ''})"
            for (side, stage), g in bad.groupby(["side", "stage"], observed=True)]
