"""open_run on damaged, foreign and hostile files: one clear RunFileError in bounded time, nothing from deep
inside h5py.

HDF5 can hang forever (at 100% CPU, in C code holding the GIL: no signal or Ctrl-C stops it) on a damaged file,
so every read of a damaged file here runs in a forked child with a time limit: a hang fails the test, it does
not hang the suite.
"""
import os
import pickle
import select
import signal
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_line_error
from hypothesis import HealthCheck, example, given, settings, strategies as st

from driftscope import store
from driftscope.store import heapcheck

HANGS = Path(__file__).parent / "data" / "damaged-attr-hangs-open_run.h5"  # see tests/data/README.md
TIME_LIMIT = 10  # seconds for one damaged file: reading the healthy one takes about 0.05


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A small but real run file written by the writer: two prompts, metrics and two tensors."""
    p = tmp_path_factory.mktemp("real") / "real.h5"
    with store.RunWriter(p, kind="capture", argv=["capture"], config={"seed": 0}, environment={}) as w:
        w.set_model({"name": "tiny", "n_layers": 2})
        for i in range(2):
            n = 3000
            w.add_prompt(i, np.arange(32) + i, "wiki")
            w.append("metrics", {"prompt": i, "layer": np.arange(n) % 2, "site": np.array(["q", "k"])[np.arange(n) % 2],
                                 "metric": "cos", "value": np.random.default_rng(i).standard_normal(n)})
            w.store_tensor(dict(prompt=i, layer=0, path="sage8", site="q"), np.ones((3, 32, 8)) * i)
            w.commit_prompt(i)
    return FileBytes(p.read_bytes())


class FileBytes(bytes):
    """The file's bytes, shown short in hypothesis' report of a failing example."""

    def __repr__(self):
        return f"<the {len(self)} bytes of the real run file>"


def read_everything(path):
    with store.open_run(path) as run:
        run.model, run.status, run.config
        run.prompts()
        for i in run.prompts()["index"]:
            run.prompt_tokens(i)
        for t in run.tables():
            run.table(t)
        run.metrics(site="q")
        for k in run.tensors().to_dict("records")[:4]:
            k.pop("shape")
            run.activations(**k)


def bounded(fn, *args, limit: float = TIME_LIMIT):
    """fn(*args) in a forked child: its return value, or the exception it raised (pickled back).

    Fails the test if the child runs past ``limit`` seconds (it is killed) or dies without answering (a
    crash inside HDF5)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        code = 0
        try:
            os.close(r)
            try:
                out = ("ok", fn(*args))
            except Exception as e:
                out = ("raised", e)
            try:
                data = pickle.dumps(out)
            except Exception:
                data = pickle.dumps(("raised", RuntimeError(f"unpicklable {out[0]} {type(out[1]).__name__}: "
                                                              f"{out[1]}")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks = []
        while True:
            ready, _, _ = select.select([r], [], [], limit)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"{fn.__name__}{args} ran past {limit} s: a hang, killed")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        pytest.fail(f"{fn.__name__}{args} died without answering (wait status {status}): a crash inside HDF5?")
    how, value = pickle.loads(b"".join(chunks))
    if how == "raised":
        raise value
    return value


def read_damaged(path):
    """read_everything on a damaged file, in bounded time: it reads, or raises one RunFileError naming it."""
    try:
        bounded(read_everything, path)
    except store.RunFileError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return e
    return None


def test_real_file_reads(tmp_path, real):
    """The undamaged file reads back exactly what the writer wrote (the baseline the damage tests start from)."""
    p = tmp_path / "r.h5"
    p.write_bytes(real)
    read_everything(p)
    with store.open_run(p) as run:
        assert run.status == "complete" and run.kind == "capture" and run.config == {"seed": 0}
        assert run.model["name"] == "tiny" and list(run.prompts()["index"]) == [0, 1]
        assert np.array_equal(run.prompt_tokens(1), np.arange(32) + 1)
        metrics = run.table("metrics")
        assert len(metrics) == 6000
        for i in range(2):
            rows = metrics[metrics["prompt"] == i]
            assert np.array_equal(rows["value"].to_numpy(), np.random.default_rng(i).standard_normal(3000))
            assert np.array_equal(run.activations(prompt=i, layer=0, path="sage8", site="q"), np.ones((3, 32, 8)) * i)


@pytest.mark.parametrize("case,match", [
    ("empty", "empty"), ("text", "not an HDF5 file"), ("truncated", "truncated or damaged"),
    ("directory", "directory"), ("foreign", "not a driftscope run file"), ("wrongschema", "not a driftscope"),
    ("newer", "newer driftscope"), ("nostructure", "missing"), ("badjson", "not a JSON"),
])
def test_hostile_files(tmp_path, real, case, match):
    p = tmp_path / "x.h5"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "text":
        p.write_text("prompt,layer\n0,1\n")
    elif case == "truncated":
        p.write_bytes(real[: len(real) // 3])
    elif case == "directory":
        p.mkdir()
    elif case == "foreign":
        with h5py.File(p, "w") as f:
            f["data"] = np.arange(3)
    else:
        p.write_bytes(real)
        with h5py.File(p, "r+") as f:
            if case == "wrongschema":
                f.attrs["schema"] = "someoneelse/1"
            elif case == "newer":
                f.attrs["schema"] = f"driftscope/{store.SCHEMA_MAJOR + 1}"
            elif case == "nostructure":
                del f["tables"]
            elif case == "badjson":
                f.attrs["config"] = "[not json"
    with pytest.raises(store.RunFileError, match=match) as e:
        store.open_run(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.open_run(tmp_path / "nope.h5")
    with pytest.raises(store.RunFileError):
        store.open_run(tmp_path / "nope.h5")


def test_newer_schema_names_supported_version(tmp_path, real):
    p = tmp_path / "n.h5"
    p.write_bytes(real)
    with h5py.File(p, "r+") as f:
        f.attrs["schema"] = f"driftscope/{store.SCHEMA_MAJOR + 1}"
    with pytest.raises(store.RunFileError, match=f"reads '{store.SCHEMA}'"):
        store.open_run(p)


def test_reading_never_writes(tmp_path, real):
    p = tmp_path / "r.h5"
    p.write_bytes(real)
    os.chmod(p, 0o444)
    before = p.read_bytes()
    read_everything(p)
    assert p.read_bytes() == before


damage = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 4096)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
), min_size=1, max_size=4)


def free_space_size_offset(data: bytes) -> int:
    """Where the size of the free-space object of the file's first global heap collection is stored."""
    at = data.index(b"GCOL")
    size, p = struct.unpack_from("<Q", data, at + 8)[0], 16
    while p + 16 <= size:
        index, n = struct.unpack_from("<H", data, at + p)[0], struct.unpack_from("<Q", data, at + p + 8)[0]
        if index == 0:
            return at + p + 8
        p += 16 + -(-n // 8) * 8
    raise AssertionError("the first global heap collection has no free-space object")


# The byte damage that hung open_run when the fuzz test found it (tests/data/damaged-attr-hangs-open_run.h5):
# zeroing two bytes zeroes the size of the free-space object of the global heap collection holding the root
# attributes. Kept as the fuzz test's explicit example; test_hang_example_hits_the_heap checks it still does.
# (Moved from 1763.5 / (171814 - 1) when tensors became uncompressed and contiguous by default.)
HANG_DAMAGE = [("zero", 1755.5 / (168445 - 1), 2)]


def damaged(real: bytes, damage) -> bytes:
    data = bytearray(real)
    for how, where, arg in damage:
        at = int(where * max(len(data) - 1, 0))
        if how == "flip":
            if data:
                data[at] ^= arg
        elif how == "zero":
            data[at: at + arg] = bytes(len(data[at: at + arg]))
        else:
            del data[at:]
    return bytes(data)


def test_hang_file_is_one_clear_error():
    """The file that hung open_run, summary and figures forever: a RunFileError naming the damage, at once."""
    e = read_damaged(HANGS)
    assert e is not None and "global heap" in str(e) and "size 0" in str(e)
    with pytest.raises(store.RunFileError, match="global heap collection at byte 691"):
        store.open_run(HANGS)  # in this process too: the check runs before HDF5 parses the collection


def test_hang_file_cli(run_cli, tmp_path):
    for module, *args in (("summary",), ("figures", "--out", str(tmp_path / "figs"))):
        proc = run_cli(module, str(HANGS), *args, timeout=300)
        proc.stderr = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert_one_line_error(proc, str(HANGS), "is damaged", "global heap")


def test_hang_example_hits_the_heap(real):
    """HANG_DAMAGE still zeroes the free-space size on today's fixture (update it if the layout moved)."""
    at = free_space_size_offset(real)
    assert int(HANG_DAMAGE[0][1] * (len(real) - 1)) == at and real[at + 2:at + 8] == bytes(6)
    assert "size 0" in heapcheck.collection_problem(damaged(real, HANG_DAMAGE)[real.index(b"GCOL"):], len(real))


@pytest.mark.parametrize("size,match", [(0, "size 0"), (1 << 40, "past the collection's end")])
def test_damaged_heap_objects(tmp_path, real, size, match):
    """Global heap damage that would hang HDF5 or make it read out of bounds is refused before HDF5 sees it."""
    data = bytearray(real)
    at = free_space_size_offset(real)
    data[at:at + 8] = struct.pack("<Q", size)
    p = tmp_path / "heap.h5"
    p.write_bytes(bytes(data))
    e = read_damaged(p)
    assert e is not None and match in str(e)


@pytest.mark.parametrize("size,match", [(16, "below HDF5's minimum"), (1 << 50, "past the end of the file")])
def test_damaged_heap_size(tmp_path, real, size, match):
    data = bytearray(real)
    at = real.index(b"GCOL") + 8
    data[at:at + 8] = struct.pack("<Q", size)
    p = tmp_path / "heap.h5"
    p.write_bytes(bytes(data))
    e = read_damaged(p)
    assert e is not None and match in str(e)


def test_resume_of_the_hang_file_is_refused(tmp_path):
    p = tmp_path / "hangs.h5"
    p.write_bytes(HANGS.read_bytes())

    def resume():
        store.RunWriter(p, kind="capture", argv=["capture"], config={"seed": 0}, environment={}, resume=True)

    with pytest.raises(store.RunFileError, match="global heap"):
        bounded(resume)


# Derandomized: every run tries the same examples (CI never hangs "only sometimes"); each example reads in a
# forked child with a time limit, so a hang fails the test instead of hanging it.
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=damage)
@example(damage=HANG_DAMAGE)
def test_fuzz_damaged_copies(tmp_path, real, damage):
    p = tmp_path / "damaged.h5"
    p.write_bytes(damaged(real, damage))
    read_damaged(p)
