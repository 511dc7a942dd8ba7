"""Terminal and Markdown text made only from stored tables: a capture's per-layer worst-head summary, an evaluate
run's summary and generations."""
from __future__ import annotations

import textwrap

import pandas as pd

SUMMARY_COLUMNS = {  # stored column -> (printed header, format)
    "context": ("context", "{:d}"),
    "windows": ("windows", "{:d}"),
    "ppl_base": ("ppl base", "{:.4f}"),
    "ppl_quant": ("ppl {quant}", "{:.4f}"),
    "ppl_delta": ("Δppl", "{:+.4f}"),
    "ci": ("Δppl 95% CI", "[{:+.4f}, {:+.4f}]"),
    "kl_mean": ("KL mean", "{:.3e}"),
    "kl_max": ("KL max", "{:.3e}"),
    "top1_agree": ("top-1 agree", "{:.4f}"),
    "max_abs_dlogit": ("max |Δlogit|", "{:.4f}"),
}


def format_summary(summary: pd.DataFrame, quant: str = "8bit") -> str:
    """The per-context table: perplexity of both sides, the delta and its CI, and logit drift."""
    rows = []
    for r in summary.itertuples(index=False):
        row = {}
        for col, (header, fmt) in SUMMARY_COLUMNS.items():
            values = (r.ci_low, r.ci_high) if col == "ci" else (getattr(r, col),)
            values = tuple(int(v) if fmt == "{:d}" else float(v) for v in values)
            row[header.format(quant=quant)] = fmt.format(*values)
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False)


def _flat(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎ ")


def format_generations(gen: pd.DataFrame, gen_summary: pd.DataFrame | None = None, quant: str = "8bit",
                       width: int = 48) -> str:
    """Each greedy continuation of the base and quant sides side by side, with where they first diverge."""
    lines = []
    if gen_summary is not None and len(gen_summary):
        s = gen_summary.iloc[0]
        lines.append(f"exact match {s.exact_match_rate:.2%} of {int(s.prompts)} prompts; mean tokens before the "
                     f"first divergence {s.mean_first_divergence:.2f} of {int(s.new_tokens)}")
    for g in gen.itertuples(index=False):
        verdict = "identical" if g.exact_match else f"diverges after {g.first_divergence} of {g.new_tokens} tokens"
        lines.append(f"\nprompt {g.prompt} ({g.source}, {g.prompt_tokens} tokens, ends "
                     f"…{_flat(g.prompt_text)[-40:]!r}): {verdict}")
        left = textwrap.wrap(_flat(g.base_text), width) or [""]
        right = textwrap.wrap(_flat(g.quant_text), width) or [""]
        lines.append(f"  {'base':<{width}} | {quant}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"  {a:<{width}} | {b}")
    return "\n".join(lines)


def layer_summary(df: pd.DataFrame, site: str = "attn_out") -> pd.DataFrame:
    """Per layer, the worst head's cosine (min) and rel-L2 (max) for each mode, phase and path.

    Rows: layer. Columns: (mode, phase, path, metric). Decode values are the worst over all steps.
    """
    d = df[(df["site"] == site) & (df["head"] >= 0) & (df["metric"].isin(["cosine", "rel_l2"]))]
    if d.empty:
        return pd.DataFrame()
    worst = d.groupby(["layer", "mode", "phase", "path", "metric"], observed=True)["value"].agg(["min", "max"])
    worst = worst["min"].where(worst.index.get_level_values("metric") == "cosine", worst["max"])
    table = worst.unstack(["mode", "phase", "path", "metric"])
    return table.sort_index(axis=1)


def format_layer_summary(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no attention-output drift rows in this run)"
    flat = table.copy()
    flat.columns = [" ".join(str(c) for c in col).replace("cosine", "cos").replace("rel_l2", "relL2")
                    for col in flat.columns]
    return flat.to_string(float_format=lambda v: f"{v:.6f}")


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
