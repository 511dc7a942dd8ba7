"""The HDF5 schema ``driftscope/2`` of run files: layout, names, keys and errors (writer.py writes it, reader.py reads it).

One run is one ``.h5`` file. Layout (every string attribute is UTF-8; JSON attributes are JSON text)::

    bytes 0-511         HDF5 user block: b"driftscope run file\\n" + the 16-byte run id, zero padded
    /  attrs
      schema              "driftscope/2". A reader refuses a newer major version and reads every older one
                          (see Versions).
      driftscope_version  the writer's driftscope.__version__
      kind                "capture" | "evaluate" | "bench"
      run_id              hex of the run id in the user block (it ties the crash journal to this file)
      argv                JSON list of str: the command line that started the run
      config              JSON object: the validated configuration; --resume requires an equal one
      environment         JSON object: torch/transformers/sageattention/triton versions, device, ...
      created             ISO-8601 UTC time the run started
      status              "running" while written, then "complete" or "interrupted" (see Status)
      closed              ISO-8601 UTC time of the last close, "" before
      resumed             JSON list of {"argv": [...], "time": ISO}, one per resume
      storage             JSON object: {"tensor_compression": null (the default), "lzf" or "gzip",
                          "table_compression": "lzf"}
    /model  attrs         one per key of set_model(): name, source, sha256 or revision, dtype, n_layers,
                          n_heads, n_kv_heads, head_dim, ...; str/int/float/bool natively, anything else as
                          JSON text whose key is listed in the JSON attr "json_keys"
    /prompts/<index:06d>  int dataset [tokens]: the prompt's token ids.
                          attrs: index (int), source (str), complete (bool: committed by commit_prompt)
    /tables/<name>        one long-form table, e.g. "metrics" (one row per measurement; capture runs) with the
                          columns METRICS_COLUMNS: prompt, length, mode, phase, step, layer, head_index, site,
                          path, metric, element, value (their meaning is in driftscope/measure/records.py).
                          attrs: columns (JSON list, column order), n_rows (int: committed rows)
      <column>            1-D [n_rows], chunked (64k rows), lzf + shuffle + fletcher32. Numeric columns keep
                          the dtype of their first append. String columns hold int32 codes, attr
                          encoding="vocab", and code i means row i of
      <column>__vocab     1-D variable-length UTF-8 strings (never pickled objects).
    /tensors/p<prompt:05d>/<mode>/<phase>/s<step:05d>/l<layer:03d>/<path>/<site>/t<token_start:07d>
                          float16 full tensor as stored, e.g. q/k/v/attn_out [heads, tokens, head_dim] or
                          resid [tokens, hidden]. Uncompressed (the default): contiguous, no checksum. With
                          tensor_compression: chunked along the token axis (about 4 MiB a chunk, one chunk
                          spans every other axis), lzf or gzip + fletcher32. attrs: key (JSON of the key
                          dict), token_axis (int: ndim-2, or 0 for 1-D). Files of either layout read the same.

Compression: measured on SmolLM2-135M activations (fp16 [30, 2048, 576], 2 CPU cores, h5py 3.16/HDF5 2.0):
lzf 143 MB/s (ratio 1.00), gzip-1 37 MB/s (1.07), shuffle+gzip-1 44 MB/s (1.13), none 4,000 MB/s.
float16 activations are close to incompressible, so tensors are stored uncompressed by default
(``RunWriter(tensor_compression=None)``): HDF5 runs filters on one thread, and lzf (the faster filter, 3.5x
gzip-1) wrote 102 MB/s on an H100 host whose disk takes 1.9 GB/s. Uncompressed tensors are contiguous
datasets, each handed to the file in one write from the host copy: chunking them would add a copy per chunk
and a fletcher32 pass, which alone ran at 0.6 GB/s on 2 CPU cores. experiments/bench_storage.py measures the
writer: uncompressed 1.6 GB/s from GPU tensors on an H200 host, 96-115% of its `dd oflag=direct`.

Versions. driftscope/1 named two metrics columns ``head`` and ``index``, which clash with pandas' ``DataFrame.head``
and ``DataFrame.index``; driftscope/2 names them ``head_index`` and ``element`` (nothing else changed). Readers
return the new names for files of either version (``RENAMED``); a resumed driftscope/1 file keeps its own names
on disk, so that each file stays one version. A driftscope that reads only driftscope/1 refuses a driftscope/2
file with a clear "upgrade driftscope" error instead of failing later on a missing ``head`` column.

Status. ``status`` is "running" from the start; ``close()`` sets "complete", or "interrupted" when the
writer exits by an exception (KeyboardInterrupt too) or a write error. A killed writer leaves "running":
readers report such a file (its writer no longer holds the lock) as status "interrupted", finished False.

Crash safety. Every commit (``commit_prompt``) leaves a file state that opens on its own; the writer's
undo journal ``<file>-journal`` (see ``journal.py``) lets that state be restored after a kill at any
instant. Readers overlay the journal (they never write); ``RunWriter(resume=True)`` rolls the file back,
keeps every committed prompt and continues. A clean close removes the journal: one plain .h5 file remains.
Rows and tensors appended for a prompt become durable only at its ``commit_prompt`` (which commits
everything appended since the previous commit: write one prompt at a time).

Damaged files. HDF5 never reads a run file by itself: readers (and a resuming writer) hand it a Python file
object that checks every global heap collection before HDF5 parses it (``heapcheck.py``), because a damaged
one makes HDF5 loop forever; any damage is one ``RunFileError`` naming the file.
"""
from __future__ import annotations

import datetime
import json
import re

import h5py
import numpy as np

