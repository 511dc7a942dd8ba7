"""Run files: write, reopen, resume, refuse to clobber, lock, and report output errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from driftscope import store

ENV = {"torch": "test"}


def writer(path, **kw):
    kw.setdefault("config", {"paths": ["fp16", "sage8"], "seed": 0})
    return store.RunWriter(path, kind="capture", argv=["capture", "--seed", "0"], environment=ENV, **kw)


def rows(prompt, n=1000, seed=0):
    rng = np.random.default_rng(seed + prompt)
    return {"prompt": prompt, "length": 64, "mode": "propagated", "phase": "prefill", "step": 0,
            "layer": np.arange(n) % 30, "head_index": np.arange(n) % 9,
            "site": np.array(["q", "k", "v"])[np.arange(n) % 3],
            "path": "sage8", "metric": np.array(["cos", "rel_l2"])[np.arange(n) % 2], "element": 0,
            "value": rng.standard_normal(n)}


def test_roundtrip(tmp_path):
    p = tmp_path / "run.h5"
    q = np.random.default_rng(0).standard_normal((9, 300, 64)).astype(np.float16)
    with writer(p) as w:
        w.set_model({"name": "tiny", "n_layers": 2, "head_dim": 64, "revision": None, "shape": [1, 2]})
        for i in range(2):
            w.add_prompt(i, np.arange(64) + i, "wiki")
            w.append("metrics", rows(i))
            w.store_tensor(dict(prompt=i, layer=1, path="sage8", site="q"), q + i)
            w.store_tensor(dict(prompt=i, layer=1, path="fp16", site="resid", token_start=5), q[0])
            w.commit_prompt(i)
        assert w.completed_prompts() == {0, 1}
    assert not os.path.exists(str(p) + "-journal")
    with store.open_run(p) as run:
        assert (run.status, run.finished, run.kind) == ("complete", True, "capture")
        assert run.config == {"paths": ["fp16", "sage8"], "seed": 0} and run.argv[0] == "capture"
        assert run.environment == ENV and run.schema == store.SCHEMA
        assert run.model == {"name": "tiny", "n_layers": 2, "head_dim": 64, "revision": None, "shape": [1, 2]}
        assert run.prompts()["length"].tolist() == [64, 64]
        assert (run.prompt_tokens(1) == np.arange(64) + 1).all()
        df = run.metrics()
        assert len(df) == 2000 and run.tables() == ["metrics"]
        want = rows(1)
        got = df[df.prompt == 1]
        assert (got.value.to_numpy() == want["value"]).all() and (got.site.to_numpy() == want["site"]).all()
        assert df.value.dtype == np.float64 and df.layer.dtype == np.int64
        sub = run.metrics(site="q", path=["sage8"], prompt=0)
        assert len(sub) == 334 and set(sub.site) == {"q"}
        a = run.activations(prompt=1, layer=1, path="sage8", site="q")
        assert a.dtype == np.float16 and (a == q + 1).all()
        assert (run.activations(prompt=0, layer=1, path="fp16", site="resid") == q[0]).all()
        assert len(run.tensors()) == 4
        with pytest.raises(KeyError, match="holds 4 tensors"):
            run.activations(prompt=0, layer=2, path="sage8", site="q")
        with pytest.raises(KeyError, match="holds no table"):
            run.table("nope")


def test_exception_marks_interrupted_and_drops_unfinished_prompt(tmp_path):
    p = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt):
        with writer(p) as w:
            w.add_prompt(0, np.arange(8), "a")
            w.append("metrics", rows(0))
            w.commit_prompt(0)
            w.add_prompt(1, np.arange(8), "a")
            w.append("metrics", rows(1))
            w.store_tensor(dict(prompt=1, layer=0, path="fp16", site="q"), np.ones((2, 8, 4)))
            raise KeyboardInterrupt
    with store.open_run(p) as run:
        assert (run.status, run.finished) == ("interrupted", False)
        assert set(run.metrics().prompt) == {0} and len(run.tensors()) == 0
        assert run.prompts()["index"].tolist() == [0]


def test_resume_continues_and_checks_config(tmp_path):
    p = tmp_path / "run.h5"
    w = writer(p)
    w.add_prompt(0, np.arange(8), "a")
    w.append("metrics", rows(0))
    w.commit_prompt(0)
    w.close("interrupted")
    with pytest.raises(store.StoreError, match="seed"):
        writer(p, resume=True, config={"paths": ["fp16", "sage8"], "seed": 1})
    with writer(p, resume=True) as w:
        assert w.completed_prompts() == {0}
        w.add_prompt(1, np.arange(8), "a")
        w.append("metrics", rows(1))
        w.commit_prompt(1)
    with store.open_run(p) as run:
        assert run.finished and len(run.metrics()) == 2000
        assert len(json.loads(run._h5.attrs["resumed"])) == 1


def test_existing_output_needs_overwrite(tmp_path):
    p = tmp_path / "run.h5"
    p.write_text("precious")
    with pytest.raises(store.OutputExistsError, match="--overwrite"):
        writer(p)
    assert p.read_text() == "precious"
    with writer(p, overwrite=True) as w:
        w.commit_prompt(0)
    assert store.open_run(p).finished


def test_second_writer_is_refused(tmp_path):
    p = tmp_path / "run.h5"
    with writer(p) as w:
        with pytest.raises(store.RunLockedError, match="another driftscope process"):
            writer(p, overwrite=True)
        with pytest.raises(store.RunLockedError):
            writer(p, resume=True)
        code = ("import sys; from driftscope import store\n"
                "try: store.RunWriter(sys.argv[1], kind='capture', argv=[], config={}, environment={}, resume=True)\n"
                "except store.RunLockedError: sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", code, str(p)]).returncode == 3
        with store.open_run(p) as run:  # a reader sees a live writer
            assert run.status == "running" and not run.finished
        w.commit_prompt(0)


def test_unwritable_directory(tmp_path):
    target = "/proc/driftscope-run.h5"
    with pytest.raises(store.OutputError, match="cannot create"):
        writer(target)
    with pytest.raises(store.OutputError, match="does not exist"):
        writer(tmp_path / "missing" / "run.h5")


def test_full_disk_leaves_no_complete_file(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes fail with EFBIG mid-run."""
    p = tmp_path / "run.h5"
    code = f"""
import resource, signal, sys, numpy as np
from driftscope import store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
w = store.RunWriter({str(p)!r}, kind="capture", argv=[], config={{}}, environment={{}})
w.add_prompt(0, np.arange(8), "a"); w.append("t", {{"x": np.arange(10)}}); w.commit_prompt(0)
resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
try:
    for i in range(1, 20):
        w.store_tensor(dict(prompt=i, layer=0, path="fp16", site="q"), np.random.randn(4, 4096, 64))
        w.commit_prompt(i)
    w.close()
except store.OutputError as e:
    print("ERR", e); sys.exit(5)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "free space" in r.stdout
    with store.open_run(p) as run:
        assert not run.finished and run.status == "interrupted"
        assert 0 in set(run.prompts()["index"])


def test_bad_appends(tmp_path):
    with writer(tmp_path / "r.h5") as w:
        w.append("metrics", {"a": [1, 2], "s": ["x", "y"]})
        with pytest.raises(store.StoreError, match="columns"):
            w.append("metrics", {"a": [1]})
        with pytest.raises(store.StoreError, match="holds str"):
            w.append("metrics", {"a": [1], "s": [2]})
        with pytest.raises(store.StoreError, match="one length"):
            w.append("other", {"a": [1, 2], "b": [1]})
        with pytest.raises(store.StoreError, match="tensor key"):
            w.store_tensor({"prompt": 0}, np.zeros(3))
        w.commit_prompt(0)


def test_a_million_rows_in_appended_parts_read_back_in_order(tmp_path):
    """(Their speed is benchmarked by experiments/bench_storage.py, not timed here.)"""
    n = 1_000_000
    with writer(tmp_path / "big.h5") as w:
        for i in range(4):
            w.append("metrics", rows(i, n // 4))
        w.commit_prompt(0)
    got = store.open_run(tmp_path / "big.h5").metrics()
    assert len(got) == n and (np.diff(got["prompt"].to_numpy()) >= 0).all()


def test_torch_tensors_are_copied_at_call(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "t.h5"
    t = torch.ones(2, 16, 4, dtype=torch.float32)
    with writer(p) as w:
        w.store_tensor(dict(prompt=0, layer=0, path="fp16", site="k"), t)
        t += 1  # the caller reuses its buffer: the stored copy must not change
        w.append("metrics", {"value": torch.arange(3, dtype=torch.float32)})
        w.commit_prompt(0)
    with store.open_run(p) as run:
        assert (run.activations(prompt=0, layer=0, path="fp16", site="k") == 1).all()
        assert run.metrics().value.dtype == np.float32


def test_tensor_layouts_uncompressed_by_default_lzf_on_request(tmp_path):
    """Uncompressed tensors are contiguous (HDF5 writes each in one piece); lzf ones are chunked with a
    checksum. Both read back exactly, empty tensors too."""
    import h5py
    q = np.random.default_rng(0).standard_normal((4, 300, 8)).astype(np.float16)
    for comp in (None, "lzf"):
        p = tmp_path / f"{comp}.h5"
        with writer(p, **({"tensor_compression": comp} if comp else {})) as w:
            w.store_tensor(dict(prompt=0, layer=0, path="fp16", site="q"), q)
            w.store_tensor(dict(prompt=0, layer=0, path="fp16", site="k"), q[:, :0])
            w.commit_prompt(0)
        with store.open_run(p) as run:
            assert (run.activations(prompt=0, layer=0, path="fp16", site="q") == q).all()
            assert run.activations(prompt=0, layer=0, path="fp16", site="k").shape == (4, 0, 8)
        with h5py.File(p, "r") as f:
            assert json.loads(f.attrs["storage"])["tensor_compression"] == comp
            ds = f["tensors/p00000/propagated/prefill/s00000/l000/fp16/q/t0000000"]
            assert (ds.chunks, ds.compression, ds.fletcher32) == (
                (None, None, False) if comp is None else ((4, 300, 8), "lzf", True))


def test_writeback_rounds_keep_every_byte(tmp_path, monkeypatch):
    """With a writeback round every 64 KiB (pages sent to the disk, the round before waited for and dropped
    from the page cache), tensors over several commits, a rolled-back prompt and a resume read back exactly."""
    from driftscope.store import journal
    if journal._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range here (not Linux)")
    calls, real = [], journal._SYNC_FILE_RANGE
    monkeypatch.setattr(journal, "_SYNC_FILE_RANGE", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(journal, "WRITEBACK_BYTES", 64 << 10)
    monkeypatch.setattr(journal, "BULK_BYTES", 16 << 10)
    rng = np.random.default_rng(0)
    ts = {(i, layer): rng.standard_normal((8, 300, 16)).astype(np.float16) for i in range(3) for layer in range(4)}
    p = tmp_path / "wb.h5"
    with pytest.raises(KeyboardInterrupt), writer(p) as w:
        for (i, layer), t in ts.items():
            if layer == 0:
                w.add_prompt(i, np.arange(4), "a")
            w.store_tensor(dict(prompt=i, layer=layer, path="fp16", site="q"), t + (i == 2))
            if i < 2 and layer == 3:
                w.commit_prompt(i)
        raise KeyboardInterrupt  # prompt 2 (stored with wrong values) is rolled back
    with writer(p, resume=True) as w:
        assert w.completed_prompts() == {0, 1}
        w.add_prompt(2, np.arange(4), "a")
        for layer in range(4):
            w.store_tensor(dict(prompt=2, layer=layer, path="fp16", site="q"), ts[2, layer])
        w.commit_prompt(2)
    with store.open_run(p) as run:
        for (i, layer), t in ts.items():
            assert (run.activations(prompt=i, layer=layer, path="fp16", site="q") == t).all()
    waits = [a for a in calls if a[3] != journal.SYNC_FILE_RANGE_WRITE]
    assert len(calls) > 10 and waits and all(a[2] > 0 for a in waits)


def test_staging_ring_lends_in_order_and_waits_for_the_writer():
    pytest.importorskip("torch")
    import threading
    from driftscope.store.staging import ALIGN, PinnedRing
    ring = PinnedRing(4 * ALIGN, pinned=False)
    a, _ = ring.take(ALIGN + 1)
    b, _ = ring.take(ALIGN)
    assert (a[0], b[0]) == (0, 2 * ALIGN)  # slots start on ALIGN boundaries
    ring.give(a)
    c, view = ring.take(2 * ALIGN)  # too long for the end: wraps to the start, which a gave back
    assert c[0] == 0 and view.numel() == 2 * ALIGN
    got = []
    taker = threading.Thread(target=lambda: got.append(ring.take(3 * ALIGN)[0][0]))
    taker.start()
    taker.join(0.2)
    assert not got  # b and c still lent
    ring.give(b)
    taker.join(0.2)
    assert not got  # c still lent
    ring.give(c)
    taker.join(5)
    assert got == [0]


def test_cuda_tensors_through_the_staging_ring(tmp_path):
    """GPU tensors (float32, strided, reused by the caller at once) through a 1 MiB pinned ring that wraps and
    makes the producer wait; one larger than the ring and an empty one get pinned memory of their own."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randn(64, 40, 32, device="cuda", generator=g)  # float32
    big = torch.randn(1024, 1024, device="cuda", generator=g).half()  # 2 MiB
    want = {}
    p = tmp_path / "cuda.h5"
    with writer(p, max_queue_bytes=1 << 20) as w:
        for layer in range(24):
            x = src.transpose(0, 1)  # strided [40, 64, 32]: 160 KiB as float16
            want[layer] = x.half().cpu().numpy()
            w.store_tensor(dict(prompt=0, layer=layer, path="fp16", site="q"), x)
            src.mul_(1.5).add_(1)  # the caller reuses its buffer at once
        w.store_tensor(dict(prompt=0, layer=0, path="fp16", site="resid"), big)
        w.store_tensor(dict(prompt=0, layer=0, path="fp16", site="k"), big[:0])
        w.commit_prompt(0)
    with store.open_run(p) as run:
        for layer, x in want.items():
            assert (run.activations(prompt=0, layer=layer, path="fp16", site="q") == x).all()
        assert (run.activations(prompt=0, layer=0, path="fp16", site="resid") == big.cpu().numpy()).all()
        assert run.activations(prompt=0, layer=0, path="fp16", site="k").shape == (0, 1024)


