"""SIGKILL a run-file writer at many points; the file must open with every committed prompt intact.

Each trial starts a subprocess that writes a realistic run (prompts with tens of thousands of metric rows
and a few activation tensors, committing after each prompt) and kills it with SIGKILL: at seeded random
times over the whole run, and right at the start of a commit. Then the file must open, hold exactly the
committed prompts (their rows equal to what was written, nothing of an unfinished prompt), say it did not
finish, and a resume must complete it with the same metrics as an uninterrupted run.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from driftscope import store

N_PROMPTS, N_ROWS = 6, 30_000
CONFIG = {"paths": ["fp16", "sage8"], "seed": 0, "prompts": N_PROMPTS}

CHILD = """
import sys, time
import numpy as np
sys.path.insert(0, {here!r})
from test_store_crash import write_run
from driftscope.store import journal
journal.WRITEBACK_BYTES, journal.BULK_BYTES = 1 << 20, 64 << 10  # kills land in writeback rounds too
print("start", flush=True)
write_run(sys.argv[1], resume=False, say=lambda m: print(m, flush=True))
print("done", flush=True)
"""


def prompt_rows(i):
    rng = np.random.default_rng(1000 + i)
    r = np.arange(N_ROWS)
    return {"prompt": i, "length": 512, "mode": np.array(["propagated", "isolated"])[r % 2], "phase": "prefill",
            "step": 0, "layer": (r // 2) % 30, "head_index": (r // 60) % 9,
            "site": np.array(["q", "k", "v", "attn_out"])[r % 4],
            "path": "sage8", "metric": np.array(["cos", "rel_l2", "rel_l1", "rmse", "max_abs"])[r % 5],
            "element": r % 7, "value": rng.standard_normal(N_ROWS)}


def prompt_tensor(i, layer):
    rng = np.random.default_rng(10 * i + layer)
    return rng.standard_normal((9, 512, 64)).astype(np.float16)


def write_run(path, resume, say=lambda m: None):
    with store.RunWriter(path, kind="capture", argv=["capture"], config=CONFIG, environment={},
                         resume=resume) as w:
        w.set_model({"name": "tiny", "n_layers": 30})
        done = w.completed_prompts()
        for i in range(N_PROMPTS):
            if i in done:
                continue
            w.add_prompt(i, np.arange(512) + i, "wiki")
            for half in (0, 1):  # appended in two parts, as a capture appends per layer
                rows = prompt_rows(i)
                sl = slice(half * N_ROWS // 2, (half + 1) * N_ROWS // 2)
                w.append("metrics", {k: (v[sl] if np.ndim(v) else v) for k, v in rows.items()})
            for layer in range(3):
                w.store_tensor(dict(prompt=i, layer=layer, path="sage8", site="q"), prompt_tensor(i, layer))
            say(f"commit {i}")
            w.commit_prompt(i)
            say(f"committed {i}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    p = tmp_path_factory.mktemp("ref") / "ref.h5"
    write_run(p, resume=False)
    with store.open_run(p) as run:
        return run.metrics()


def start_child(path):
    code = CHILD.format(here=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            bufsize=1)
    assert proc.stdout.readline().strip() == "start"
    return proc


def lines_until(proc, prefix, seen):
    while True:
        line = proc.stdout.readline()
        if not line:
            return False
        seen.append(line.strip())
        if line.startswith(prefix):
            return True


@pytest.fixture(scope="module")
def duration(tmp_path_factory):
    p = tmp_path_factory.mktemp("cal") / "cal.h5"
    proc = start_child(p)  # returns once the child is started: time the writing, not the start-up
    t = time.perf_counter()
    proc.stdout.read()
    proc.wait()
    return time.perf_counter() - t


def trials():
    rng = np.random.default_rng(20260526)
    out = [("time", float(f)) for f in np.sort(rng.uniform(0.0, 0.95, 16))]
    out += [("commit", (int(i), float(d))) for i, d in zip(rng.integers(0, N_PROMPTS, 8), rng.uniform(0, 0.004, 8))]
    return out


@pytest.mark.parametrize("how,when", trials())
def test_sigkill_then_open_then_resume(tmp_path, reference, duration, how, when):
    p = tmp_path / "run.h5"
    proc = start_child(p)
    seen = []
    if how == "time":
        time.sleep(when * duration)
    else:
        prompt, delay = when
        assert lines_until(proc, f"commit {prompt}", seen)
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
    if os.path.exists(p):
        with store.open_run(p) as run:
            if run.finished:  # the writer closed the run before the kill landed: it must be whole
                assert run.status == "complete"
                pd.testing.assert_frame_equal(run.metrics(), reference)
                return
    seen += rest.splitlines()
    acknowledged = {int(s.split()[1]) for s in seen if s.startswith("committed")}

    if os.path.exists(p):  # a kill before the file was first committed leaves no file at all
        with store.open_run(p) as run:
            assert not run.finished and run.status == "interrupted"
            prompts = run.prompts()
            committed = set(prompts[prompts.complete]["index"])
            assert acknowledged <= committed and committed == set(range(len(committed)))
            df = run.metrics() if "metrics" in run.tables() else pd.DataFrame({"prompt": []})
            assert set(df.prompt) == committed, "rows of an unfinished prompt are visible"
            for i in committed:
                got = df[df.prompt == i].reset_index(drop=True)
                want = reference[reference.prompt == i].reset_index(drop=True)
                pd.testing.assert_frame_equal(got, want)
                np.testing.assert_array_equal(run.activations(prompt=i, layer=2, path="sage8", site="q"),
                                              prompt_tensor(i, 2))
            assert set(run.tensors().prompt) <= committed
    else:
        assert not acknowledged

    write_run(p, resume=True)
    assert not os.path.exists(str(p) + "-journal")
    with store.open_run(p) as run:
        assert run.finished and run.status == "complete"
        pd.testing.assert_frame_equal(run.metrics(), reference)
        assert len(run.tensors()) == 3 * N_PROMPTS
