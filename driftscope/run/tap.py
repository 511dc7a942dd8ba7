"""The capture's tap: what happens at every attention call and decoder-layer output, in lockstep or isolated mode.

- `propagated` (lockstep): the prompt is repeated once per path along the batch; row r runs path r at every
  attention call and every other op is shared, so rows can be compared at each site as the forward goes.
  Rows of a batch are bitwise equal for equal inputs, so `fp16,fp16` gives exactly zero drift.
- `isolated`: one row. At each attention call every path gets the reference's q, k, v and the reference's
  output continues, so each layer's own error is measured without propagation.

Prefill is followed by `decode` greedy steps (phase `decode`, step 1..N). In lockstep every row is fed the
reference row's greedy token (teacher forcing), so rows stay comparable.

`run_prompt()` runs one prompt through a model instrumented with a tap (`driftscope.hooks.layers.instrumented`,
which restores the model in a `finally`). The tap sees plain tensors; transformers stays inside `hooks/`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from driftscope import paths
from driftscope.hooks import decode
from driftscope.hooks.layers import instrumented
from driftscope.measure import fused, outliers, smoothing
from driftscope.measure.records import Records

SITES = ("q", "k", "v", "attn_out", "resid", "logits")
POSITION_BINS = 128  # per-position curves are binned to at most this many points
HEAD_METRICS = fused.DRIFT_METRICS[:3]  # cosine, rel_l2, rel_l1 per head; all of DRIFT_METRICS over all heads
MASSIVE_TOP_K = 8
SCORE_ROWS = 256  # query rows sampled for the QK^T quantization error
# Smoothing statistics of this many score entries' worth of layers at once: the batch's temporaries (~1 GB at 2^25,
# 4 layers of Llama-3-8B) come mid-forward, below the logits' peak, and cost ~90 small kernels per batch, not layer.
SMOOTHING_BATCH = 1 << 25
# The statistics a tap computes, switchable for benchmarks' per-piece cost breakdown (a run file needs them all).
PIECES = frozenset({"attn_drift", "resid_drift", "logits_drift", "outliers", "resid_stats", "smoothing"})


def lockstep(path_fns: Sequence[paths.AttentionPath]):
    """The lockstep batch's attention and nothing else: row r runs path r (the forward a capture instruments)."""

    def attention(_layer: int, q, k, v, *, causal: bool, scale: float | None) -> torch.Tensor:
        return torch.cat([fn(q[r:r + 1], k[r:r + 1], v[r:r + 1], causal=causal, scale=scale)
                          for r, fn in enumerate(path_fns)])

    return attention


@dataclass
class StoreSpec:
    """Which full tensors to write (`--store`): sites, layers and heads (None = all), token range."""

    sites: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    tokens: tuple[int, int] | None = None  # [start, stop)

    def wants(self, site: str, layer: int) -> bool:
        return site in self.sites and (self.layers is None or layer in self.layers)