def test_reader_sees_last_commit_of_a_live_writer(tmp_path):
    p = tmp_path / "live.h5"
    w = writer(p)
    w.add_prompt(0, np.arange(4), "a")
    w.append("metrics", rows(0))
    w.commit_prompt(0)
    w.add_prompt(1, np.arange(4), "a")
    w.store_tensor(dict(prompt=1, layer=0, path="fp16", site="q"), np.ones((2, 4, 4)))
    with store.open_run(p) as run:
        assert run.status == "running" and set(run.metrics().prompt) == {0}
    w.close()


# ---------------------------------------------------------------- metrics column names and schema versions
def schema1_file(path, n_prompts=1):
    """A run file as driftscope/1 wrote it: metrics columns named head and index."""
    with writer(path) as w:
        for i in range(n_prompts):
            old = {"head_index": "head", "element": "index"}
            w.append("metrics", {old.get(c, c): v for c, v in rows(i, n=10).items()})
            w.commit_prompt(i)
    import h5py
    with h5py.File(path, "r+") as f:
        f.attrs["schema"] = "driftscope/1"


def test_metrics_columns_do_not_clash_with_pandas():
    """df.head_index and df.element are columns (df.head and df.index were pandas' own attributes). ``mode``
    still is DataFrame.mode: renaming it would change every derived table and figure digest; write df["mode"]."""
    clash = [c for c in store.METRICS_COLUMNS if hasattr(pd.DataFrame, c) or hasattr(pd.Series, c)]
    assert clash == ["mode"]


