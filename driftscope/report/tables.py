"""The tables behind driftscope's figures: pure transforms of a run's tidy metrics DataFrame.

Every function takes the DataFrame of ``open_run(path).metrics()`` (columns prompt, length, mode, phase, step,
layer, head_index, site, path, metric, element, value; see ``records.py``) and returns a small, readable DataFrame.
``figures.py`` writes each of them as the CSV digest of its figure, so what a figure shows can be checked
without looking at pixels.

Conventions, the same in every function:
- the tables name their columns by what they hold: the metrics' ``head_index`` becomes ``head`` (a query head)
  or ``kv_head``, its ``element`` becomes ``position``, ``channel`` or ``rank``;
- values are the mean over prompts (and over decode steps for phase ``decode``);
- ``length=None`` means the longest prompt length in the run;
- the reference is the run's first path; it is named by ``df.attrs["reference"]`` when set, otherwise it is
  the path of the smoothing-K ``channel_bias`` rows (always the reference), otherwise the one path that has
  statistics but no drift rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from driftscope.errors import DriftscopeError

SAGE, NOSMOOTH = "sage8", "sage8-nosmooth"
DRIFT_METRICS = ("cosine", "rel_l2", "rel_l1", "rmse", "max_abs")


class AnalysisError(DriftscopeError, ValueError):
    """The DataFrame does not hold what a figure or table needs (names what is missing and what is there)."""


# -- what the run holds ------------------------------------------------------------------------------

def reference(df: pd.DataFrame) -> str:
    """The reference path (see the module docstring)."""
    if df.attrs.get("reference"):
        return str(df.attrs["reference"])
    bias = df.loc[df["metric"] == "channel_bias", "path"].unique()
    if len(bias):
        return str(bias[0])
    compared = set(df.loc[df["metric"].isin(DRIFT_METRICS), "path"].unique())
    others = [p for p in pd.unique(df["path"]) if p not in compared]
    if len(others) == 1:
        return str(others[0])
    raise AnalysisError("cannot tell the reference path of this DataFrame: set df.attrs['reference']")


def compared_paths(df: pd.DataFrame) -> list[str]:
    """The paths that have drift rows against the reference, in a stable order (fp32, fp16, sage8, ...)."""
    order = {"fp32": 0, "fp16": 1, SAGE: 2, NOSMOOTH: 3}
    found = df.loc[df["metric"].isin(DRIFT_METRICS), "path"].unique()
    return sorted(map(str, found), key=lambda p: (order.get(p, 9), p))


def longest(df: pd.DataFrame) -> int:
    if df.empty:
        raise AnalysisError("the metrics DataFrame is empty: the run finished no prompt")
    return int(df["length"].max())


def _pick(df: pd.DataFrame, length: int | None = None, **eq) -> pd.DataFrame:
    length = longest(df) if length is None else length
    m = df["length"] == length
    for col, want in eq.items():
        m &= df[col].isin(want) if isinstance(want, (list, tuple, set)) else df[col] == want
    return df[m]


def _need(d: pd.DataFrame, what: str, df: pd.DataFrame) -> pd.DataFrame:
    if d.empty:
        held = sorted(df.groupby(["mode", "site", "metric"]).size().index.map(lambda t: "/".join(t)))
        raise AnalysisError(f"this run holds no {what}; it holds (mode/site/metric) {', '.join(held[:40])}")
    return d


def _mean(d: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return d.groupby(by, observed=True, sort=True)["value"].mean().reset_index()


def available_mode(df: pd.DataFrame, site: str, preferred: str = "isolated") -> str:
    """``preferred`` if the run has drift rows at ``site`` in that mode, else the other mode."""
    modes = set(df.loc[(df["site"] == site) & df["metric"].isin(DRIFT_METRICS), "mode"].unique())
    if preferred in modes or not modes:
        return preferred
    return sorted(modes)[0]


# -- drift ---------------------------------------------------------------------------------------------

def head_drift(df: pd.DataFrame, metric: str = "rel_l2", mode: str = "isolated", phase: str = "prefill",
               site: str = "attn_out", length: int | None = None) -> pd.DataFrame:
    """Drift per (path, layer, head) of each compared path; columns path, layer, head, value."""
    d = _pick(df, length, mode=mode, phase=phase, site=site, metric=metric)
    d = _need(d[d["head_index"] >= 0], f"{mode} {phase} {site} {metric} per head", df)
    return _mean(d, ["path", "layer", "head_index"]).rename(columns={"head_index": "head"})


def depth_drift(df: pd.DataFrame, mode: str = "propagated", length: int | None = None) -> pd.DataFrame:
    """Residual-stream drift through depth, prefill and decode; columns path, phase, layer, metric, value.

    metric is ``one_minus_cosine`` (1 - cosine, so that small drifts show on a log axis) or ``rel_l2``. The
    logits' drift is included as layer = number of layers (one past the last decoder layer).
    """
    d = _pick(df, length, mode=mode, site=["resid", "logits"], head_index=-1, metric=["cosine", "rel_l2"])
    d = _need(d, f"{mode} resid drift", df).copy()
    n_layers = int(d.loc[d["site"] == "resid", "layer"].max()) + 1 if (d["site"] == "resid").any() else 0
    d.loc[d["site"] == "logits", "layer"] = n_layers
    cos = d["metric"] == "cosine"
    d.loc[cos, "value"] = 1.0 - d.loc[cos, "value"]
    d.loc[cos, "metric"] = "one_minus_cosine"
    return _mean(d, ["path", "phase", "layer", "metric"])


def position_drift(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """Relative L2 per token-position bin at the longest context; columns path, mode, site, layer, position,
    value. Prefill only (that is where whole sequences are compared)."""
    d = _pick(df, length, phase="prefill", metric="rel_l2_pos")
    d = _need(d, "per-position rel-L2 (rel_l2_pos)", df).rename(columns={"element": "position"})
    return _mean(d, ["path", "mode", "site", "layer", "position"])


def position_summary(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """What the position figure draws: per path and position bin, the attention output's rel-L2 (median and
    max over layers; isolated mode if captured) and the last layer's residual rel-L2 (propagated mode).
    Columns path, site, mode, layers ("median", "max" or "last"), layer (the last layer, or -1), position,
    value."""
    pos = position_drift(df, length)
    out = []
    mode = "isolated" if ((pos["site"] == "attn_out") & (pos["mode"] == "isolated")).any() else "propagated"
    a = pos[(pos["site"] == "attn_out") & (pos["mode"] == mode)]
    for stat in ("median", "max"):
        g = a.groupby(["path", "position"], observed=True)["value"].agg(stat).reset_index()
        out.append(g.assign(site="attn_out", mode=mode, layers=stat, layer=-1))
    r = pos[(pos["site"] == "resid") & (pos["mode"] == "propagated")]
    if not r.empty:
        last = int(r["layer"].max())
        out.append(r[r["layer"] == last][["path", "position", "value"]].assign(
            site="resid", mode="propagated", layers="last", layer=last))
    cols = ["path", "site", "mode", "layers", "layer", "position", "value"]
    return pd.concat(out, ignore_index=True)[cols].sort_values(cols[:6], ignore_index=True)


# -- smoothing-K -----------------------------------------------------------------------------------

def kv_group(df: pd.DataFrame) -> int:
    """Query heads per KV head, from the head counts the run holds (q/attn_out vs k)."""
    hq = df.loc[(df["site"] == "attn_out") & (df["head_index"] >= 0), "head_index"].max()
    hk = df.loc[(df["site"] == "k") & (df["head_index"] >= 0), "head_index"].max()
    if pd.isna(hq) or pd.isna(hk):
        return 1
    return max(1, (int(hq) + 1) // (int(hk) + 1))


def smoothing_table(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """The smoothing-K analysis per (layer, kv_head), one row each.

    Columns:
    - channel_bias: |mean_t K| / mean_t |K_t| (driftscope.measure.smoothing)
    - k_err_smooth, k_err_nosmooth: INT8 quantization error of K with and without smoothing
    - qk_err_smooth, qk_err_nosmooth: the error of the scores Q K^T, with and without smoothing
    - k_reduction, qk_reduction: nosmooth / smooth (> 1: smoothing lowers the error by that factor)
    - attn_err_smooth, attn_err_nosmooth, attn_reduction: isolated attention-output rel-L2 of sage8 and
      sage8-nosmooth, the mean over the query heads that share the KV head (NaN unless both paths were
      captured in isolated mode; propagated mode is used when only that was captured)
    - effect: "helps" (qk_reduction > 1.05), "hurts" (< 1/1.05) or "neutral"
    """
    d = _pick(df, length, site="k", phase="prefill", metric=["channel_bias", "k_quant_err", "qk_quant_err"])
    d = _need(d[d["head_index"] >= 0], "smoothing-K statistics (channel_bias, k_quant_err, qk_quant_err)", df)
    d = d.assign(column=np.where(d["metric"] == "channel_bias", "channel_bias",
                                 d["metric"].str.replace("_quant_err", "_err", regex=False)
                                 + np.where(d["path"] == NOSMOOTH, "_nosmooth", "_smooth")))
    t = d.groupby(["layer", "head_index", "column"], observed=True)["value"].mean().unstack("column")
    t.index = t.index.set_names(["layer", "kv_head"])
    for c in ("channel_bias", "k_err_smooth", "k_err_nosmooth", "qk_err_smooth", "qk_err_nosmooth"):
        if c not in t:
            t[c] = np.nan
    t["k_reduction"] = t["k_err_nosmooth"] / t["k_err_smooth"]
    t["qk_reduction"] = t["qk_err_nosmooth"] / t["qk_err_smooth"]
    attn = attn_out_by_variant(df, length, per_head=True)
    if attn is not None:
        attn = attn.assign(kv_head=attn["head"] // kv_group(df))
        a = attn.groupby(["layer", "kv_head", "path"], observed=True)["value"].mean().unstack("path")
        t = t.join(a.rename(columns={SAGE: "attn_err_smooth", NOSMOOTH: "attn_err_nosmooth"}))
    for c in ("attn_err_smooth", "attn_err_nosmooth"):
        if c not in t:
            t[c] = np.nan
    t["attn_reduction"] = t["attn_err_nosmooth"] / t["attn_err_smooth"]
    t["effect"] = np.select([t["qk_reduction"] > 1.05, t["qk_reduction"] < 1 / 1.05], ["helps", "hurts"], "neutral")
    cols = ["channel_bias", "k_err_smooth", "k_err_nosmooth", "k_reduction", "qk_err_smooth", "qk_err_nosmooth",
            "qk_reduction", "attn_err_smooth", "attn_err_nosmooth", "attn_reduction", "effect"]
    return t[cols].reset_index()


def attn_out_by_variant(df: pd.DataFrame, length: int | None = None, per_head: bool = False) -> pd.DataFrame | None:
    """Attention-output rel-L2 of sage8 and sage8-nosmooth (isolated if captured), per layer (head -1) or per
    head; columns path, layer, head, value. None unless both paths have attention-output drift rows."""
    mode = available_mode(df, "attn_out")
    d = _pick(df, length, mode=mode, phase="prefill", site="attn_out", metric="rel_l2", path=[SAGE, NOSMOOTH])
    d = d[d["head_index"] >= 0] if per_head else d[d["head_index"] == -1]
    if d.empty or d["path"].nunique() < 2:
        return None
    return _mean(d, ["path", "layer", "head_index"]).rename(columns={"head_index": "head"})


def smoothing_by_layer(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """Per layer, smoothed vs unsmoothed: QK^T quantization error (mean over KV heads) and the attention
    output's rel-L2 over all heads (NaN without both sage paths). Columns layer, quantity, variant, value,
    with quantity in {qk_quant_err, attn_out_rel_l2} and variant in {sage8, sage8-nosmooth}."""
    t = smoothing_table(df, length)
    qk = t.groupby("layer")[["qk_err_smooth", "qk_err_nosmooth"]].mean()
    rows = [pd.DataFrame({"layer": qk.index, "quantity": "qk_quant_err", "variant": v, "value": qk[c].to_numpy()})
            for v, c in ((SAGE, "qk_err_smooth"), (NOSMOOTH, "qk_err_nosmooth"))]
    attn = attn_out_by_variant(df, length)
    if attn is not None:
        rows.append(pd.DataFrame({"layer": attn["layer"], "quantity": "attn_out_rel_l2", "variant": attn["path"],
                                  "value": attn["value"]}))
    return pd.concat(rows, ignore_index=True).sort_values(["quantity", "variant", "layer"], ignore_index=True)


def smoothing_summary(table: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of a ``smoothing_table``: where smoothing helps, where it does not, and by how much."""
    r = table["qk_reduction"].dropna()
    out = {
        "pairs": len(table),
        "bias_median": float(table["channel_bias"].median()),
        "bias_min": float(table["channel_bias"].min()),
        "bias_max": float(table["channel_bias"].max()),
        "qk_reduction_median": float(r.median()) if len(r) else np.nan,
        "qk_reduction_min": float(r.min()) if len(r) else np.nan,
        "qk_reduction_max": float(r.max()) if len(r) else np.nan,
        "k_reduction_median": float(table["k_reduction"].median()),
        "helps": int((table["effect"] == "helps").sum()),
        "neutral": int((table["effect"] == "neutral").sum()),
        "hurts": int((table["effect"] == "hurts").sum()),
        "bias_vs_qk_reduction_spearman": float(table["channel_bias"].corr(table["qk_reduction"], method="spearman"))
        if len(r) > 2 else np.nan,
    }
    if len(r):
        lo = table.loc[r.idxmin()]
        hi = table.loc[r.idxmax()]
        out.update(least_layer=int(lo["layer"]), least_kv_head=int(lo["kv_head"]),
                   most_layer=int(hi["layer"]), most_kv_head=int(hi["kv_head"]))
    a = table["attn_reduction"].dropna()
    out["attn_reduction_median"] = float(a.median()) if len(a) else np.nan
    out["attn_hurts"] = int((a < 1).sum())
    out["attn_pairs"] = len(a)
    return out


