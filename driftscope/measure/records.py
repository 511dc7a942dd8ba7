"""Long-form metric records, kept on the device until a prompt ends.

Each `add` stores one device tensor of values (one per head, channel or position; or a table of such rows, one
per metric) and the keys that label it. `columns()` moves everything to the host in a single copy and expands
the keys, giving the `metrics` table's columns (``store.schema.METRICS_COLUMNS``): prompt, length, mode, phase,
step, layer, head_index, site, path, metric, element, value.

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
from typing import Callable

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

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

    def add(self, layer: int, site: str, path: str, metric: str | tuple[str, ...], values: torch.Tensor, *,
            heads: bool = True, index: torch.Tensor | None = None, head: int = -1) -> None:
        """values: [n], or [heads, n] with `index`. heads=True: value i belongs to head i ([heads, n]: value [h, i]
        to head h at index[i]); heads=False: every value to `head`, value i at index[i].

        metric: one name, or a tuple of M names with values [M, n] (row m is metric m's values, as M calls with
        one name would record them, without `index`): one call for a table of statistics.

        (The keywords keep their short names: `head` fills the column head_index, `index` the column element.)
        Nothing is copied to the host here: values and indices stay where they are until `columns`."""
        if values.requires_grad:
            values = values.detach()
        metrics = metric if isinstance(metric, tuple) else (metric,)
        if len(metrics) > 1 and (index is not None or values.dim() != 2 or values.shape[0] != len(metrics)):
            raise ValueError(f"{len(metrics)} metrics take values [{len(metrics)}, n] and no index, "
                             f"found {tuple(values.shape)} with index={index is not None}")
        per_head = values.shape[0] if values.dim() == 2 and len(metrics) == 1 else 0
        n = values.numel() // len(metrics)
        c = self.context
        self._keys.append((c.prompt, c.length, c.mode, c.phase, c.step, layer, site, path, metrics,
                           n, heads, head, per_head, index is not None))
        self._values.append(values)
        if index is not None:  # (repeated per head on the host, in `columns`)
            self._elements.append(index.reshape(-1))

    def __len__(self) -> int:
        return sum(k[9] * len(k[8]) for k in self._keys)

    def columns(self) -> dict[str, np.ndarray]:
        """Everything added so far as table columns (one host copy of the values, one of the indices), then
        forget it. The copy is started first and the keys are expanded while it (and the GPU's queue) runs."""
        if not self._keys:
            return {name: np.zeros(0, dtype=METRICS_DTYPES[name] if METRICS_DTYPES[name] is not object else str)
                    for name in COLUMNS}
        values = _start_host_copy(self._values, torch.float64)
        elements = _start_host_copy(self._elements, torch.int64) if self._elements else None
        # one key per metric: a table's metrics took consecutive runs of n values
        keys = [(*k[:8], m, *k[9:]) for k in self._keys for m in k[8]]
        counts = np.array([k[9] for k in keys])
        cols: dict[str, np.ndarray] = {}
        for i, name in enumerate(("prompt", "length", "mode", "phase", "step", "layer", "site", "path", "metric")):
            cols[name] = np.repeat(np.array([k[i] for k in keys]), counts)
        head = []
        for (*_, n, heads, h, per_head, _) in keys:
            if per_head:
                head.append(np.repeat(np.arange(per_head), n // per_head))
            else:
                head.append(np.arange(n) if heads else np.full(n, h))
        cols["head_index"] = np.concatenate(head).astype(np.int32)
        has_index = np.repeat(np.array([k[-1] for k in keys]), counts)
        for name in ("prompt", "length", "step", "layer"):
            cols[name] = cols[name].astype(np.int32)
        cols["value"] = values()
        # the keys with an index took their elements from `elements` in order; the others are -1
        cols["element"] = np.full(len(cols["value"]), -1, dtype=np.int64)
        if elements is not None:
            # each index once per head of its [heads, n] values (per_head: k[12]), in the order they were added
            per_head = [k[12] for k in self._keys if k[-1]]
            flat, at, parts = elements(), 0, []
            for index, heads in zip(self._elements, per_head):
                parts.append(np.tile(flat[at:at + index.numel()], max(heads, 1)))
                at += index.numel()
            cols["element"][has_index] = np.concatenate(parts)
        self._keys, self._values, self._elements = [], [], []
        return {name: cols[name] for name in COLUMNS}


_NUMPY = {torch.float64: np.float64, torch.int64: np.int64}


def _start_host_copy(tensors: list[torch.Tensor], dtype: torch.dtype) -> Callable[[], np.ndarray]:
    """Start copying tensors that live on the GPU(s) into one host array of `dtype`; returns the function that
    waits for it and assembles the array.

    Records are mostly views of a few small tables (a site's drift table, its moments), so what is copied is each
    distinct table once, concatenated per dtype on one device (a model split over GPUs records on each), into
    pinned memory without blocking: no kernel per record (the GPU would wait for the host's launches), and the
    caller's host work overlaps the copy and the GPU's remaining queue. The views are cut out on the host."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    tables: dict = {}  # key -> (dtype, element offset in that dtype's concatenation)
    flat: dict = {}  # dtype -> [1-d tables], concatenated in this order
    filled: dict = {}  # dtype -> elements in its tables so far
    views = []  # per tensor: (dtype, element offset, numel, shape and strides or None where contiguous)
    for t in tensors:
        if t.dtype == torch.bfloat16:  # (numpy has no bfloat16)
            t = t.float()
        size = t.untyped_storage().nbytes() // t.element_size()
        whole = size <= 4 * t.numel() + 4096  # copy the view's whole storage (inference-mode views have no _base)
        key = (t.untyped_storage().data_ptr(), t.device, t.dtype) if whole else len(views)
        if key not in tables:  # else a view of something big: only its values
            table = (t.as_strided((size,), (1,), 0) if whole else t.reshape(-1)).to(device)
            tables[key] = (t.dtype, filled.get(t.dtype, 0))
            filled[t.dtype] = tables[key][1] + table.numel()
            flat.setdefault(t.dtype, []).append(table)
        dt, start = tables[key]
        layout = None if not whole or t.is_contiguous() else (t.shape, t.stride())
        views.append((dt, start + (t.storage_offset() if whole else 0), t.numel(), layout))
    hosts, done = {}, None
    for dt, tables_dt in flat.items():
        cat = torch.cat(tables_dt)
        hosts[dt] = torch.empty(cat.shape, dtype=dt, pin_memory=True).copy_(cat, non_blocking=True) \
            if device.type == "cuda" else cat
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))

    def wait() -> np.ndarray:
        if done is not None:
            done.synchronize()
        arrays = {dt: h.numpy() for dt, h in hosts.items()}
        out = np.empty(sum(n for _, _, n, _ in views), dtype=_NUMPY[dtype])
        at = 0
        for dt, start, n, layout in views:
            a = arrays[dt]
            if layout is None:
                out[at:at + n] = a[start:start + n]
            else:
                shape, strides = layout
                out[at:at + n] = as_strided(a[start:], shape, [s * a.itemsize for s in strides]).reshape(-1)
            at += n
        return out

    return wait