def test_schema1_file_reads_with_the_new_names(tmp_path):
    p = tmp_path / "old.h5"
    schema1_file(p)
    with store.open_run(p) as run:
        assert run.schema == "driftscope/1"
        df = run.metrics()
        assert tuple(df.columns) == store.METRICS_COLUMNS
        assert (df["head_index"].to_numpy() == np.arange(10) % 9).all() and (df["element"] == 0).all()
        assert len(run.metrics(head_index=[0, 1], element=0)) == 3  # heads 0, 1, 0 of rows 0, 1, 9
        assert tuple(run.table("metrics").columns) == store.METRICS_COLUMNS
        with pytest.raises(KeyError, match="no column 'head'; its columns are .*head_index"):
            run.metrics(head=0)


def test_committed_schema1_results_read_with_the_new_names():
    p = Path(__file__).resolve().parents[1] / "experiments" / "results" / "smollm2-135m-cpu-512.h5"
    with store.open_run(p) as run:
        assert run.schema == "driftscope/1"
        df = run.metrics(site="attn_out", metric="rel_l2", head_index=-1)
        assert tuple(df.columns) == store.METRICS_COLUMNS and len(df) and (df["head_index"] == -1).all()


def test_resumed_schema1_file_keeps_its_names(tmp_path):
    """A driftscope/1 file resumed by this driftscope stays one version: old names on disk, new names read."""
    p = tmp_path / "old.h5"
    schema1_file(p)
    with writer(p, resume=True) as w:
        w.append("metrics", rows(1, n=10))  # written by this driftscope: head_index, element
        w.commit_prompt(1)
    import h5py
    with h5py.File(p, "r") as f:
        assert f.attrs["schema"] == "driftscope/1"
        assert "head" in json.loads(f["tables/metrics"].attrs["columns"])
    with store.open_run(p) as run:
        df = run.metrics()
        assert tuple(df.columns) == store.METRICS_COLUMNS and sorted(set(df.prompt)) == [0, 1] and len(df) == 20


