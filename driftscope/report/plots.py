"""driftscope's figures: one function per figure, each taking a tidy DataFrame and ``save_to``.

    import driftscope as ds
    df = ds.open_run("runs/a.h5").metrics()
    ds.plots.drift_heatmap(df, save_to="figures/heatmap")     # writes heatmap.png and heatmap.pdf

Each function returns the matplotlib Figure; with ``save_to`` (a path without extension) it also writes PNG
and PDF. The numbers come from ``driftscope.report.tables`` (the same tables ``python -m driftscope.figures``
writes as CSV digests). Titles name the model (``df.attrs["model"]`` when set), mode, phase, reference and
context length. The style is set in one place (``RC`` and ``PATH_COLORS``) and applied per figure, so calling
these functions never changes matplotlib's global state.
"""
from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

from driftscope.report import tables  # noqa: E402

RC = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.15),
    "axes.titlesize": 10,
    "figure.titlesize": 11,
    "legend.fontsize": 8.5,
    "legend.title_fontsize": 8.5,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
    "grid.linewidth": 0.5,
}
_PALETTE = sns.color_palette("colorblind", 10)
PATH_COLORS = {"fp32": _PALETTE[7], "fp16": _PALETTE[0], "sage8": _PALETTE[3], "sage8-nosmooth": _PALETTE[2],
               "sage2-triton": _PALETTE[4], "sage2-fp8": _PALETTE[9], "sage2-fp8-nosmooth": _PALETTE[5]}
PHASE_STYLES = {"prefill": "-", "decode": "--"}
METRIC_LABELS = {
    "rel_l2": "relative L2 (‖x − ref‖ / ‖ref‖)",
    "rel_l1": "relative L1 (Σ|x − ref| / Σ|ref|)",
    "cosine": "cosine similarity",
    "one_minus_cosine": "1 − cosine similarity",
    "rmse": "RMSE (activation units)",
    "max_abs": "max |x − ref| (activation units)",
}


def path_color(path: str):
    return PATH_COLORS.get(path, _PALETTE[(sum(map(ord, path)) % 5) + 4])