# -- outliers ----------------------------------------------------------------------------------------

def worst_k_head(df: pd.DataFrame, length: int | None = None) -> tuple[int, int]:
    """The (layer, kv_head) whose unsmoothed K has the largest INT8 error of Q K^T: where K's outliers hurt
    the 8-bit path most. Without smoothing-K statistics, the largest K channel max/median ratio."""
    try:
        t = smoothing_table(df, length).dropna(subset=["qk_err_nosmooth"])
    except AnalysisError:
        t = pd.DataFrame()
    if not t.empty:
        row = t.loc[t["qk_err_nosmooth"].idxmax()]
        return int(row["layer"]), int(row["kv_head"])
    d = _pick(df, length, site="k", metric="channel_max_median", phase="prefill", path=reference(df))
    d = _need(d[d["head_index"] >= 0], "K outlier statistics", df)
    row = _mean(d, ["layer", "head_index"]).sort_values("value").iloc[-1]
    return int(row["layer"]), int(row["head_index"])


def k_channel_profile(df: pd.DataFrame, layer: int, kv_head: int, k_TxD: np.ndarray | None = None,
                      length: int | None = None, prompt: int | None = None) -> pd.DataFrame:
    """K's per-channel profile at (layer, kv_head); columns statistic, channel, value.

    - ``absmax``: max over tokens of |K[:, c]| of the reference path (stored statistic ``absmax_channel``);
    - ``absmax smoothed``: max_t |K[t, c] - mean_t K[:, c]|, K as sage8 quantizes it (stored statistic
      ``absmax_channel_smoothed`` when the run has it, else computed from ``k_TxD``);
    - ``|mean|``: |mean_t K[:, c]|, what smoothing removes (only with ``k_TxD``).
    ``k_TxD`` is the stored K of that head, [tokens, head_dim], of prompt ``prompt``; with it, every statistic
    comes from that prompt, otherwise they are means over the prompts of the longest length.
    """
    d = _pick(df, length, site="k", phase="prefill", path=reference(df), layer=layer, head_index=kv_head,
              metric=["absmax_channel", "absmax_channel_smoothed"])
    if prompt is not None:
        d = d[d["prompt"] == prompt]
    _need(d[d["metric"] == "absmax_channel"], f"K absmax_channel profile for layer {layer}, KV head {kv_head}", df)
    names = {"absmax_channel": "absmax", "absmax_channel_smoothed": "absmax smoothed"}
    prof = _mean(d, ["metric", "element"]).rename(columns={"element": "channel"})
    prof["statistic"] = prof["metric"].map(names)
    parts = [prof]
    if k_TxD is not None:
        k = np.asarray(k_TxD, dtype=np.float32)
        mu = k.mean(0)
        ch = np.arange(k.shape[1])
        if not (prof["statistic"] == "absmax smoothed").any():
            parts.append(pd.DataFrame({"channel": ch, "value": np.abs(k - mu).max(0), "statistic": "absmax smoothed"}))
        parts.append(pd.DataFrame({"channel": ch, "value": np.abs(mu), "statistic": "|mean|"}))
    out = pd.concat(parts, ignore_index=True)[["statistic", "channel", "value"]]
    out["value"] = out["value"].astype(np.float64)
    out["channel"] = out["channel"].astype(np.int64)
    return out.sort_values(["statistic", "channel"], ignore_index=True)