from driftscope import errors
from driftscope.errors import DriftscopeError

SCHEMA = "driftscope/2"
SCHEMA_MAJOR = 2
# The metrics table of a capture run: its columns in order and the dtypes driftscope writes them with
# (strings are stored as vocab codes and read back as str).
METRICS_COLUMNS = ("prompt", "length", "mode", "phase", "step", "layer", "head_index", "site", "path", "metric",
                   "element", "value")
METRICS_DTYPES = {"prompt": np.int32, "length": np.int32, "mode": object, "phase": object, "step": np.int32,
                  "layer": np.int32, "head_index": np.int32, "site": object, "path": object, "metric": object,
                  "element": np.int64, "value": np.float64}
# Columns an older major version stored under another name: {major: {table: {stored name: name read}}}.
RENAMED = {1: {"metrics": {"head": "head_index", "index": "element"}}}
KINDS = ("capture", "evaluate", "bench")
LIBVER = ("v108", "v108")  # 1.8 file format: checksummed object headers, readable by any HDF5 >= 1.8
TABLE_CHUNK = 65536
TENSOR_CHUNK_BYTES = 4 << 20
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PART = re.compile(r"^[A-Za-z0-9_+-]+$")
TENSOR_KEY = ("prompt", "mode", "phase", "step", "layer", "path", "site", "token_start")


class StoreError(DriftscopeError):
    """A run file cannot be written as asked."""


class OutputExistsError(StoreError, errors.OutputExistsError):
    """The run file exists; it is replaced only with --overwrite (or continued with --resume)."""


class RunLockedError(StoreError):
    pass


class OutputError(StoreError, errors.OutputError):
    """The run file cannot be created or written where asked."""


class RunFileError(DriftscopeError, ValueError):
    """A file that cannot be read as a driftscope run: damaged, truncated, foreign or of a newer schema."""


class RunFileNotFoundError(RunFileError, FileNotFoundError):
    pass


class NotStoredError(DriftscopeError, KeyError):
    """What was asked for (a table, a column, a prompt, activations) is not in the run file."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def tensor_name(key: dict) -> str:
    """The HDF5 path of the tensor with this (complete, validated) key."""
    k = key
    return (f"tensors/p{k['prompt']:05d}/{k['mode']}/{k['phase']}/s{k['step']:05d}/l{k['layer']:03d}/"
            f"{k['path']}/{k['site']}/t{k['token_start']:07d}")


def check_key(key: dict) -> dict:
    k = {"mode": "propagated", "phase": "prefill", "step": 0, "token_start": 0, **key}
    bad = set(k) - set(TENSOR_KEY)
    missing = [f for f in TENSOR_KEY if f not in k]
    if bad or missing:
        raise StoreError(f"tensor key {key!r}: unknown fields {sorted(bad)}, missing fields {missing}; "
                         f"a key has {', '.join(TENSOR_KEY)}")
    for f in ("prompt", "step", "layer", "token_start"):
        if not isinstance(k[f], (int, np.integer)) or isinstance(k[f], bool) or k[f] < 0:
            raise StoreError(f"tensor key field {f}={k[f]!r} must be a non-negative int")
        k[f] = int(k[f])
    for f in ("mode", "phase", "path", "site"):
        if not isinstance(k[f], str) or not PART.match(k[f]):
            raise StoreError(f"tensor key field {f}={k[f]!r} must be a non-empty str of letters, digits, _+-")
    return k


def str_attr(attrs, name: str, path: str) -> str:
    v = attrs[name] if name in attrs else None
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if not isinstance(v, str):
        raise RunFileError(f"{path} is not a valid driftscope run file: root attribute {name!r} is "
                           f"{'missing' if v is None else 'not a string'}")
    return v


def renamed_columns(major: int, table: str) -> dict[str, str]:
    """{stored name: name readers return} for the columns of ``table`` in a file of schema major ``major``."""
    out: dict[str, str] = {}
    for m in sorted(RENAMED, reverse=True):  # newest rename first, so chains of renames compose
        if major <= m:
            for old, new in RENAMED[m].get(table, {}).items():
                out[old] = out.get(new, new)
    return out


def check_root(h5: h5py.File, path: str) -> dict:
    """Validates the schema and the root of a run file; returns its decoded root attributes."""
    if "schema" not in h5.attrs:
        raise RunFileError(f"{path} is an HDF5 file but not a driftscope run file (no 'schema' attribute)")
    schema = str_attr(h5.attrs, "schema", path)
    m = re.fullmatch(r"driftscope/(\d+)", schema)
    if m is None:
        raise RunFileError(f"{path} is not a driftscope run file (schema {schema!r}, expected {SCHEMA!r})")
    if int(m.group(1)) > SCHEMA_MAJOR:
        raise RunFileError(f"{path} has schema {schema!r}, written by a newer driftscope; this driftscope "
                           f"reads {SCHEMA!r}: upgrade driftscope to read it")
    root = {"schema": schema, "major": int(m.group(1))}
    for name in ("kind", "status", "created", "driftscope_version"):
        root[name] = str_attr(h5.attrs, name, path)
    for name, typ in (("argv", list), ("config", dict), ("environment", dict)):
        try:
            root[name] = json.loads(str_attr(h5.attrs, name, path))
        except ValueError:
            root[name] = None
        if not isinstance(root[name], typ):
            raise RunFileError(f"{path} is damaged: root attribute {name!r} is not a JSON {typ.__name__}")
    for g in ("model", "prompts", "tables", "tensors"):
        if not isinstance(h5.get(g), h5py.Group):
            raise RunFileError(f"{path} is not a valid driftscope run file: group /{g} is missing")
    return root