def styled(fn):
    """Applies driftscope's one style to a figure function, without touching the global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def save(fig: plt.Figure, save_to) -> list[Path]:
    """Writes ``save_to``.png and ``save_to``.pdf (no timestamps in the PDF); returns both paths."""
    if save_to is None:
        return []
    base = Path(save_to)
    base.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = Path(f"{base}.png"), Path(f"{base}.pdf")
    fig.savefig(png, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})
    return [png, pdf]


def _finish(fig: plt.Figure, save_to, close: bool) -> plt.Figure:
    save(fig, save_to)
    if close:
        plt.close(fig)
    return fig


def _who(df: pd.DataFrame) -> str:
    model = df.attrs.get("model")
    device = df.attrs.get("device")
    return " · ".join(str(x) for x in (model, device) if x)


def _suptitle(fig: plt.Figure, df: pd.DataFrame, what: str, detail: str) -> None:
    who = _who(df)
    fig.suptitle(f"{what}{' — ' + who if who else ''}\n{detail}")


def _finish_drift(fig: plt.Figure, df: pd.DataFrame, what: str, detail: str, save_to, close: bool) -> plt.Figure:
    """Titles a drift figure "<what> vs <the reference path>" over `detail`, then saves it."""
    _suptitle(fig, df, f"{what} vs {tables.reference(df)}", detail)
    return _finish(fig, save_to, close)


def _log_or_linear(ax, values, axis: str = "y") -> None:
    v = np.asarray(values, dtype=float)
    if np.any(v > 0) and np.nanmax(v) / np.nanmin(v[v > 0]) > 20:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


# -- drift ---------------------------------------------------------------------------------------------

@styled
def drift_heatmap(df: pd.DataFrame, save_to=None, metric: str = "rel_l2", mode: str = "isolated",
                  phase: str = "prefill", site: str = "attn_out", length: int | None = None,
                  close: bool = True) -> plt.Figure:
    """Layer × head heatmap of each compared path's drift at ``site`` (default: attention output, isolated
    mode, so each cell is that head's own kernel error). One panel per path, one shared colour scale (log
    when the values span more than a decade), the worst head of each path outlined."""
    mode = tables.available_mode(df, site, mode)
    data = tables.head_drift(df, metric, mode, phase, site, length)
    length = length or tables.longest(df)
    paths = [p for p in tables.compared_paths(df) if p in set(data["path"])]
    v = data["value"].to_numpy()
    pos = v[v > 0]
    better_low = metric != "cosine"
    if len(pos) and pos.max() / pos.min() > 10 and better_low:
        norm = LogNorm(vmin=pos.min(), vmax=pos.max())
    else:
        norm = Normalize(vmin=v.min(), vmax=v.max() if v.max() > v.min() else v.min() + 1e-12)
    n_layers, n_heads = int(data["layer"].max()) + 1, int(data["head"].max()) + 1
    width = 0.9 + 0.32 * n_heads
    fig, axes = plt.subplots(1, len(paths), figsize=(width * len(paths) + 1.2, 1.2 + 0.16 * n_layers),
                             squeeze=False, constrained_layout=True)
    cmap = "rocket_r" if better_low else "rocket"
    for ax, path in zip(axes[0], paths):
        grid = (data[data["path"] == path].pivot(index="layer", columns="head", values="value")
                .reindex(index=range(n_layers), columns=range(n_heads)))
        im = ax.imshow(grid.to_numpy(), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        worst = np.unravel_index(np.nanargmax(grid.to_numpy() if better_low else -grid.to_numpy()), grid.shape)
        ax.add_patch(plt.Rectangle((worst[1] - 0.5, worst[0] - 0.5), 1, 1, fill=False, ec="#00a0ff", lw=1.6))
        ax.set_title(f"{path}\nworst: layer {worst[0]}, head {worst[1]} ({grid.to_numpy()[worst]:.2g})")
        ax.set_xlabel("query head")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
        ax.grid(False)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"{site} {METRIC_LABELS.get(metric, metric)}", shrink=0.9)
    return _finish_drift(fig, df, "Per-head drift of the attention output",
                         f"{mode} mode, {phase}, {length}-token prompts (mean over prompts)", save_to, close)


@styled
def drift_through_depth(df: pd.DataFrame, save_to=None, mode: str = "propagated", length: int | None = None,
                        close: bool = True) -> plt.Figure:
    """How drift accumulates through the model: residual-stream 1 − cosine and relative L2 after each decoder
    layer (propagated mode: every path runs end to end), prefill (solid) vs decode (dashed), and the logits
    at the right end."""
    data = tables.depth_drift(df, mode, length)
    length = length or tables.longest(df)
    paths = [p for p in tables.compared_paths(df) if p in set(data["path"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    n_layers = int(data["layer"].max())
    for ax, metric in zip(axes, ("one_minus_cosine", "rel_l2")):
        d = data[data["metric"] == metric]
        for path in paths:
            for phase, ls in PHASE_STYLES.items():
                s = d[(d["path"] == path) & (d["phase"] == phase)].sort_values("layer")
                if s.empty:
                    continue
                y = s["value"].where(s["value"] > 0) if (d["value"] > 0).any() else s["value"]
                ax.plot(s["layer"], y, ls, color=path_color(path), marker="o" if phase == "prefill" else "s",
                        ms=3, lw=1.4, label=f"{path}, {phase}")
        _log_or_linear(ax, d["value"])
        ax.set_xlabel("decoder layer (last tick: logits)")
        ax.set_ylabel(f"residual stream\n{METRIC_LABELS[metric]}")
        step = max(1, n_layers // 8)
        ticks = [t for t in range(0, n_layers, step) if t <= n_layers - 1.5 * step or t == 0]
        ax.set_xticks(ticks + [n_layers])
        ax.set_xticklabels([str(t) for t in ticks] + ["logits"])
    axes[0].set_title("direction (1 − cosine)")
    axes[1].set_title("magnitude of the error (relative L2)")
    fig.legend(*axes[1].get_legend_handles_labels(), title="path, phase", loc="outside right center")
    return _finish_drift(fig, df, "Drift through depth",
                         f"{mode} mode, {length}-token prompts; decode = mean over greedy steps (teacher-forced)",
                         save_to, close)


@styled
def drift_vs_position(df: pd.DataFrame, save_to=None, length: int | None = None, close: bool = True) -> plt.Figure:
    """Relative L2 against token position at the longest context: the attention output (median and max over
    layers, isolated mode if captured) and the last layer's residual stream (propagated)."""
    data = tables.position_summary(df, length)
    length = length or tables.longest(df)
    sites = [s for s in ("attn_out", "resid") if (data["site"] == s).any()]
    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 3.8), squeeze=False, constrained_layout=True)
    paths = [p for p in tables.compared_paths(df) if p in set(data["path"])]
    for ax, site in zip(axes[0], sites):
        d = data[data["site"] == site]
        for (layers, path), s in d.groupby(["layers", "path"], sort=False):
            ax.plot(s["position"], s["value"].where(s["value"] > 0), ":" if layers == "max" else "-",
                    color=path_color(path), lw=1.3)
        _log_or_linear(ax, d["value"])
        ax.set_xlabel("token position (start of bin)")
        mode = d["mode"].iloc[0]
        if site == "attn_out":
            ax.set_title(f"attention output, {mode} mode")
            ax.set_ylabel("attention output relative L2")
        else:
            ax.set_title(f"residual stream after layer {int(d['layer'].iloc[0])}, {mode} mode")
            ax.set_ylabel("residual stream relative L2")
    handles = [plt.Line2D([], [], color=path_color(p), label=p) for p in paths]
    handles += [plt.Line2D([], [], color="0.3", ls="-", label="attention output:\nmedian over layers"),
                plt.Line2D([], [], color="0.3", ls=":", label="attention output:\nmax over layers")]
    fig.legend(handles=handles, loc="outside right center")
    return _finish_drift(fig, df, "Drift vs token position", f"prefill, {length}-token prompts (mean over prompts)",
                         save_to, close)


