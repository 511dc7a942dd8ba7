"""Checks every HDF5 global heap collection before HDF5 parses it, because a damaged one can hang HDF5 forever.

Variable-length strings (every string attribute of a run file, the tables' ``__vocab`` columns) live in
HDF5's *global heap*: collections of objects, each collection stored as (all integers little-endian)::

    "GCOL", version 1, 3 reserved bytes, collection size S (8 bytes, S >= 4096, the header included)
    then objects: heap index (2 bytes), reference count (2), reserved (4), object size n (8), n data bytes
                  padded to a multiple of 8. Index 0 is the free space; its size counts its own header.

HDF5 (2.0 included) walks the objects with ``p = begin + need``, ``need`` being 16 + padded n, or n itself
for the free space, and checks neither ``need > 0`` nor ``p + need <= S``: a free-space object whose size
was damaged to 0 makes it loop forever at 100% CPU, inside C code holding the GIL, so that Ctrl-C cannot stop
it (``tests/data/damaged-attr-hangs-open_run.h5``); an oversized object makes it read out of bounds.

driftscope never lets HDF5 read a run file on its own: it reads through a Python file object (h5py's
``fileobj`` driver), and HDF5 reads a collection with a read that starts at the collection (its first 4096
bytes, then all S bytes if S is larger). ``check_read`` is called on every such read: it walks the
collection exactly as HDF5 will and raises ``RunFileError`` instead of returning bytes that would hang it.
A healthy collection costs one pass over at most a few hundred objects, once per open file.
"""
from __future__ import annotations

import struct

from .schema import RunFileError

MAGIC = b"GCOL\x01\x00\x00\x00"  # signature, version 1, reserved
MIN_SIZE = 4096  # H5HG_MINSIZE: HDF5 never writes a smaller collection
_HEADER = struct.Struct("<8sQ")
_OBJECT = struct.Struct("<HHIQ")  # index, reference count, reserved, size


def collection_problem(data, end: int) -> str | None:
    """What in this global heap collection would hang HDF5 or make it read out of bounds, or None.

    data: the bytes read at the collection's address (a start is enough when it is smaller than the
    collection: HDF5 reads the whole collection next). end: how many bytes the file holds from that address.
    """
    if len(data) < _HEADER.size or bytes(data[:8]) != MAGIC:
        return None  # not a collection (HDF5 refuses a bad signature or version itself)
    size = _HEADER.unpack_from(data, 0)[1]
    if size < MIN_SIZE:
        return f"its size {size} is below HDF5's minimum {MIN_SIZE}"
    if size > end:
        return f"its size {size} runs {size - end} bytes past the end of the file"
    if len(data) < size:
        return None  # the first read of a large collection: checked when HDF5 reads all of it
    p = _HEADER.size
    while p < size:
        if p + _OBJECT.size > size:
            break  # a tail too small for an object header is free space (as HDF5 reads it)
        index, _, _, n = _OBJECT.unpack_from(data, p)
        need = _OBJECT.size + -(-n // 8) * 8 if index else n
        if need == 0:
            return f"its free-space object at offset {p} has size 0 (HDF5 would loop forever on it)"
        if p + need > size:
            return (f"object {index} at offset {p} claims {n} bytes, past the collection's end at {size} "
                    f"(HDF5 would read out of bounds)")
        p += need
    return None


def check_read(data, addr: int, file_size: int, path: str) -> None:
    """Raises RunFileError if ``data``, read at byte ``addr`` of ``path`` (``file_size`` bytes long), is a
    collection HDF5 must not parse. Callers skip reads that do not start with b"GCOL" (nearly all of them)."""
    problem = collection_problem(data, file_size - addr)
    if problem is not None:
        raise RunFileError(f"{path} is damaged: the HDF5 global heap collection at byte {addr} (where HDF5 keeps "
                           f"variable-length strings) is corrupt: {problem}")
