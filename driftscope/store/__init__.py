"""Run files: one HDF5 file per run (schema in ``schema.py``), written by ``writer.py`` (GPU tensors staged in pinned
memory by ``staging.py``), read lazily by ``reader.py``, made crash-safe by ``journal.py``, guarded against HDF5
hanging on a damaged file by ``heapcheck.py``.

    with store.RunWriter("runs/a.h5", kind="capture", argv=argv, config=cfg, environment=env) as w: ...
    run = store.open_run("runs/a.h5")
"""
from .reader import Run, open_run
from .schema import (METRICS_COLUMNS, SCHEMA, SCHEMA_MAJOR, TENSOR_KEY, NotStoredError, OutputError, OutputExistsError,
                     RunFileError, RunFileNotFoundError, RunLockedError, StoreError)
from .writer import RunWriter

__all__ = ["Run", "open_run", "RunWriter", "METRICS_COLUMNS", "SCHEMA", "SCHEMA_MAJOR", "TENSOR_KEY", "NotStoredError",
           "OutputError", "OutputExistsError", "RunFileError", "RunFileNotFoundError", "RunLockedError", "StoreError"]