def test_newer_schema_is_refused_by_name(tmp_path):
    p = tmp_path / "new.h5"
    with writer(p) as w:
        w.commit_prompt(0)
    import h5py
    with h5py.File(p, "r+") as f:
        f.attrs["schema"] = f"driftscope/{store.SCHEMA_MAJOR + 1}"
    with pytest.raises(store.RunFileError, match="newer driftscope"):
        store.open_run(p)


def test_records_write_the_schema_columns():
    torch = pytest.importorskip("torch")
    from driftscope.measure.records import Context, Records
    from driftscope.store.schema import METRICS_DTYPES

    rec = Records(context=Context(prompt=3, length=16))
    rec.add(2, "attn_out", "sage8", "rel_l2", torch.tensor([0.1, 0.2]))
    rec.add(2, "k", "fp16", "absmax_channel", torch.tensor([5.0, 6.0]), heads=False, head=1,
            index=torch.tensor([7, 9]))
    cols = rec.columns()
    assert tuple(cols) == store.METRICS_COLUMNS
    assert cols["head_index"].tolist() == [0, 1, 1, 1] and cols["element"].tolist() == [-1, -1, 7, 9]
    for name, dtype in METRICS_DTYPES.items():
        assert cols[name].dtype == dtype or (dtype is object and cols[name].dtype.kind == "U"), name
    empty = Records().columns()
    assert tuple(empty) == store.METRICS_COLUMNS and all(len(a) == 0 for a in empty.values())
    assert empty["site"].dtype.kind == "U" and empty["head_index"].dtype == np.int32


