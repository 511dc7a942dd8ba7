"""open_run on damaged, foreign and hostile files: one clear RunFileError, nothing from deep inside h5py."""
import os
import shutil

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from driftscope import store


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
    return p.read_bytes()


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
                f.attrs["schema"] = "driftscope/2"
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
        f.attrs["schema"] = "driftscope/2"
    with pytest.raises(store.RunFileError, match="reads 'driftscope/1'"):
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=damage)
def test_fuzz_damaged_copies(tmp_path, real, damage):
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
    p = tmp_path / "damaged.h5"
    p.write_bytes(bytes(data))
    try:
        read_everything(p)
    except store.RunFileError as e:
        assert str(p) in str(e)
