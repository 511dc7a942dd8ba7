"""Reliability of real captures: SIGKILL at random moments, --resume, Ctrl-C, concurrent writers, bad input."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
from conftest import REPO, assert_one_line_error, write_capture_run

from driftscope import store

# Four prompts of 24 tokens, one decode step, lockstep only: a few seconds of work after start-up.
SMALL = ["--lengths", "24", "--prompts", "4", "--decode", "1", "--mode", "propagated", "--quiet", "--no-figures"]
KILL_TRIALS = 20


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "driftscope.capture", *SMALL, "--out", str(out), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["prompt", "mode", "phase", "step", "layer", "site", "path", "metric", "head_index", "element"]
    return df.sort_values(keys).reset_index(drop=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> float:
    """Seconds until `path` exists (the writer has started), or until the process ended."""
    t0 = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smol_folder):
    """An uninterrupted run; seconds from start to the writer's file, and from there to the end."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    proc = _start(out)
    startup = _wait_for(out, proc)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    with store.open_run(out) as run:
        return _sorted(run.metrics()), startup, time.monotonic() - t0


def test_sigkill_at_random_moments_then_resume(tmp_path, reference):
    ref, startup, writing = reference
    rng = random.Random(0)
    outcomes = []
    trial = -1
    # At least KILL_TRIALS kills, at least half of them while the run file was being written (timing varies with
    # the machine's load, so keep going until both hold, within a bound).
    while len(outcomes) < KILL_TRIALS or sum(o.endswith("done") for o in outcomes) < KILL_TRIALS // 2:
        trial += 1
        assert trial < 3 * KILL_TRIALS, outcomes
        out = tmp_path / f"kill{trial}.h5"
        proc = _start(out)
        # Every 5th kill lands during start-up; the others anywhere while the run file is being written.
        if trial % 5 == 0:
            time.sleep(startup * rng.random())
        else:  # the window ends before the interpreter's shutdown, which `writing` includes
            _wait_for(out, proc)
            time.sleep(0.8 * writing * rng.random())
        if proc.poll() is not None:  # it finished first: nothing was killed
            outcomes.append("finished")
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not out.exists():  # killed before the writer started: nothing to check
            outcomes.append("before-start")
        else:
            with store.open_run(out) as run:
                if run.finished:  # killed while the process shut down, after the run file was closed
                    assert run.status == "complete" and _sorted(run.metrics()).equals(ref)
                    outcomes.append("after-close")
                    continue
                assert run.status in ("running", "interrupted")
                prompts = run.prompts()
                done = set(prompts[prompts["complete"]]["index"])
                if done:
                    got = _sorted(run.metrics())
                    assert set(got["prompt"]) == done  # no rows of an unfinished prompt
                    assert got.equals(_sorted(ref[ref["prompt"].isin(done)]))  # every finished prompt intact
            outcomes.append(f"{len(done)} done")
        resumed = _start(out, "--resume")
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err
        with store.open_run(out) as run:
            assert run.finished and run.status == "complete"
            assert _sorted(run.metrics()).equals(ref)
    killed_mid_run = [o for o in outcomes if o.endswith("done")]
    assert len(set(killed_mid_run)) >= 2, outcomes  # the kills did land at different points of the run


def test_ctrl_c_marks_the_file_interrupted(tmp_path, reference):
    out = tmp_path / "int.h5"
    proc = _start(out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the first prompt is committed
        time.sleep(0.2)
        if out.exists():
            try:
                with store.open_run(out) as run:
                    if len(run.prompts()) and run.prompts()["complete"].any():
                        break
            except store.RunFileError:
                pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], err
    with store.open_run(out) as run:
        assert run.status == "interrupted" and not run.finished


