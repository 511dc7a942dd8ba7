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
    _elements: list = field(default_factory=list)

    def add(self, layer: int, site: str, path: str, metric: str, values: torch.Tensor, *,
            heads: bool = True, index: torch.Tensor | None = None, head: int = -1) -> None:
        """values: [n], or [heads, n] with `index`. heads=True: value i belongs to head i ([heads, n]: value [h, i]
        to head h at index[i]); heads=False: every value to `head`, value i at index[i].

        (The keywords keep their short names: `head` fills the column head_index, `index` the column element.)
        Nothing is copied to the host here: values and indices stay where they are until `columns`."""
        values = values.detach()
        per_head = values.shape[0] if values.dim() == 2 else 0
        values = values.reshape(-1)
        c = self.context
        self._keys.append((c.prompt, c.length, c.mode, c.phase, c.step, layer, site, path, metric,
                           values.numel(), heads, head, per_head, index is not None))
        self._values.append(values)
        if index is not None:
            index = index.detach().reshape(-1)
            self._elements.append(index.repeat(per_head) if per_head else index)

    def __len__(self) -> int:
        return sum(k[9] for k in self._keys)

    def columns(self) -> dict[str, np.ndarray]:
        """Everything added so far as table columns (one host copy of the values, one of the indices), then
        forget it."""
        if not self._keys:
            return {name: np.zeros(0, dtype=METRICS_DTYPES[name] if METRICS_DTYPES[name] is not object else str)
                    for name in COLUMNS}
        values = _to_host(self._values, torch.float64)
        elements = _to_host(self._elements, torch.int64) if self._elements else np.zeros(0, np.int64)
        counts = np.array([k[9] for k in self._keys])
        cols: dict[str, np.ndarray] = {}
        for i, name in enumerate(("prompt", "length", "mode", "phase", "step", "layer", "site", "path", "metric")):
            cols[name] = np.repeat(np.array([k[i] for k in self._keys]), counts)
        head = []
        for (*_, n, heads, h, per_head, _) in self._keys:
            if per_head:
                head.append(np.repeat(np.arange(per_head), n // per_head))
            else:
                head.append(np.arange(n) if heads else np.full(n, h))
        cols["head_index"] = np.concatenate(head).astype(np.int32)
        # the keys with an index took their elements from `elements` in order; the others are -1
        has_index = np.repeat(np.array([k[-1] for k in self._keys]), counts)
        cols["element"] = np.full(len(values), -1, dtype=np.int64)
        cols["element"][has_index] = elements
        for name in ("prompt", "length", "step", "layer"):
            cols[name] = cols[name].astype(np.int32)
        cols["value"] = values
        self._keys, self._values, self._elements = [], [], []
        return {name: cols[name] for name in COLUMNS}


def _to_host(tensors: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """One host array of tensors that live on the GPU(s): gathered on one device (a model split over GPUs records
    on each), concatenated there and copied once, instead of a synchronizing copy per tensor."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    return torch.cat([t.to(device=device, dtype=dtype) for t in tensors]).cpu().numpy()