# -- smoothing-K ---------------------------------------------------------------------------------------

@styled
def smoothing_effect(df: pd.DataFrame, save_to=None, length: int | None = None, close: bool = True) -> plt.Figure:
    """What smoothing K does: (a) per (layer, KV head), K's channel bias vs the factor by which smoothing
    lowers the INT8 error of Q K^T; (b) that error per layer with and without smoothing; (c) the attention
    output's rel-L2 of sage8 vs sage8-nosmooth per layer (when both were captured)."""
    table = tables.smoothing_table(df, length)
    layers = tables.smoothing_by_layer(df, length)
    has_attn = (layers["quantity"] == "attn_out_rel_l2").any()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    ax = axes[0]
    sc = ax.scatter(table["channel_bias"], table["qk_reduction"], c=table["layer"], cmap="viridis", s=22,
                    edgecolor="k", linewidth=0.3)
    ax.axhline(1.0, color="0.3", lw=1, ls="--")
    ax.text(0.01, 1.0, " no effect", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8, color="0.3")
    ax.set_xlabel("K channel bias  |mean_t K| / mean_t |K_t|")
    ax.set_ylabel("QKᵀ error without / with smoothing\n(> 1: smoothing helps)")
    ax.set_title("(a) each point: one layer × KV head")
    fig.colorbar(sc, ax=ax, label="layer")
    for ax, quantity, title, ylabel in (
        (axes[1], "qk_quant_err", "(b) INT8 error of the scores QKᵀ", "QKᵀ relative error (mean over KV heads)"),
        (axes[2], "attn_out_rel_l2", "(c) attention-output error", "attention output relative L2 vs reference"),
    ):
        d = layers[layers["quantity"] == quantity]
        for variant in (tables.SAGE, tables.NOSMOOTH):
            s = d[d["variant"] == variant].sort_values("layer")
            label = f"{variant} ({'smoothed K' if variant == tables.SAGE else 'no smoothing'})"
            ax.plot(s["layer"], s["value"], "-o", ms=3, color=path_color(variant), label=label)
        if d.empty:
            ax.text(0.5, 0.5, "not in this run:\ncapture both sage8 and sage8-nosmooth", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
        else:
            _log_or_linear(ax, d["value"])
            ax.legend(loc="best")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    mode = tables.available_mode(df, "attn_out")
    length = length or tables.longest(df)
    _suptitle(fig, df, "The smoothing-K effect",
              f"prefill, {length}-token prompts; scores from the reference's Q and K; "
              f"(c) {mode} mode vs {tables.reference(df)}" + ("" if has_attn else " (not captured)"))
    return _finish(fig, save_to, close)


@styled
def k_channel_profile(profile: pd.DataFrame, save_to=None, layer: int | None = None, kv_head: int | None = None,
                      title_df: pd.DataFrame | None = None, close: bool = True) -> plt.Figure:
    """K's per-channel absmax at one layer and KV head, before and (when the stored K tensor allows it)
    after smoothing. ``profile`` is ``tables.k_channel_profile(...)`` (columns statistic, channel, value)."""
    fig, ax = plt.subplots(figsize=(9, 3.6), constrained_layout=True)
    raw = profile[profile["statistic"] == "absmax"].sort_values("channel")
    if raw.empty:
        raise tables.AnalysisError("the K profile has no 'absmax' rows")
    ax.bar(raw["channel"], raw["value"], width=0.85, color="0.65", label="max_t |K| (as stored, unsmoothed)")
    sm = profile[profile["statistic"] == "absmax smoothed"].sort_values("channel")
    mu = profile[profile["statistic"] == "|mean|"].sort_values("channel")
    if not sm.empty:
        ax.bar(sm["channel"], sm["value"], width=0.45, color=path_color(tables.SAGE),
               label="max_t |K − mean_t K| (smoothed, as sage8 quantizes it)")
    if not mu.empty:
        ax.plot(mu["channel"], mu["value"], "_", color="k", ms=7, mew=1.5, label="|mean_t K| (removed by smoothing)")
    if sm.empty:
        note = ("after smoothing: not in this run's statistics; a newer capture stores it, or capture with "
                f"--store k --layers {layer}")
        fig.text(0.5, 0.0, note, ha="center", va="top", fontsize=8, color="0.35")
    ax.set_xlabel("K channel (head_dim index)")
    ax.set_ylabel("per-channel absmax over tokens")
    ax.set_xlim(-1, int(profile["channel"].max()) + 1)
    ax.legend(loc="upper left")
    src = title_df if title_df is not None else pd.DataFrame()
    who = _who(src)
    fig.suptitle(f"K channel profile at layer {layer}, KV head {kv_head}{' — ' + who if who else ''}\n"
                 "the head whose unsmoothed K gives the largest INT8 error of QKᵀ; prefill, reference path")
    return _finish(fig, save_to, close)


# -- outliers ------------------------------------------------------------------------------------------

@styled
def massive_activations(df: pd.DataFrame, save_to=None, path: str | None = None, length: int | None = None,
                        close: bool = True) -> plt.Figure:
    """The residual stream's massive activations: (a) the largest |value| per layer (top-1 and the k-th);
    (b) where the top-k sit (token position vs layer), coloured by hidden channel."""
    path = path or tables.reference(df)
    data = tables.massive_activations(df, path, length)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    ax = axes[0]
    k = int(data["rank"].max()) + 1
    top = data[data["rank"] == 0]
    kth = data[data["rank"] == k - 1]
    ax.fill_between(top["layer"], kth["value"].to_numpy(), top["value"].to_numpy(), color=path_color(path), alpha=0.2,
                    label=f"ranks 1–{k}")
    ax.plot(top["layer"], top["value"], "-o", ms=3, color=path_color(path), label="largest |value|")
    _log_or_linear(ax, data["value"])
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("|residual activation|")
    ax.set_title(f"(a) top-{k} magnitudes per layer")
    ax.legend(loc="best")
    ax = axes[1]
    counts = data["channel"].value_counts()
    main = list(counts.index[:6])
    palette = dict(zip(main, sns.color_palette("deep", len(main))))
    for ch in main + ["other"]:
        s = data[data["channel"] == ch] if ch != "other" else data[~data["channel"].isin(main)]
        if s.empty:
            continue
        ax.scatter(s["layer"], s["token"], s=8 + 40 * (s["value"] / data["value"].max()),
                   color=palette.get(ch, "0.6"), label=f"channel {ch}" if ch != "other" else "other channels",
                   edgecolor="k", linewidth=0.2)
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("token position")
    ax.set_title(f"(b) where the top-{k} sit (size ∝ magnitude)")
    ax.legend(loc="best", fontsize=7.5, markerscale=0.8)
    length = length or tables.longest(df)
    _suptitle(fig, df, "Massive activations in the residual stream",
              f"path {path}, prefill, first {length}-token prompt")
    return _finish(fig, save_to, close)


# -- evaluate and bench --------------------------------------------------------------------------------

LOGIT_LABELS = {"kl_mean": "mean KL(base ‖ 8-bit) (nats per token)", "kl_max": "max KL(base ‖ 8-bit) (nats)",
                "top1_agree": "top-1 agreement (fraction)", "max_abs_dlogit": "max |Δ logit|"}


@styled
def perplexity_logits(df: pd.DataFrame, save_to=None, reference: str | None = None, close: bool = True) -> plt.Figure:
    """Perplexity and logit deltas against context length.

    Contract: ``df`` has columns path (str), context (int, tokens), metric (str), value (float), one row per
    (path, context, metric) (``tables.evaluation_long`` builds it from an evaluate run's tables). Metrics
    used: ``perplexity`` (per path; the panel beside it shows each path's change against ``reference``, in
    percent) and any others (e.g. ``kl``, ``top1_agreement``), one panel each, up to three.
    """
    reference = reference or df.attrs.get("reference") or str(df["path"].iloc[0])
    others = [m for m in dict.fromkeys(df["metric"]) if m != "perplexity"][:3]
    has_ppl = (df["metric"] == "perplexity").any()
    n = (2 if has_ppl else 0) + len(others)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, constrained_layout=True)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()
    axes = axes[:n]
    paths = list(dict.fromkeys(df["path"]))
    if has_ppl:
        ppl = df[df["metric"] == "perplexity"].pivot(index="context", columns="path", values="value")
        ax = axes.pop(0)
        for p in paths:
            if p in ppl:
                ax.plot(ppl.index, ppl[p], "-o", ms=3, color=path_color(p), label=p)
        ax.set_ylabel("perplexity")
        ax.set_title("perplexity")
        ax.legend()
        ax = axes.pop(0)
        for p in paths:
            if p in ppl and p != reference and reference in ppl:
                ax.plot(ppl.index, 100 * (ppl[p] / ppl[reference] - 1), "-o", ms=3, color=path_color(p), label=p)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylabel(f"perplexity change vs {reference} (%)")
        ax.set_title("Δ perplexity")
    for m, ax in zip(others, axes):
        s = df[df["metric"] == m]
        for p in paths:
            t = s[s["path"] == p].sort_values("context")
            if not t.empty:
                ax.plot(t["context"], t["value"], "-o", ms=3, color=path_color(p), label=p)
        label = LOGIT_LABELS.get(m, m.replace("_", " "))
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} vs {reference}")
        ax.legend()
    for ax in fig.axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
    _suptitle(fig, df, "What the drift costs", f"reference {reference}")
    return _finish(fig, save_to, close)


