"""Undo journal that makes an HDF5 file survive SIGKILL at any instant.

HDF5 updates its metadata (superblock, object headers, B-trees, heaps) in place, so a process killed in the
middle of a write can leave a file that no longer opens. driftscope therefore never hands HDF5 the file
directly: h5py's ``fileobj`` driver talks to a :class:`JournaledFile`, which sees every byte HDF5 writes.

Protocol (the same idea as SQLite's rollback journal):

- A *commit* leaves the file in a state ``S`` that opens on its own (h5py ``flush()`` writes all metadata and
  truncates the file to its end of allocation). Its length is ``base``.
- Before any write or truncation touches a byte below ``base`` for the first time since the commit, the
  original bytes of the enclosing 4 KiB pages are appended to ``<file>-journal`` (offset, length, CRC32,
  bytes). Only then is the main file written. Writes at or beyond ``base`` (new chunks, new metadata: nearly
  all of a run's bytes, tensors included) need no copy, so a commit never copies the file.
- The commit point is truncating the journal to zero bytes, after the main file is flushed (and fsynced).
  A new header (magic, the file's run id, ``base``) is then written before HDF5 may write again.
- Recovery: if the journal's header is valid and its run id matches the file's user block, write every
  complete entry back and truncate the file to ``base``: that is exactly ``S``. A torn last entry is ignored
  (its main-file write had not started). No valid header means the file is at a commit already.

A kill loses the OS process, not the page cache, so completed ``write()`` calls are all there afterwards:
SIGKILL, OOM kills and crashes are covered. A power loss is covered only for data committed with fsync.
Readers never modify a file: :class:`RecoveredView` presents ``S`` by overlaying the journal's pages (and
checks every global heap collection HDF5 reads, see ``heapcheck.py``).

Writeback (with fsync on; durability still rests on the fsync at each commit alone). Every ``WRITEBACK_BYTES``
written, the file's dirty pages are sent to the disk (``sync_file_range``), so the disk writes while HDF5 goes on
filling the page cache, and the fsync at the next commit waits for the last few MiB only, not for everything
since the previous commit (a host with much memory would otherwise hold gigabytes in its page cache until
then). The bulk writes (tensor data) sent one round earlier are then waited for and dropped from the page cache,
as a streaming writer should: the next writes reuse those pages instead of growing the cache (on the 2-core VM
where it was measured, pwrite into a growing cache ran at 300 MB/s, into reused pages at 2 GB/s), and a capture
of many GB does not push everything else out of memory.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading
import zlib

from .heapcheck import check_read
from .schema import RunFileError

PAGE = 4096
MAGIC = b"DSJRNL01"
_HEADER = struct.Struct("<8s16sQI")  # magic, run_id, base length, crc32 of the first three fields
_ENTRY = struct.Struct("<QII")  # offset, length, crc32(offset, length, data)
USERBLOCK = 512  # the HDF5 user block, where the file's own header lives
FILE_MAGIC = b"driftscope run file\n"
WRITEBACK_BYTES = 64 << 20
BULK_BYTES = 1 << 20  # a write this large is raw data: HDF5 writes its metadata in small pieces
# linux/fs.h: wait for pages already under writeback, start writeback of the dirty ones, wait for those
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _sync_file_range():
    """libc's sync_file_range, or None where there is none (not Linux)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def journal_path(path: str) -> str:
    return os.fspath(path) + "-journal"


def userblock(run_id: bytes) -> bytes:
    """The file header written into HDF5's user block: a magic line, then the 16-byte run id."""
    head = FILE_MAGIC + run_id
    return head + b"\0" * (USERBLOCK - len(head))


def read_run_id(fd: int) -> bytes | None:
    head = os.pread(fd, len(FILE_MAGIC) + 16, 0)
    if len(head) == len(FILE_MAGIC) + 16 and head.startswith(FILE_MAGIC):
        return head[len(FILE_MAGIC):]
    return None