def test_records_of_a_table_equal_one_record_per_metric():
    """A table of M metrics in one `add` gives the rows of M single adds, in the same order."""
    torch = pytest.importorskip("torch")
    from driftscope.measure.records import Context, Records

    table = torch.arange(12, dtype=torch.float64).view(3, 4)[:, 1:]  # a strided view, as drift tables are
    one, many = Records(context=Context(prompt=1)), Records(context=Context(prompt=1))
    one.add(5, "q", "sage8", ("cosine", "rel_l2", "rel_l1"), table)
    one.add(5, "q", "sage8", ("absmax", "kurtosis"), table[:2, :1], heads=False)
    for name, row in zip(("cosine", "rel_l2", "rel_l1"), table):
        many.add(5, "q", "sage8", name, row)
    for name, row in zip(("absmax", "kurtosis"), table[:2, :1]):
        many.add(5, "q", "sage8", name, row, heads=False)
    assert len(one) == len(many) == 11
    a, b = one.columns(), many.columns()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]
    assert a["metric"][:4].tolist() == ["cosine"] * 3 + ["rel_l2"] and a["head_index"][-2:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="2 metrics take values"):
        one.add(0, "q", "x", ("a", "b"), torch.zeros(3))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_records_copy_views_dtypes_and_big_storages_exactly(device):
    """The host copy cuts views out of their tables (inference-mode views too), converts float32/int32/bfloat16
    values to float64, and copies only the values of a view into a big tensor (on CUDA: pinned, without blocking)."""
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from driftscope.measure.records import Records

    rec = Records()
    with torch.inference_mode():
        table = torch.arange(30, dtype=torch.float64, device=device).view(5, 6)
        big = torch.arange(100_000, dtype=torch.float32, device=device)
        parts = [table[:3, :-1], table[:, -1:], table[2], big[7:10],
                 torch.tensor([3, 1], dtype=torch.int32, device=device), table[::2, 1],
                 torch.tensor([0.5, -2.0], dtype=torch.bfloat16, device=device)]
        for i, t in enumerate(parts):
            rec.add(0, "q", "p", f"m{i}", t.reshape(-1) if t.dim() == 2 and t.shape[1] == 1 else t, heads=False)
        rec.add(0, "q", "p", "e", table[4, :2], heads=False, index=torch.arange(10, 16, device=device)[::3])
        cols = rec.columns()
    want = np.concatenate([t.double().reshape(-1).cpu().numpy() for t in parts] + [table[4, :2].cpu().numpy()])
    assert np.array_equal(cols["value"], want) and cols["value"].dtype == np.float64
    assert cols["element"][-2:].tolist() == [10, 13] and (cols["element"][:-2] == -1).all()


