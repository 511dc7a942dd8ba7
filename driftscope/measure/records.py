"""Long-form metric records, kept on the device until a prompt ends.

Each `add` stores one device tensor of values (one per head, channel or position) and the keys that
label it. `columns()` moves everything to the host in a single copy and expands the keys, giving the
`metrics` table's columns (``store.schema.METRICS_COLUMNS``): prompt, length, mode, phase, step, layer,
head_index, site, path, metric, element, value.

- head_index = the head the value belongs to: a query head at q and attn_out, a KV head at k and v; -1 for
               values over all heads (and for sites without heads: resid, logits). Drift is recorded per
               head as cosine, rel_l2 and rel_l1 (decode steps: attn_out only), and over all heads with every
               drift metric.
- layer      = -1 for model-level sites (logits)
- element    = -1, or the channel / token position / rank that the value belongs to (per-channel profiles,
               per-position curves, massive activations)

Run files of schema driftscope/1 called head_index ``head`` and element ``index`` (names that clash with
pandas' ``DataFrame.head`` and ``DataFrame.index``); readers return the new names for them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from driftscope.store.schema import METRICS_COLUMNS as COLUMNS, METRICS_DTYPES


@dataclass
class Context:
    """Where in the run the current forward is."""

    prompt: int = 0
    length: int = 0
    mode: str = "propagated"
    phase: str = "prefill"
    step: int = 0


@dataclass
class Records:
    context: Context = field(default_factory=Context)
    _keys: list = field(default_factory=list)
    _values: list = field(default_factory=list)

    def add(self, layer: int, site: str, path: str, metric: str, values: torch.Tensor, *,
            heads: bool = True, index: torch.Tensor | None = None, head: int = -1) -> None:
        """values: [n]. With heads=True value i belongs to head i; otherwise to `head`, at index[i].

        (The keywords keep their short names: `head` fills the column head_index, `index` the column element.)"""
        values = values.detach().reshape(-1)
        c = self.context
        self._keys.append((c.prompt, c.length, c.mode, c.phase, c.step, layer, site, path, metric,
                           values.numel(), heads, head, index))
        self._values.append(values.to(torch.float64))

    def __len__(self) -> int:
        return sum(k[9] for k in self._keys)

    def columns(self) -> dict[str, np.ndarray]:
        """Everything added so far as table columns (one host copy), then forget it."""
        if not self._keys:
            return {name: np.zeros(0, dtype=METRICS_DTYPES[name] if METRICS_DTYPES[name] is not object else str)
                    for name in COLUMNS}
        values = torch.cat([v.to("cpu", non_blocking=False) if v.device.type != "cpu" else v
                            for v in self._values]).numpy()
        counts = np.array([k[9] for k in self._keys])
        cols: dict[str, np.ndarray] = {}
        for i, name in enumerate(("prompt", "length", "mode", "phase", "step", "layer", "site", "path", "metric")):
            cols[name] = np.repeat(np.array([k[i] for k in self._keys]), counts)
        head, index = [], []
        for (*_, n, heads, h, idx) in self._keys:
            head.append(np.arange(n) if heads else np.full(n, h))
            index.append(np.full(n, -1) if idx is None else idx.detach().cpu().numpy().reshape(-1))
        cols["head_index"] = np.concatenate(head).astype(np.int32)
        cols["element"] = np.concatenate(index).astype(np.int64)
        for name in ("prompt", "length", "step", "layer"):
            cols[name] = cols[name].astype(np.int32)
        cols["value"] = values
        self._keys, self._values = [], []
        return {name: cols[name] for name in COLUMNS}