def read_journal(path: str, run_id: bytes | None) -> tuple[int, list[tuple[int, bytes]]] | None:
    """(base, [(offset, original bytes)]) of a hot journal for the file with ``run_id``, else None."""
    try:
        with open(journal_path(path), "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    if run_id is None or len(data) < _HEADER.size:
        return None
    magic, rid, base, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or rid != run_id or crc != zlib.crc32(data[: _HEADER.size - 4]):
        return None  # torn header (no main-file write happened since) or a stale journal of another file
    entries, pos = [], _HEADER.size
    while pos + _ENTRY.size <= len(data):
        off, n, crc = _ENTRY.unpack_from(data, pos)
        body = data[pos + _ENTRY.size: pos + _ENTRY.size + n]
        if len(body) != n or zlib.crc32(body, zlib.crc32(struct.pack("<QI", off, n))) != crc:
            break  # torn tail: its main-file write never started
        entries.append((off, body))
        pos += _ENTRY.size + n
    return base, entries


def recover(fd: int, path: str) -> bool:
    """Roll the file open on ``fd`` back to its last commit, in place. True if there was anything to undo."""
    hot = read_journal(path, read_run_id(fd))
    if hot is not None:
        base, entries = hot
        for off, body in entries:
            os.pwrite(fd, body, off)
        os.ftruncate(fd, base)
        os.fsync(fd)
    try:
        os.unlink(journal_path(path))
    except FileNotFoundError:
        pass
    return hot is not None


class JournaledFile:
    """A file object for h5py's ``fileobj`` driver that undo-logs every overwrite of committed bytes."""

    def __init__(self, fd: int, path: str, run_id: bytes, *, fsync: bool = True):
        self.fd, self.path, self.run_id, self.do_fsync = fd, os.fspath(path), run_id, fsync
        self.pos = 0
        self.base = None  # None: no journal (the file is not yet visible under its final name)
        self.jfd = None
        self.saved: set[int] = set()
        self.unsent = 0  # bytes written since writeback was last started
        self.bulk_new: list[tuple[int, int]] = []  # whole pages of bulk writes since then
        self.bulk_sent: list[tuple[int, int]] = []  # those of the round before, under writeback
        # A failed write is not reported to HDF5 (h5py's fileobj driver does not survive exceptions):
        # it is remembered here, every later write is dropped and commit() refuses. Rolling back is safe.
        self.failed: OSError | None = None
        self.lock = threading.RLock()

    # ---- the protocol
    def begin(self) -> None:
        """Start journaling against the current contents, which must be a committed state."""
        with self.lock:
            self.base = os.fstat(self.fd).st_size
            self.saved = set()
            self.unsent, self.bulk_new, self.bulk_sent = 0, [], []
            if self.jfd is None:
                self.jfd = os.open(journal_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(self.jfd, 0)
            head = MAGIC + self.run_id + struct.pack("<Q", self.base)
            os.pwrite(self.jfd, head + struct.pack("<I", zlib.crc32(head)), 0)

    def commit(self) -> None:
        """Declare the current contents (already flushed by h5py) committed, and start a new journal."""
        with self.lock:
            if self.failed is not None:
                raise self.failed
            if self.do_fsync:
                os.fsync(self.fd)
                self._drop(self.bulk_sent + self.bulk_new)  # on disk now
            if self.jfd is not None:
                os.ftruncate(self.jfd, 0)  # the commit point
            self.begin()

    def rollback(self) -> None:
        """Undo everything since the last commit (h5py must have closed the file first)."""
        with self.lock:
            if self.base is not None:
                recover(self.fd, self.path)
                self.failed = None
                self.jfd_close()
                self.begin()

    def jfd_close(self) -> None:
        if self.jfd is not None:
            os.close(self.jfd)
            self.jfd = None

    def finish(self) -> None:
        """After the final commit: remove the journal, leaving one plain .h5 file."""
        with self.lock:
            if self.do_fsync:
                os.fsync(self.fd)
            self.jfd_close()
            try:
                os.unlink(journal_path(self.path))
            except FileNotFoundError:
                pass
            self.base = None

    def _save(self, lo: int, hi: int) -> None:
        hi = min(hi, self.base)
        if lo >= hi:
            return
        pages = [p for p in range(lo // PAGE, (hi - 1) // PAGE + 1) if p not in self.saved]
        runs: list[list[int]] = []
        for p in pages:  # coalesce neighbouring pages into one entry
            if runs and runs[-1][1] == p:
                runs[-1][1] = p + 1
            else:
                runs.append([p, p + 1])
        os.lseek(self.jfd, 0, os.SEEK_END)
        for a, b in runs:
            off = a * PAGE
            body = os.pread(self.fd, min(b * PAGE, self.base) - off, off)
            crc = zlib.crc32(body, zlib.crc32(struct.pack("<QI", off, len(body))))
            os.write(self.jfd, _ENTRY.pack(off, len(body), crc) + body)
        self.saved.update(pages)

    # ---- the file-object interface h5py's fileobj driver uses
    def seek(self, off: int, whence: int = 0) -> int:
        with self.lock:
            self.pos = off if whence == 0 else self.pos + off if whence == 1 else os.fstat(self.fd).st_size + off
            return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        with self.lock:
            data = self.read(len(buf))
            buf[: len(data)] = data
            return len(data)

    def read(self, n: int = -1) -> bytes:
        with self.lock:
            if n is None or n < 0:
                n = max(os.fstat(self.fd).st_size - self.pos, 0)
            data = os.pread(self.fd, n, self.pos)
            if data[:4] == b"GCOL":  # resuming a damaged file must not hang either (see heapcheck)
                check_read(data, self.pos, os.fstat(self.fd).st_size, self.path)
            self.pos += len(data)
            return data

    def write(self, data) -> int:
        with self.lock:
            view = memoryview(data).cast("B")
            n = len(view)
            if self.failed is None:
                try:
                    if self.base is not None and self.pos < self.base:
                        self._save(self.pos, self.pos + n)
                    done = 0
                    while done < n:
                        done += os.pwrite(self.fd, view[done:], self.pos + done)
                except OSError as e:
                    self.failed = e
                else:
                    self._send(self.pos, n)
            self.pos += n
            return n

    def _send(self, off: int, n: int) -> None:
        """After a write of ``n`` bytes at ``off``: one round of writeback every WRITEBACK_BYTES (see Writeback).

        sync_file_range's errors are ignored: a failed write-out (EIO, ENOSPC) fails the fsync at the commit."""
        if not self.do_fsync or _SYNC_FILE_RANGE is None:
            return
        if n >= BULK_BYTES:
            self.bulk_new.append((-(-off // PAGE) * PAGE, (off + n) // PAGE * PAGE))  # pages it fills
        self.unsent += n
        if self.unsent < WRITEBACK_BYTES:
            return
        if self.bulk_sent:  # the last round's pages: written by now, or we wait (the disk sets the pace)
            lo, hi = min(r[0] for r in self.bulk_sent), max(r[1] for r in self.bulk_sent)
            _SYNC_FILE_RANGE(self.fd, lo, hi - lo, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                             | SYNC_FILE_RANGE_WAIT_AFTER)
            self._drop(self.bulk_sent)
        _SYNC_FILE_RANGE(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # 0, 0: the whole file
        self.unsent, self.bulk_sent, self.bulk_new = 0, self.bulk_new, []

    def _drop(self, ranges) -> None:
        """Drops clean pages from the page cache (dirty ones, e.g. rewritten since, stay)."""
        for lo, hi in ranges:
            if hi <= lo:
                continue  # (length 0 would mean: to the end of the file)
            try:
                os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):  # only advice: never worth failing a write (h5py can't take it)
                return

    def truncate(self, size: int | None = None) -> int:
        with self.lock:
            size = self.pos if size is None else size
            if self.failed is None:
                try:
                    if self.base is not None and size < self.base:
                        self._save(size, self.base)
                    os.ftruncate(self.fd, size)
                except OSError as e:
                    self.failed = e
            return size

    def flush(self) -> None:
        pass


class RecoveredView:
    """The read-only file object readers hand to HDF5: the file's last committed state.

    That is the file itself, with a hot journal's original pages overlaid (``entries``; none when the file is
    at a commit), cut at the committed length ``base``. Every read that starts a global heap collection is
    checked first (``heapcheck``): a damaged one raises ``RunFileError`` instead of hanging HDF5.
    """

    def __init__(self, fd: int, base: int, entries: list[tuple[int, bytes]] = (), path: str = "run file"):
        self.fd, self.base, self.entries, self.pos, self.path = fd, base, list(entries), 0, path
        self.damage: RunFileError | None = None  # kept: an h5py that swallowed the exception still reports it

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.base + off
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        lo = self.pos
        n = max(min(len(view), self.base - lo), 0)
        done = 0
        while done < n:  # straight into HDF5's buffer: no copy
            got = os.preadv(self.fd, [view[done:n]], lo + done)
            if got <= 0:
                view[done:n] = bytes(n - done)  # the file is shorter than its committed length
                break
            done += got
        for off, body in self.entries:
            a, b = max(lo, off), min(lo + n, off + len(body))
            if a < b:
                view[a - lo: b - lo] = body[a - off: b - off]
        if view[:4] == b"GCOL":
            try:
                check_read(view[:n], lo, self.base, self.path)
            except RunFileError as e:
                self.damage = e
                raise
        self.pos = lo + n
        return n

    def read(self, n: int = -1) -> bytes:
        n = max(self.base - self.pos, 0) if n is None or n < 0 else n
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def write(self, data):
        raise OSError("a recovered run file is read-only")

    def truncate(self, size=None):
        raise OSError("a recovered run file is read-only")

    def flush(self) -> None:
        pass
