"""Capture: run a model's forward with every attention call tapped, in lockstep or isolated mode.

- `propagated` (lockstep): the prompt is repeated once per path along the batch; row r runs path r at every
  attention call and every other op is shared, so rows can be compared at each site as the forward goes.
  Rows of a batch are bitwise equal for equal inputs, so `fp16,fp16` gives exactly zero drift.
- `isolated`: one row. At each attention call every path gets the reference's q, k, v and the reference's
  output continues, so each layer's own error is measured without propagation.

Prefill is followed by `decode` greedy steps (phase `decode`, step 1..N). In lockstep every row is fed the
reference row's greedy token (teacher forcing), so rows stay comparable.

`instrumented()` installs the tap and the residual hooks and always restores the model in a `finally`
(hooks are global state), also on KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from driftscope import metrics, paths
from driftscope.records import Records

from .attention import check_mask, is_causal_call, register_function, unregister_function

SITES = ("q", "k", "v", "attn_out", "resid", "logits")
POSITION_BINS = 128  # per-position curves are binned to at most this many points
HEAD_METRICS = ("cosine", "rel_l2", "rel_l1")  # per head; all of metrics.DRIFT_METRICS over all heads
MASSIVE_TOP_K = 8
SCORE_ROWS = 256  # query rows sampled for the QK^T quantization error
LOGITS_CHUNK = 1 << 22

_tap_ids = itertools.count()


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
    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        check_mask(attention_mask, "driftscope capture")
        causal = is_causal_call(module, query, key, attention_mask, is_causal)
        layer = module.layer_idx
        if self.mode == "propagated":
            out = torch.cat([fn(query[r:r + 1], key[r:r + 1], value[r:r + 1], causal=causal, scale=scaling)
                             for r, fn in enumerate(self.path_fns)])
            self._observe(layer, query, key, value, out)
        else:
            ref = self.path_fns[0](query, key, value, causal=causal, scale=scaling)
            for fn in self.path_fns[1:]:
                self._drift(layer, "attn_out", fn.name, fn(query, key, value, causal=causal, scale=scaling)[0], ref[0])
            self._observe(layer, query, key, value, ref)
            out = ref
        return out.transpose(1, 2).contiguous(), None

    def _drift(self, layer: int, site: str, path: str, x: torch.Tensor, ref: torch.Tensor, heads: bool = True,
               chunk: int | None = None) -> None:
        rec = self.records
        if heads:
            sums = metrics.drift_sums(x, ref)
            n = x[0].numel()
            per_head = metrics.drift_from_sums(sums, n)
            for metric in HEAD_METRICS:
                rec.add(layer, site, path, metric, per_head[metric])
            pooled = metrics.drift_from_sums(metrics.pool(sums), n * x.shape[0])
        else:
            pooled = metrics.drift(x.reshape(1, -1), ref.reshape(1, -1), chunk=chunk)
        for metric, values in pooled.items():
            rec.add(layer, site, path, metric, values, heads=False)
        if self.records.context.phase == "prefill" and site in ("attn_out", "resid"):
            x3 = x if x.dim() == 3 else x[None]
            r3 = ref if ref.dim() == 3 else ref[None]
            starts, curve = metrics.rel_l2_by_position(x3, r3, POSITION_BINS)
            rec.add(layer, site, path, "rel_l2_pos", curve, heads=False, index=starts)

    def _observe(self, layer: int, query, key, value, out) -> None:
        """Drift of each row against row 0 at q, k, v (new tokens) and attn_out, plus statistics and storage."""
        Tq = query.shape[2]
        sites = {"q": query, "k": key[:, :, -Tq:], "v": value[:, :, -Tq:], "attn_out": out}
        names = self.names
        rows = range(out.shape[0])
        decode = self.records.context.phase == "decode"
        for site, t in sites.items():
            if self.mode == "propagated":
                # A decode step's q, k, v are one token per head: per-head values there are noise, pooled ones are not.
                per_head = not (decode and site in ("q", "k", "v"))
                for r in rows[1:]:
                    self._drift(layer, site, names[r], t[r], t[0], heads=per_head)
            if self._stats_now():
                for r in self._first_rows() if self.mode == "propagated" else [0]:
                    # channel profiles of the reference row only: other rows see (nearly) the same q, k, v
                    self._outliers(layer, site, names[r], t[r], profile=r == 0 and site in ("q", "k", "v"))
            if self.sink is not None and self.store.wants(site, layer):
                for r in rows:
                    self._store(layer, site, names[r], t[r])
        if self._stats_now():
            self._smoothing(layer, query[0], key[:, :, -Tq:][0])

    def _stats_now(self) -> bool:
        return self.with_stats and self.records.context.phase == "prefill"

    def _outliers(self, layer: int, site: str, path: str, x_HxTxD: torch.Tensor, profile: bool) -> None:
        rec = self.records
        for metric, values in metrics.outliers(x_HxTxD).items():
            rec.add(layer, site, path, metric, values)
        if profile:
            profiles = {"absmax_channel": metrics.channel_absmax(x_HxTxD)}  # [H, C]
            if site == "k":  # and K as the kernel quantizes it with smoothing on
                profiles["absmax_channel_smoothed"] = metrics.channel_absmax(x_HxTxD - x_HxTxD.mean(dim=1, keepdim=True))
            idx = torch.arange(x_HxTxD.shape[-1], device=x_HxTxD.device)
            for metric, ch in profiles.items():
                for h in range(ch.shape[0]):
                    rec.add(layer, site, path, metric, ch[h], heads=False, head=h, index=idx)

    def _smoothing(self, layer: int, q_HxTxD: torch.Tensor, k_HxTxD: torch.Tensor) -> None:
        """Smoothing-K statistics per KV head, from the reference row (see driftscope.smoothing)."""
        from driftscope import smoothing

        stats = smoothing.smoothing_stats(q_HxTxD, k_HxTxD, rows=SCORE_ROWS)
        ref = self.names[0]
        for (metric, variant), values in stats.items():
            self.records.add(layer, "k", variant or ref, metric, values)

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
        self.sink(key, x.detach().to(torch.float16, copy=True))

    # -- residual stream and logits ----------------------------------------------------------------
    def residual(self, layer: int, output) -> None:
        resid = output[0] if isinstance(output, (tuple, list)) else output  # decoder layers may return tuples
        names = self.names
        if self.mode == "propagated":
            for r in range(1, resid.shape[0]):
                self._drift(layer, "resid", names[r], resid[r], resid[0], heads=False)
        if self._stats_now():
            for r in self._first_rows() if self.mode == "propagated" else [0]:
                x = resid[r]
                for metric, values in metrics.outliers(x[None]).items():
                    self.records.add(layer, "resid", names[r], metric, values, heads=False)
                values, tok, ch = metrics.massive_activations(x, MASSIVE_TOP_K)
                rank = torch.arange(values.numel(), device=values.device)
                for metric, v in (("massive_value", values), ("massive_token", tok), ("massive_channel", ch)):
                    self.records.add(layer, "resid", names[r], metric, v.to(torch.float64), heads=False, index=rank)
        if self.sink is not None and self.store.wants("resid", layer):
            for r in range(resid.shape[0]):
                self._store(layer, "resid", names[r], resid[r])

    def logits(self, logits_BxTxV: torch.Tensor) -> None:
        if self.mode != "propagated":
            return
        for r in range(1, logits_BxTxV.shape[0]):
            self._drift(-1, "logits", self.names[r], logits_BxTxV[r], logits_BxTxV[0], heads=False, chunk=LOGITS_CHUNK)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama, Mistral, Qwen2/3, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder `layers`; driftscope supports decoder-only LMs")
    return layers


@contextlib.contextmanager
def instrumented(model, tap: Tap):
    """Route every attention call of `model` through `tap` and hook the decoder layers; always restore."""
    name = f"driftscope-tap-{next(_tap_ids)}"
    original = model.config._attn_implementation
    handles = []
    register_function(name, tap.attention)
    try:
        model.set_attn_implementation(name)
        for i, layer in enumerate(decoder_layers(model)):
            handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: tap.residual(i, out)))
        yield tap
    finally:
        for h in handles:
            h.remove()
        try:
            model.set_attn_implementation(original)
        finally:
            unregister_function(name)


@torch.inference_mode()
def run_prompt(model, ids_T: torch.Tensor, tap: Tap, decode: int) -> list[int]:
    """Prefill `ids` (one row per path in lockstep, one row in isolated mode), then `decode` greedy steps.

    Returns the greedy tokens chosen from the reference row.
    """
    rows = len(tap.path_fns) if tap.mode == "propagated" else 1
    ctx = tap.records.context
    ctx.phase, ctx.step = "prefill", 0
    ids = ids_T.to(model.device)[None].expand(rows, -1).contiguous()
    out = model(input_ids=ids, use_cache=decode > 0)
    tap.logits(out.logits)
    cache, chosen = out.past_key_values, []
    for step in range(1, decode + 1):
        token = out.logits[0, -1].argmax()
        chosen.append(int(token))
        ctx.phase, ctx.step = "decode", step
        out = model(input_ids=token.view(1, 1).expand(rows, 1).contiguous(), past_key_values=cache, use_cache=True)
        tap.logits(out.logits)
    return chosen