def massive_activations(df: pd.DataFrame, path: str | None = None, length: int | None = None) -> pd.DataFrame:
    """The residual stream's largest |values| per layer (reference path, first prompt of the longest length
    for token/channel, mean over prompts for magnitudes is not meaningful, so one prompt is kept).
    Columns layer, rank, value, token, channel; plus kurtosis and absmax of the layer's residual."""
    path = path or reference(df)
    d = _pick(df, length, site="resid", phase="prefill", path=path,
              metric=["massive_value", "massive_token", "massive_channel"])
    d = _need(d, f"massive activations of {path}", df)
    d = d[d["prompt"] == d["prompt"].min()]
    t = d.pivot_table(index=["layer", "element"], columns="metric", values="value", aggfunc="first", observed=True)
    t = t.rename(columns={"massive_value": "value", "massive_token": "token", "massive_channel": "channel"})
    t.index = t.index.set_names(["layer", "rank"])
    t = t.reset_index()
    t[["token", "channel"]] = t[["token", "channel"]].astype(np.int64)
    return t[["layer", "rank", "value", "token", "channel"]].sort_values(["layer", "rank"], ignore_index=True)


def outlier_summary(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """Outlier statistics of q, k, v, attn_out (all heads: max over heads) and resid per layer, reference path;
    columns site, layer, metric, value."""
    d = _pick(df, length, phase="prefill", path=reference(df), site=["q", "k", "v", "attn_out", "resid"],
              metric=["absmax", "channel_max_median", "kurtosis", "frac_6sigma"])
    d = _need(d, "outlier statistics", df)
    d = _mean(d, ["site", "layer", "metric", "head_index", "prompt"])
    return d.groupby(["site", "layer", "metric"], observed=True)["value"].max().reset_index()


# -- evaluate and bench (contracts) --------------------------------------------------------------------

EVAL_COLUMNS = ("path", "context", "metric", "value")
BENCH_COLUMNS = ("path", "context", "phase", "tokens_per_s", "peak_memory_gib")


def evaluation_long(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Brings an evaluate run's tables to the contract of ``plots.perplexity_logits``: one row per
    (path, context, metric) with columns path, context (tokens), metric, value.

    From the evaluate ``summary`` table (context, ppl_base, ppl_quant, kl_mean, top1_agree, ...; see
    ``driftscope.run.evaluate``), paths are named by the ``attn`` column of the ``perplexity`` table (e.g. sdpa,
    sage8). A table already in the long shape (path, context, metric, value) is taken as it is.
    """
    if "summary" in tables and {"context", "ppl_base", "ppl_quant"} <= set(tables["summary"].columns):
        s = tables["summary"]
        names = {"base": "base", "quant": "quant"}
        ppl = tables.get("perplexity")
        if ppl is not None and {"side", "attn"} <= set(ppl.columns):
            names.update(ppl.drop_duplicates("side").set_index("side")["attn"].astype(str).to_dict())
        if names["base"] == names["quant"]:
            names = {k: f"{v} ({k})" for k, v in names.items()}
        parts = [pd.DataFrame({"path": names["base"], "context": s["context"], "metric": "perplexity",
                               "value": s["ppl_base"]}),
                 pd.DataFrame({"path": names["quant"], "context": s["context"], "metric": "perplexity",
                               "value": s["ppl_quant"]})]
        for m in ("kl_mean", "top1_agree", "max_abs_dlogit"):
            if m in s:
                parts.append(pd.DataFrame({"path": names["quant"], "context": s["context"], "metric": m, "value": s[m]}))
        out = pd.concat(parts, ignore_index=True)
        out.attrs["reference"] = names["base"]
    elif any({"path", "context", "metric", "value"} <= set(t.columns) for t in tables.values()):
        out = next(t for t in tables.values() if {"path", "context", "metric", "value"} <= set(t.columns))
        out = out[["path", "context", "metric", "value"]].copy()
    else:
        raise AnalysisError(f"no evaluate summary table (context, ppl_base, ppl_quant, ...) in this run; tables: "
                            f"{sorted(tables)}")
    out["context"] = out["context"].astype(np.int64)
    out["value"] = out["value"].astype(np.float64)
    ref = out.attrs.get("reference")
    out = out.groupby(["path", "context", "metric"], observed=True, sort=True)["value"].mean().reset_index()
    if ref:
        out.attrs["reference"] = ref
    return out


def bench_table(records: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Brings benchmark records to the contract of ``plots.throughput_memory``: columns path, context (tokens),
    phase (prefill | decode), tokens_per_s, peak_memory_gib, one row each (mean over repeats)."""
    t = pd.DataFrame(records)
    # `python -m driftscope.bench` records: tokens (prompt or KV length) and peak_bytes; skipped rows have no speed
    if "tokens" in t.columns and "context" not in t.columns:
        t = t.rename(columns={"tokens": "context"})
    if "peak_bytes" in t.columns and "peak_memory_gib" not in t.columns:
        t["peak_memory_gib"] = t["peak_bytes"] / 2**30
    if "tokens_per_s" in t.columns:
        t = t[t["tokens_per_s"].notna()]
    missing = [c for c in BENCH_COLUMNS if c not in t.columns]
    if missing:
        raise AnalysisError(f"benchmark records lack the columns {missing}; they have {list(t.columns)}")
    t = t[list(BENCH_COLUMNS)].astype({"context": np.int64, "tokens_per_s": float, "peak_memory_gib": float})
    return t.groupby(["path", "context", "phase"], observed=True).mean().reset_index()
