"""Summary tables from a run's tidy metrics DataFrame."""
from __future__ import annotations

import pandas as pd


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


def main(argv=None) -> int:
    from . import cli, store

    p = cli.parser("driftscope summary", "Print the per-layer worst-head summary of a stored capture.",
                   "  python -m driftscope.summary runs/a.h5\n  python -m driftscope.summary runs/a.h5 --markdown sage8\n")
    p.add_argument("run", help="a capture run file")
    p.add_argument("--markdown", metavar="PATH", help="print one path's columns as a Markdown table")
    args = p.parse_args(argv)
    with store.open_run(args.run) as run:
        table = layer_summary(run.metrics(site="attn_out"))
    print(markdown_layer_summary(table, args.markdown) if args.markdown else format_layer_summary(table))
    return 0


if __name__ == "__main__":
    import sys

    from .cli import run as _run

    sys.exit(_run("driftscope summary", main))