@styled
def throughput_memory(df: pd.DataFrame, save_to=None, close: bool = True) -> plt.Figure:
    """Tokens/s (prefill solid, decode dashed) and peak memory against context length, per path.

    Contract: ``df`` has columns path (str), context (int, tokens), phase ("prefill" | "decode"),
    tokens_per_s (float), peak_memory_gib (float), one row per (path, context, phase)
    (``tables.bench_table`` builds it from benchmark records).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for p in dict.fromkeys(df["path"]):
        for phase, ls in PHASE_STYLES.items():
            s = df[(df["path"] == p) & (df["phase"] == phase)].sort_values("context")
            if s.empty:
                continue
            axes[0].plot(s["context"], s["tokens_per_s"], ls, marker="o", ms=3, color=path_color(p), label=f"{p}, {phase}")
            if phase == "prefill":
                axes[1].plot(s["context"], s["peak_memory_gib"], "-o", ms=3, color=path_color(p), label=p)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("throughput (tokens/s)")
    axes[0].set_title("throughput")
    axes[1].set_ylabel("peak GPU memory (GiB)")
    axes[1].set_title("peak memory (prefill)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.legend()
    _suptitle(fig, df, "What the 8-bit path buys", "measured in one benchmark run")
    return _finish(fig, save_to, close)


# -- the decode kernel ---------------------------------------------------------------------------------

KV_BLOCK = 64  # SageAttention's key block: 1.0.6's decode kernel counts the padded keys of the last block


@styled
def decode_kl(df: pd.DataFrame, save_to=None, close: bool = True) -> plt.Figure:
    """Teacher-forced decode KL(base ‖ path) against the prompt length and against kv_len mod 64.

    Contract: ``df`` has columns path (str), prompt_length (int, tokens), kv_len (int, keys the decode step
    attends to), kl (float, nats; mean over windows) and prefill_kl (float: the prefill KL of the same prompts, mean
    over their positions and windows), one row per (path, prompt_length, kv_len) (``figures.decode_table`` builds it
    from an evaluate run's ``decode`` and ``decode_prefill`` tables). Panel (a): mean over steps per prompt length,
    the prefill KL of the same prompts dashed; panel (b): every step against kv_len mod 64 (1.0.6's decode kernel
    counts 64 − (kv_len mod 64) zero keys in its softmax when kv_len mod 64 ≠ 0).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    lengths = sorted(df["prompt_length"].unique())
    markers = dict(zip(lengths, "os^DvP*X"))
    for p in dict.fromkeys(df["path"]):
        s = df[df["path"] == p]
        by = s.groupby("prompt_length")[["kl", "prefill_kl"]].mean()
        axes[0].plot(by.index, by["kl"], "-o", ms=4, color=path_color(p), label=f"{p}, decode")
        axes[0].plot(by.index, by["prefill_kl"], "--", marker=".", color=path_color(p), alpha=0.7,
                     label=f"{p}, prefill of the same prompts")
        for length in lengths:
            t = s[s["prompt_length"] == length]
            axes[1].scatter(t["kv_len"] % KV_BLOCK, t["kl"], s=14, marker=markers[length], color=path_color(p),
                            alpha=0.75, label=f"{p}, {length}-token prompts")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(lengths, [str(n) for n in lengths])
    axes[0].set_xlabel("prompt length (tokens)")
    axes[0].set_title("(a) decode vs prefill drift")
    axes[1].set_xlabel(f"kv_len mod {KV_BLOCK} (keys in the last {KV_BLOCK}-key block)")
    axes[1].set_xlim(-1, KV_BLOCK)
    axes[1].set_title("(b) each decode step")
    for ax in axes:
        ax.set_ylabel("KL(base ‖ path) (nats per token)")
        _log_or_linear(ax, df[["kl", "prefill_kl"]].to_numpy().ravel())
        ax.legend(fontsize=7)
    _suptitle(fig, df, "Teacher-forced decode drift", "the baseline's greedy continuation fed to every side")
    return _finish(fig, save_to, close)


@styled
def decode_drift_vs_kv(df: pd.DataFrame, save_to=None, close: bool = True) -> plt.Figure:
    """Capture's decode-step attention-output relative L2 against kv_len mod 64.

    Contract: ``df`` has columns path (str), mode (str), length (int, prompt tokens), step (int), kv_len (int =
    length + step), value (float: the step's attn_out rel-L2 over all heads, mean over layers and prompts), one row
    per (path, mode, length, step) (``figures.capture_decode_table`` builds it from a capture's metrics).
    """
    modes = list(dict.fromkeys(df["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False, constrained_layout=True)
    lengths = sorted(df["length"].unique())
    markers = dict(zip(lengths, "os^DvP*X"))
    for ax, mode in zip(axes[0], modes):
        for p in dict.fromkeys(df["path"]):
            for length in lengths:
                t = df[(df["mode"] == mode) & (df["path"] == p) & (df["length"] == length)]
                if not t.empty:
                    ax.scatter(t["kv_len"] % KV_BLOCK, t["value"], s=14, marker=markers[length], color=path_color(p),
                               alpha=0.8, label=f"{p}, {length}-token prompts")
        ax.set_xlabel(f"kv_len mod {KV_BLOCK}")
        ax.set_xlim(-1, KV_BLOCK)
        ax.set_ylabel(f"attn_out {METRIC_LABELS['rel_l2']}")
        ax.set_title(f"{mode} mode, decode steps")
        _log_or_linear(ax, df.loc[df["mode"] == mode, "value"])
        ax.legend(fontsize=7)
    _suptitle(fig, df, "Decode-step attention drift against the last key block's fill",
              "mean over layers and prompts; kv_len = prompt length + step")
    return _finish(fig, save_to, close)


# -- SageAttention families side by side ---------------------------------------------------------------------------

@styled
def sage_versions(layers: pd.DataFrame, decode: pd.DataFrame, speed: pd.DataFrame | None = None, save_to=None,
                  labels: dict | None = None, detail: str = "", close: bool = True) -> plt.Figure:
    """Compiled sage paths of several SageAttention versions side by side (``driftscope.report.versions``).

    Contract: ``layers`` has columns path, phase (prefill | decode), layer, value (isolated attn_out rel-L2 vs the
    reference over all heads; ``versions.attn_out_by_layer``); ``decode`` has path, prompt_length, kl (teacher-forced
    decode KL, nats per token) and prefill_kl (of the same prompts); ``speed`` (optional) has path, phase, context and
    ratio (tokens/s over fp16's). ``labels`` maps a path to its legend label (e.g. with the version). Panels: (a)
    attn_out rel-L2 per layer, prefill solid, decode dashed; (b) decode KL against the prompt length, prefill KL as
    crosses; (c) tokens/s over fp16 per phase and context, paths without rows marked "not measured". The title
    names ``layers.attrs["model"]`` and ``["device"]``; ``detail`` is its second line.
    """
    labels = labels or {}
    order = list(dict.fromkeys(layers["path"]))
    n = 3 if speed is not None else 2
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.3), constrained_layout=True)
    ax = axes[0]
    for p in order:
        for phase, style in PHASE_STYLES.items():
            s = layers[(layers["path"] == p) & (layers["phase"] == phase)]
            ax.plot(s["layer"], s["value"], style, color=path_color(p), lw=1.3)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"attn_out {METRIC_LABELS['rel_l2']}")
    ax.set_title("(a) isolated attention output vs fp16")
    _log_or_linear(ax, layers["value"])
    ax = axes[1]
    lengths = sorted(decode["prompt_length"].unique())
    for p in order:
        s = decode[decode["path"] == p].sort_values("prompt_length")
        ax.plot(s["prompt_length"], s["kl"], "--o", ms=4, color=path_color(p))
        ax.plot(s["prompt_length"], s["prefill_kl"], "x", ms=7, mew=1.5, color=path_color(p))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(v) for v in lengths])
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("KL(fp16 ‖ path) (nats per token)")
    ax.set_title("(b) teacher-forced decode drift")
    if speed is not None:
        ax = axes[2]
        s = speed.sort_values(["phase", "context"], ascending=[False, True])
        cats = list(dict.fromkeys(f"{ph}, {'KV ' if ph == 'decode' else ''}{c // 1024}k"
                                  for ph, c in s[["phase", "context"]].itertuples(index=False)))
        measured = [p for p in order if (speed["path"] == p).any()]
        width = 0.8 / max(len(measured), 1)
        for i, p in enumerate(measured):
            t = s[s["path"] == p]
            x = np.array([cats.index(f"{ph}, {'KV ' if ph == 'decode' else ''}{c // 1024}k")
                          for ph, c in t[["phase", "context"]].itertuples(index=False)])
            ax.bar(x + (i - (len(measured) - 1) / 2) * width, t["ratio"], width, color=path_color(p))
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_ylabel("tokens/s over fp16 (SDPA)")
        ax.set_title("(c) throughput")
        missing = [labels.get(p, p) for p in order if p not in measured]
        ax.set_ylim(0, 1.4 * max(1.0, float(speed["ratio"].max()) if len(speed) else 1.0))
        if missing:
            ax.text(0.02, 0.97, "not measured: " + ", ".join(missing), transform=ax.transAxes, fontsize=7, va="top",
                    ha="left", wrap=True)
    handles = [matplotlib.lines.Line2D([], [], color=path_color(p), lw=2, label=labels.get(p, p)) for p in order]
    handles += [matplotlib.lines.Line2D([], [], color="0.3", ls=PHASE_STYLES["prefill"], label="prefill"),
                matplotlib.lines.Line2D([], [], color="0.3", ls=PHASE_STYLES["decode"], marker="o", ms=4,
                                        label="decode"),
                matplotlib.lines.Line2D([], [], color="0.3", ls="", marker="x", ms=6, mew=1.5,
                                        label="(b) prefill KL of the same prompts")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    _suptitle(fig, layers, "SageAttention versions, compiled kernels", detail)
    return _finish(fig, save_to, close)