# ---------------------------------------------------------------- a run that finished no prompt
@pytest.mark.parametrize("how", ["no table", "zero rows"])
def test_run_with_zero_prompts_has_empty_metrics(tmp_path, how):
    from driftscope.measure.records import Records
    from driftscope.report import tables, text

    p = tmp_path / "empty.h5"
    w = writer(p)
    if how == "zero rows":  # a prompt that recorded nothing: the table exists with no rows
        w.append("metrics", Records().columns())
        w.commit_prompt(0)
    w.close("interrupted")
    with store.open_run(p) as run:
        assert run.status == "interrupted" and len(run.prompts()) == 0
        df = run.metrics()
        assert df.empty and tuple(df.columns) == store.METRICS_COLUMNS
        assert df["value"].dtype == np.float64 and df["head_index"].dtype == np.int32 and df["site"].dtype == object
        assert run.metrics(site="attn_out", head_index=-1).empty and run.table("metrics").empty
        with pytest.raises(KeyError, match="no column 'head'"):
            run.metrics(head=0)
    # what summary and figures do with it: an empty summary, one clear AnalysisError
    assert text.layer_summary(df).empty and "no attention-output" in text.format_layer_summary(text.layer_summary(df))
    with pytest.raises(tables.AnalysisError, match="empty"):
        tables.head_drift(df)


def test_evaluate_run_has_no_metrics(tmp_path):
    p = tmp_path / "ev.h5"
    with store.RunWriter(p, kind="evaluate", argv=[], config={}, environment={}) as w:
        w.append("summary", {"context": [64], "ppl_base": [1.0]})
        w.commit_prompt(0)
    with store.open_run(p) as run, pytest.raises(KeyError, match="holds no table 'metrics'"):
        run.metrics()
