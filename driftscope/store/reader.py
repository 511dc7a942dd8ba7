"""The lazy reader of driftscope run files (layout in ``schema.py``).

    run = open_run("runs/smollm2.h5")
    df = run.metrics(site="q", path=["sage8"])      # tidy long-form DataFrame
    a_HxTxD = run.activations(prompt=0, layer=3, path="sage8", site="q")

Nothing is read until asked for. Reading never writes the file, unpickles or executes anything: strings are
UTF-8 attributes and datasets, tables are numeric arrays. Every problem with the file itself (truncated,
damaged, foreign, newer schema) raises one ``RunFileError`` naming the path; asking for something the file
does not hold raises ``NotStoredError`` (a KeyError) listing what it does hold.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import json
import os
import re
import weakref

import h5py
import numpy as np
import pandas as pd

from .journal import RecoveredView, read_journal, read_run_id
from .schema import (METRICS_COLUMNS, METRICS_DTYPES, TENSOR_KEY, NotStoredError, RunFileError, RunFileNotFoundError,
                     StoreError, check_key, check_root, renamed_columns, tensor_name)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_TENSOR_PARTS = re.compile(r"^p(\d+)/([^/]+)/([^/]+)/s(\d+)/l(\d+)/([^/]+)/([^/]+)/t(\d+)$")


def _guard(method):
    """Turns any failure inside h5py/numpy on this file into one RunFileError naming the path."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RunFileError, NotStoredError, StoreError):
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, OverflowError,
                AttributeError, MemoryError, SystemError) as e:
            if self._view is not None and self._view.damage is not None:
                raise self._view.damage from None
            raise RunFileError(f"{self.path} is damaged: reading it failed in {method.__name__}() "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return wrapper


_OPEN_RUNS: "weakref.WeakSet[Run]" = weakref.WeakSet()


@atexit.register
def _close_open_runs() -> None:
    """Runs left open at exit are closed first: h5py must not finalize a file-object file during shutdown."""
    for run in list(_OPEN_RUNS):
        run.close()


def open_run(path) -> "Run":
    """Opens a run file for reading: validates it first, reads the rest lazily."""
    return Run(path)


class Run:
    """A driftscope run file opened for reading. Also a context manager."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._h5 = None
        self._fd = None
        self._view = None
        p = self.path
        if not os.path.lexists(p):
            raise RunFileNotFoundError(f"{p} does not exist; give the path of a run file written by driftscope")
        if os.path.isdir(p):
            raise RunFileError(f"{p} is a directory, not a driftscope run file")
        try:
            self._fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            raise RunFileError(f"{p} cannot be read ({e.strerror})") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        _OPEN_RUNS.add(self)

    def _open(self) -> None:
        p, fd = self.path, self._fd
        size = os.fstat(fd).st_size
        if size == 0:
            raise RunFileError(f"{p} is empty (0 bytes), not a driftscope run file")
        if HDF5_SIGNATURE not in (os.pread(fd, 8, 0), os.pread(fd, 8, 512)):
            raise RunFileError(f"{p} is not an HDF5 file, so not a driftscope run file")
        # HDF5 reads through a file object, never the path: it sees the last committed state (a journal the
        # writer left is overlaid) and every global heap collection is checked before HDF5 parses it, since a
        # damaged one hangs HDF5 (see heapcheck.py).
        base, entries = read_journal(p, read_run_id(fd)) or (size, [])
        self._view = RecoveredView(fd, base, entries, path=p)
        try:
            self._h5 = h5py.File(self._view, "r")
        except RunFileError:
            raise
        except Exception as e:
            if self._view.damage is not None:
                raise self._view.damage from None
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RunFileError(f"{p} cannot be opened as HDF5; it is truncated or damaged ({msg})") from None
        try:
            root = check_root(self._h5, p)
        except RunFileError:
            raise
        except Exception as e:
            if self._view.damage is not None:
                raise self._view.damage from None
            raise RunFileError(f"{p} is damaged: its root cannot be read ({type(e).__name__}: {e})") from None
        self.schema, self.kind, self.created = root["schema"], root["kind"], root["created"]
        self.schema_major = root["major"]
        self.driftscope_version = root["driftscope_version"]
        self.argv, self.config, self.environment = root["argv"], root["config"], root["environment"]
        self.stored_status = root["status"]
        if self.stored_status not in ("running", "complete", "interrupted"):
            raise RunFileError(f"{p} is damaged: status {self.stored_status!r} is not running, complete or "
                               f"interrupted")
        self.writer_alive = self._writer_alive()
        self.finished = self.stored_status == "complete"
        # a 'running' file whose writer is gone was killed: report it as interrupted
        self.status = ("running" if self.writer_alive else "interrupted") if self.stored_status == "running" \
            else self.stored_status

    def _writer_alive(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def __repr__(self):
        return f"<driftscope run {self.path!r}: {self.kind}, {self.status}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        _OPEN_RUNS.discard(self)
        if self._h5 is not None:
            try:
                self._h5.close()
            except Exception:
                pass
            self._h5 = None
        self._view = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _need_open(self):
        if self._h5 is None:
            raise RunFileError(f"{self.path} is closed; open it again with open_run()")
        return self._h5

    def _read(self, ds, sel=()):
        """Reads a dataset, refusing one whose shape claims more than the file could possibly hold."""
        if ds.nbytes > (1 << 34) and ds.nbytes > 2000 * os.fstat(self._fd).st_size:
            raise RunFileError(f"{self.path} is damaged: {ds.name} claims {ds.nbytes} bytes")
        return ds[sel]

    # ---------------------------------------------------------------- metadata
    @property
    @_guard
    def model(self) -> dict:
        g = self._need_open()["model"]
        js = json.loads(g.attrs["json_keys"]) if "json_keys" in g.attrs else []
        out = {}
        for k, v in g.attrs.items():
            if k == "json_keys":
                continue
            v = v.decode("utf-8") if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
            out[k] = json.loads(v) if k in js else v
        return out

    @_guard
    def prompts(self) -> pd.DataFrame:
        """One row per stored prompt: index, source, length, complete (committed before the run stopped)."""
        rows = []
        for name, ds in self._need_open()["prompts"].items():
            rows.append({"index": int(ds.attrs["index"]), "source": str(ds.attrs["source"]),
                         "length": int(ds.shape[0]), "complete": bool(ds.attrs["complete"])})
        df = pd.DataFrame(rows, columns=["index", "source", "length", "complete"])
        df = df.astype({"index": np.int64, "source": str, "length": np.int64, "complete": bool})
        return df.sort_values("index", ignore_index=True)

    @_guard
    def prompt_tokens(self, index: int) -> np.ndarray:
        g = self._need_open()["prompts"]
        name = f"{int(index):06d}"
        if name not in g:
            raise NotStoredError(f"{self.path} holds no prompt {index}; it holds prompts "
                                 f"{sorted(int(n) for n in g)}")
        return self._read(g[name])

    # ---------------------------------------------------------------- tables
    @_guard
    def tables(self) -> list[str]:
        return sorted(self._need_open()["tables"])

    def metrics(self, **filters) -> pd.DataFrame:
        """The metrics table as one tidy DataFrame (columns ``METRICS_COLUMNS``); filters as in ``table``.
        A capture run that finished no prompt has no metrics table: its metrics are an empty DataFrame."""
        return self.table("metrics", **filters)

    @_guard
    def table(self, name: str, **filters) -> pd.DataFrame:
        """A long-form table. ``column=value`` keeps equal rows, ``column=[v1, v2]`` rows in the list.
        Columns an older schema named differently come back under their current names (schema.py, Versions)."""
        tables = self._need_open()["tables"]
        if name == "metrics" and name not in tables and self.kind == "capture":
            return self._no_metrics(filters)
        if name not in tables:
            raise NotStoredError(f"{self.path} holds no table {name!r}; it holds {sorted(tables) or 'none'}")
        g = tables[name]
        stored = json.loads(g.attrs["columns"])
        n = int(g.attrs["n_rows"])
        if not isinstance(stored, list) or not all(isinstance(c, str) for c in stored) or n < 0:
            raise RunFileError(f"{self.path} is damaged: table {name!r} has bad columns or n_rows")
        renamed = renamed_columns(self.schema_major, name)
        cols = [renamed.get(c, c) for c in stored]
        stored_name = dict(zip(cols, stored))
        for c in filters:
            if c not in cols:
                raise NotStoredError(f"table {name!r} of {self.path} has no column {c!r}; its columns are "
                                     f"{', '.join(cols)}")
        cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

        def column(c):
            if c not in cache:
                c_stored = stored_name[c]
                ds = g[c_stored]
                if ds.ndim != 1 or ds.shape[0] < n:
                    raise RunFileError(f"{self.path} is damaged: column {name}.{c} has shape {ds.shape}, "
                                       f"table has {n} rows")
                a = self._read(ds, slice(0, n))
                vocab = None
                if ds.attrs.get("encoding", "") == "vocab":
                    vocab = np.asarray(g[f"{c_stored}__vocab"].asstr()[()], dtype=object)
                    if a.dtype.kind not in "iu" or (n and (a.min() < 0 or a.max() >= len(vocab))):
                        raise RunFileError(f"{self.path} is damaged: codes of {name}.{c} are out of range")
                cache[c] = (a, vocab)
            return cache[c]

        mask = None
        for c, want in filters.items():
            want = list(want) if isinstance(want, (list, tuple, set, frozenset, np.ndarray, pd.Series)) else [want]
            a, vocab = column(c)
            if vocab is not None:
                want = [i for i, v in enumerate(vocab) if v in set(map(str, want))]
            m = np.isin(a, want)
            mask = m if mask is None else mask & m
        out = {}
        for c in cols:
            a, vocab = column(c)
            if mask is not None:
                a = a[mask]
            out[c] = vocab[a] if vocab is not None else a
        return pd.DataFrame(out, columns=cols)

    def _no_metrics(self, filters: dict) -> pd.DataFrame:
        for c in filters:
            if c not in METRICS_COLUMNS:
                raise NotStoredError(f"table 'metrics' of {self.path} has no column {c!r}; its columns are "
                                     f"{', '.join(METRICS_COLUMNS)}")
        return pd.DataFrame({c: np.zeros(0, dtype=METRICS_DTYPES[c]) for c in METRICS_COLUMNS})

    # ---------------------------------------------------------------- tensors
    @_guard
    def tensors(self) -> pd.DataFrame:
        """One row per stored tensor: prompt, mode, phase, step, layer, path, site, token_start, shape."""
        rows = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                m = _TENSOR_PARTS.match(name)
                if m is None:
                    raise RunFileError(f"{self.path} is damaged: unexpected object /tensors/{name}")
                p, mode, phase, step, layer, path, site, start = m.groups()
                rows.append({"prompt": int(p), "mode": mode, "phase": phase, "step": int(step),
                             "layer": int(layer), "path": path, "site": site, "token_start": int(start),
                             "shape": tuple(obj.shape)})

        self._need_open()["tensors"].visititems(visit)
        return pd.DataFrame(rows, columns=list(TENSOR_KEY) + ["shape"])

    @_guard
    def activations(self, prompt: int, layer: int, path: str, site: str, mode: str = "propagated",
                    phase: str = "prefill", step: int = 0, token_start: int | None = None) -> np.ndarray:
        """A stored float16 tensor (e.g. q: [heads, tokens, head_dim]). With several token ranges stored and
        no ``token_start``, they are concatenated along the token axis in order."""
        key = {"prompt": prompt, "layer": layer, "path": path, "site": site, "mode": mode, "phase": phase,
               "step": step, "token_start": token_start or 0}
        try:
            k = check_key(key)
        except StoreError as e:
            raise NotStoredError(str(e)) from None
        group = tensor_name(k).rsplit("/", 1)[0]
        h5 = self._need_open()
        g = h5.get(group)
        names = sorted(g) if isinstance(g, h5py.Group) else []
        if token_start is not None:
            names = [n for n in names if n == f"t{token_start:07d}"]
        if not names:
            listing = self.tensors()
            shown = listing.drop(columns="shape").head(20).to_dict("records")
            raise NotStoredError(f"{self.path} holds no activations for {k}; it holds {len(listing)} tensors"
                                 f"{': ' + str(shown) if shown else ''}")
        parts = []
        for n in names:
            ds = g[n]
            if not isinstance(ds, h5py.Dataset) or ds.dtype != np.float16:
                raise RunFileError(f"{self.path} is damaged: {ds.name} is not a float16 tensor")
            parts.append(self._read(ds))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=int(g[names[0]].attrs.get("token_axis", 0)))