@dataclass
class Tap:
    """The state of one capture: paths (the first is the reference), mode, records and tensor sink."""

    path_fns: Sequence[paths.AttentionPath]
    mode: str  # "propagated" | "isolated"
    records: Records
    store: StoreSpec = field(default_factory=StoreSpec)
    sink: Callable[[dict, torch.Tensor], None] | None = None
    with_stats: bool = True  # outliers and smoothing-K statistics (once per prompt is enough)
    pieces: frozenset = PIECES  # which statistics to compute (see PIECES)
    _pending: list = field(default_factory=list)  # a decode step's sites, measured together when the step ends
    _samples: list = field(default_factory=list)  # (layer, smoothing sample) of a prefill, finished in batches

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.path_fns]

    def _first_rows(self) -> list[int]:
        """Rows whose path is not a repeat of an earlier row's (repeats add no statistics)."""
        seen, rows = set(), []
        for r, name in enumerate(self.names):
            if name not in seen:
                seen.add(name)
                rows.append(r)
        return rows

    # -- attention ---------------------------------------------------------------------------------
    def attention(self, layer: int, query, key, value, *, causal: bool, scale: float | None) -> torch.Tensor:
        """Run every path on this call's q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]; record; return [B,Hq,Tq,D]."""
        if len(self.path_fns) == 1:  # nothing to compare: the path's output is only counted
            out = self.path_fns[0](query, key, value, causal=causal, scale=scale)
            self.records.add(layer, "attn_out", self.names[0], "nonfinite", out.isfinite().logical_not().sum(),
                             heads=False)
            self._observe(layer, query, key, value, out)
        elif self.mode == "propagated":
            out = lockstep(self.path_fns)(layer, query, key, value, causal=causal, scale=scale)
            self._observe(layer, query, key, value, out)
        else:
            ref = self.path_fns[0](query, key, value, causal=causal, scale=scale)
            for i, fn in enumerate(self.path_fns[1:]):
                out_fn = fn(query, key, value, causal=causal, scale=scale)
                self._site(layer, "attn_out", out_fn[0], fn.name, ref[0], self.names[0], count_ref=i == 0)
            self._observe(layer, query, key, value, ref)
            out = ref
        return out

    def _site(self, layer: int, site: str, x: torch.Tensor, path: str, ref: torch.Tensor | None = None,
              ref_path: str = "", *, stats_of: tuple[str, ...] = (), heads: bool = True, profile: bool = False,
              count_ref: bool = False) -> None:
        """Every statistic of one site from one fused read of x and ref (driftscope.measure.fused): drift of x
        against ref, the outlier statistics of the tensors in `stats_of` ("x": path's, "ref": ref_path's), the
        per-position curve in prefill, and with `profile` the reference's channel profiles (K's smoothed too).
        At attn_out also the count of x's non-finite values (a kernel bug, never silently averaged), and of ref's
        with `count_ref` (the first comparison with each reference output).

        heads: per-head drift and statistics (values over all heads are recorded either way); False for sites
        without heads and for a decode step's q, k, v (one token per head: per-head values there are noise)."""
        if ref is not None and self._drift_piece(site) not in self.pieces:  # (benchmarks' per-piece breakdown)
            if "ref" in stats_of:
                self._site(layer, site, ref, ref_path, stats_of=("x",), heads=heads, profile=profile)
            ref, stats_of, profile = None, tuple(w for w in stats_of if w == "x"), False
        if ref is None and not stats_of:
            return
        prefill = self.records.context.phase == "prefill"
        if not prefill and ref is not None and not stats_of and site != "logits":  # one token per site: batched
            self._pending.append((layer, site, path, x, ref, heads, ref_path if count_ref else None))  # in _flush
            return
        positions = ref is not None and prefill and site in ("attn_out", "resid")
        nonfinite = ref is not None and site == "attn_out"
        s = fused.site_stats(x, ref, stats_of=stats_of, positions=positions, nonfinite=nonfinite)
        rec = self.records
        if nonfinite:
            counts = s.nonfinite.sum(1)  # [x, ref] over heads
            rec.add(layer, site, path, "nonfinite", counts[:1], heads=False)
            if count_ref:
                rec.add(layer, site, ref_path, "nonfinite", counts[1:], heads=False)
        if ref is not None:  # one record per table: DRIFT_METRICS per head, then over all heads
            if heads:
                rec.add(layer, site, path, HEAD_METRICS, s.table[:len(HEAD_METRICS), :-1])
            rec.add(layer, site, path, fused.DRIFT_METRICS, s.table[:, -1:], heads=False)
            if positions:
                starts, curve = fused.rel_l2_by_position(s, POSITION_BINS)
                rec.add(layer, site, path, "rel_l2_pos", curve, heads=False, index=starts)
        for of in stats_of:
            rec.add(layer, site, path if of == "x" else ref_path, fused.OUTLIER_METRICS, fused.outlier_table(s, of),
                    heads=heads)
        if profile:
            of = "ref" if "ref" in stats_of else "x"
            owner = ref_path if of == "ref" else path
            idx = _arange(s.shape[2], x.device)
            rec.add(layer, site, owner, "absmax_channel", fused.channel_absmax(s, of), index=idx)
            if site == "k":  # and K as the kernel quantizes it with smoothing on
                rec.add(layer, site, owner, "absmax_channel_smoothed", fused.channel_absmax(s, of, smoothed=True),
                        index=idx)

    @staticmethod
    def _drift_piece(site: str) -> str:
        return {"resid": "resid_drift", "logits": "logits_drift"}.get(site, "attn_drift")

    def _rows(self, t: torch.Tensor, layer: int, site: str, stats_piece: str, heads: bool = True,
              profile: bool = False) -> None:
        """A lockstep site (row r runs path r): each row against row 0, one fused read per row; outlier statistics
        of the first row of each path (repeats add none) and the reference's channel profiles."""
        names = self.names
        stat_rows = set(self._first_rows()) if self._stats_now() and stats_piece in self.pieces else set()
        profile = profile and 0 in stat_rows
        if self.mode != "propagated" or t.shape[0] == 1:  # one row: its statistics only
            if stat_rows:
                self._site(layer, site, t[0], names[0], stats_of=("x",), heads=heads, profile=profile)
            return
        for r in range(1, t.shape[0]):
            stats_of = (("ref",) if r == 1 and 0 in stat_rows else ()) + (("x",) if r in stat_rows else ())
            self._site(layer, site, t[r], names[r], t[0], names[0], stats_of=stats_of, heads=heads,
                       profile=profile and r == 1, count_ref=r == 1)

    def _observe(self, layer: int, query, key, value, out) -> None:
        """Drift of each row against row 0 at q, k, v (new tokens) and attn_out, plus statistics and storage."""
        Tq = query.shape[2]
        sites = {"q": query, "k": key[:, :, -Tq:], "v": value[:, :, -Tq:], "attn_out": out}
        decode = self.records.context.phase == "decode"
        for site, t in sites.items():
            qkv = site in ("q", "k", "v")
            self._rows(t, layer, site, "outliers", heads=not (decode and qkv), profile=qkv)
            if self.sink is not None and self.store.wants(site, layer):
                for r in range(out.shape[0]):
                    self._store(layer, site, self.names[r], t[r])
        if self._stats_now() and "smoothing" in self.pieces:
            self._smoothing(layer, query[0], key[:, :, -Tq:][0])

    def _stats_now(self) -> bool:
        return self.with_stats and self.records.context.phase == "prefill"

    def _smoothing(self, layer: int, q_HxTxD: torch.Tensor, k_HxTxD: torch.Tensor) -> None:
        """Smoothing-K statistics per KV head, from the reference row (see driftscope.measure.smoothing): the layer's
        small sample now, the statistics of several layers' samples at once (SMOOTHING_BATCH; the rest when the
        forward ends, `_flush`)."""
        self._samples.append((layer, smoothing.sample(q_HxTxD, k_HxTxD, rows=SCORE_ROWS)))
        if sum(smp.score_entries for _, smp in self._samples) >= SMOOTHING_BATCH:
            self._finish_smoothing()

    def _finish_smoothing(self) -> None:
        if self._samples:
            layers, samples = zip(*self._samples)
            self._samples = []
            for layer, stats in zip(layers, smoothing.finish(list(samples))):
                for (metric, variant), values in stats.items():
                    self.records.add(layer, "k", variant or self.names[0], metric, values)

    def _store(self, layer: int, site: str, path: str, x: torch.Tensor) -> None:
        spec, ctx = self.store, self.records.context
        if x.dim() == 3 and spec.heads is not None:  # [H, T, D]
            x = x[[h for h in spec.heads if h < x.shape[0]]]
        start = 0
        if spec.tokens is not None and ctx.phase == "prefill":
            start = spec.tokens[0]
            x = x[..., spec.tokens[0]:spec.tokens[1], :]
        key = dict(prompt=ctx.prompt, mode=ctx.mode, phase=ctx.phase, step=ctx.step, layer=layer, path=path,
                   site=site, token_start=start)
        self.sink(key, x.detach().to(torch.float16))  # the writer copies at the call (stream-ordered on CUDA)

    # -- residual stream and logits ----------------------------------------------------------------
    def residual(self, layer: int, resid: torch.Tensor) -> None:
        self._rows(resid, layer, "resid", "resid_stats", heads=False)
        if self._stats_now() and "resid_stats" in self.pieces:
            rows = self._first_rows() if self.mode == "propagated" else [0]
            found = outliers.massive_activations(resid if rows == list(range(len(resid))) else resid[rows],
                                                 MASSIVE_TOP_K)  # [rows, k] each
            rank = _arange(found[0].shape[1], resid.device)
            for i, r in enumerate(rows):
                for metric, v in zip(("massive_value", "massive_token", "massive_channel"), found):
                    self.records.add(layer, "resid", self.names[r], metric, v[i], heads=False, index=rank)
        if self.sink is not None and self.store.wants("resid", layer):
            for r in range(resid.shape[0]):
                self._store(layer, "resid", self.names[r], resid[r])

    def logits(self, logits_BxTxV: torch.Tensor) -> None:
        """The end of a forward (prefill or one decode step): the logits' drift, then the step's pending sites."""
        if self.mode == "propagated":
            for r in range(1, logits_BxTxV.shape[0]):
                self._site(-1, "logits", logits_BxTxV[r], self.names[r], logits_BxTxV[0], heads=False)
        self._flush()

    def _flush(self) -> None:
        """What a forward left for its end: the smoothing statistics not yet batched, and a decode step's drift
        for every layer at once: one fused pass per (site, path) over the layers' stacked one-token tensors (per
        layer, and per head where wanted), where a pass per layer would be launch-bound."""
        self._finish_smoothing()
        groups: dict = {}
        for layer, site, path, x, ref, heads, ref_path in self._pending:
            groups.setdefault((site, path, heads, ref_path, tuple(x.shape), x.device), []).append((layer, x, ref))
        self._pending = []
        rec = self.records
        for (site, path, heads, ref_path, shape, _), items in groups.items():
            x = torch.stack([t for _, t, _ in items])  # [L, H, 1, D] or [L, 1, C]
            ref = torch.stack([t for _, _, t in items])
            L, C = x.shape[0], shape[-1]
            # drift tables [metrics, layers (+ pooled)]: a "head" per layer, then per (layer, head)
            pooled = fused.site_stats(x.reshape(L, -1, C), ref.reshape(L, -1, C), nonfinite=site == "attn_out")
            H = shape[0] if heads else 1
            per_head = fused.site_stats(x.reshape(L * H, -1, C), ref.reshape(L * H, -1, C)).table if heads else None
            for i, (layer, _, _) in enumerate(items):
                rec.add(layer, site, path, fused.DRIFT_METRICS, pooled.table[:, i:i + 1], heads=False)
                if heads:
                    rec.add(layer, site, path, HEAD_METRICS, per_head[:len(HEAD_METRICS), i * H:(i + 1) * H])
                if pooled.nonfinite is not None:
                    rec.add(layer, site, path, "nonfinite", pooled.nonfinite[0, i:i + 1], heads=False)
                    if ref_path is not None:
                        rec.add(layer, site, ref_path, "nonfinite", pooled.nonfinite[1, i:i + 1], heads=False)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device) -> torch.Tensor:
    """0..n-1 on a device, made once (channel and rank indices of every layer's records)."""
    return torch.arange(n, device=device)