def test_second_capture_on_the_same_file_refuses(tmp_path, smol_folder):
    out = tmp_path / "busy.h5"
    # long enough that the second process (a few seconds to start) finds the first still writing
    first = subprocess.Popen([sys.executable, "-m", "driftscope.capture", "--lengths", "128", "--prompts", "8",
                              "--decode", "2", "--quiet", "--no-figures", "--out", str(out)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "driftscope.capture", *SMALL, "--out", str(out), "--overwrite"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert_one_line_error(second, str(out))
    with store.open_run(out) as run:
        assert run.status == "complete"


def test_unwritable_output_is_a_clear_error(run_cli, smol_folder):
    proc = run_cli("capture", *SMALL, "--out", "/proc/driftscope-test.h5")
    assert_one_line_error(proc, "/proc/driftscope-test.h5")


def _needs_remote_code(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "driftscope-custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (folder / "configuration_custom.py").write_text("raise SystemExit('remote code must never run')\n")
    return folder


@pytest.mark.parametrize("module", ["capture", "evaluate"])
def test_bad_input_on_model_clis(tmp_path, run_cli, smol_folder, module):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    custom = _needs_remote_code(tmp_path / "custom")
    length_flag = "--lengths" if module == "capture" else "--contexts"
    cases = [
        (["--no-such-option"], "unrecognized arguments"),
        (["--model", str(tmp_path / "missing-folder")], "missing-folder"),
        (["--corpus", str(empty)], "empty"),
        ([length_flag, "0"], "0"),
        ([length_flag, "-5"], "-5"),
        (["--model", str(custom)], "--trust-remote-code"),
        (["--dtype", "float8"], "float8"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli(module, *args, "--out", str(tmp_path / "x.h5")), fragment)


def test_bad_input_on_figures_and_bench(tmp_path, run_cli):
    assert_one_line_error(run_cli("figures", str(tmp_path / "a.h5"), "--no-such-option"), "unrecognized arguments")
    assert_one_line_error(run_cli("figures", str(tmp_path / "missing.h5")), "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    assert_one_line_error(run_cli("figures", str(junk), "--out", str(tmp_path / "f")), "junk.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    assert_one_line_error(run_cli("figures", str(foreign), "--out", str(tmp_path / "f")), "foreign.h5")
    assert_one_line_error(run_cli("bench", "--no-such-option"), "unrecognized arguments")
    assert_one_line_error(run_cli("bench", "--prefill", "0"), "0")


# -- issue 12 in real processes: a handful of the in-process checks, as a user runs them ---------------------------

def _tiny_args(tiny, *extra):
    model, corpus = tiny
    return ["--model", str(model), "--corpus", str(corpus), "--lengths", "16", "--prompts", "1", "--decode", "1",
            "--quiet", *extra]


def test_interpret_works_from_a_plain_shell(tmp_path, run_cli, tiny):
    """No TRITON_INTERPRET in the environment: the command sets it before triton loads."""
    out = tmp_path / "interp.h5"
    proc = run_cli("capture", *_tiny_args(tiny, "--sage-impl", "interpret", "--no-figures", "--out", str(out)),
                   env={"TRITON_INTERPRET": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with store.open_run(out) as run:
        assert run.status == "complete" and run.environment["sage_impl"]["sage8"] == "interpret"


def test_interpret_reexecutes_when_triton_was_imported_first(tmp_path, tiny):
    out = tmp_path / "reexec.h5"
    argv = ["capture", *_tiny_args(tiny, "--sage-impl", "interpret", "--no-figures", "--out", str(out))]
    code = ("import runpy, sys, triton\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_module('driftscope.capture', run_name='__main__', alter_sys=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with store.open_run(out) as run:
        assert run.status == "complete"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal of the kernel")
def test_refused_kernel_on_the_cpu_leaves_the_finished_run(tmp_path, run_cli, tiny):
    done = tmp_path / "done.h5"
    assert run_cli("capture", *_tiny_args(tiny, "--out", str(done))).returncode == 0
    before = done.read_bytes()
    proc = run_cli("capture", *_tiny_args(tiny, "--sage-impl", "kernel", "--overwrite", "--out", str(done)))
    assert_one_line_error(proc, "--sage-impl kernel")
    assert done.read_bytes() == before


def test_summary_and_device_errors_are_one_line(tmp_path, run_cli):
    assert_one_line_error(run_cli("summary", "experiments/results/smollm2-135m-h100-evaluate.h5"), "evaluate run")
    assert_one_line_error(run_cli("summary", str(write_capture_run(tmp_path / "s.h5")), "--markdown", "fp16"),
                          "reference", "sage8")
    assert_one_line_error(run_cli("capture", "--device", "tpu", "--out", str(tmp_path / "x.h5")), "tpu")
    assert_one_line_error(run_cli("evaluate", "--device", "tpu", "--out", str(tmp_path / "x.h5")), "tpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
