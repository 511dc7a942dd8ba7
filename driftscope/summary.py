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