def nonfinite_warnings(columns: dict) -> list[str]:
    """One warning per (path, layer, phase) whose attention output held non-finite values, from a prompt's records."""
    rows = [i for i in (columns["metric"] == "nonfinite").nonzero()[0] if columns["value"][i] > 0]
    found: dict = {}
    for i in rows:
        key = (str(columns["path"][i]), int(columns["layer"][i]), str(columns["phase"][i]), str(columns["mode"][i]))
        found[key] = found.get(key, 0) + int(columns["value"][i])
    prompt = ", ".join(f"prompt {p} ({n} tokens)" for p, n in sorted({(int(columns["prompt"][i]),
                                                                        int(columns["length"][i])) for i in rows}))
    return [f"warning: {path} returned {n} non-finite attention outputs at layer {layer} ({phase}, {mode}; {prompt})"
            for (path, layer, phase, mode), n in sorted(found.items())]


@torch.inference_mode()
def run_prompt(model, ids_T: torch.Tensor, tap: Tap, decode_steps: int) -> list[int]:
    """Prefill `ids` (one row per path in lockstep, one row in isolated mode), then `decode_steps` greedy steps.

    Returns the greedy tokens chosen from the reference row.
    """
    rows = len(tap.path_fns) if tap.mode == "propagated" else 1
    ctx = tap.records.context

    def at_step(step: int) -> None:
        ctx.phase, ctx.step = ("prefill" if step == 0 else "decode"), step

    with instrumented(model, tap.attention, tap.residual):
        return decode.greedy(model, ids_T[None].expand(rows, -1).contiguous(), decode_steps, on_step=at_step,
                             on_logits=lambda _step, logits: tap.logits(logits))
