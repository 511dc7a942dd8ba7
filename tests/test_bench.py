"""The benchmarks' control flow on the CPU with tiny shapes (the numbers themselves come from the GPU scripts).

`python -m driftscope.bench` needs CUDA: without it, one line and exit code 2. The library and every
experiments/bench_*.py script run end to end on a tiny random model (`--device cpu --smoke`) and write JSON with
the fields the README and the lead's report read.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_without_cuda_is_one_line_and_exit_2(tmp_path):
    proc = _run(["-m", "driftscope.bench"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs CUDA" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, needle", [
    (["--device", "cpu"], "--smoke"),
    (["--device", "cpu", "--smoke", "--paths", "fp16,bogus"], "bogus"),
    (["--device", "cpu", "--smoke", "--prefill", "0"], "positive"),
    (["--device", "tpu"], "tpu"),
])
def test_bench_bad_input_is_one_line(args, needle):
    from driftscope import bench, cli

    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.run("driftscope bench", bench.main, args)
    assert code == 2
    assert len(err.getvalue().strip().splitlines()) == 1 and needle in err.getvalue()


def test_bench_help_has_examples(tmp_path):
    proc = _run(["-m", "driftscope.bench", "--help"], tmp_path)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--smoke" in proc.stdout


def test_throughput_library_on_cpu():
    from driftscope.run import throughput as benchmarks

    config = benchmarks.ThroughputConfig(models=("tiny-llama",), prefill=(32,), decode=(32,), decode_steps=2,
                                         warmup=0, repeats=1, device="cpu", sage_impl="emulate", dtype="float32")
    lines = []
    result = benchmarks.run_throughput(config, argv=["test"], progress=lines.append)
    recs = result["records"]
    assert {(r["phase"], r["path"]) for r in recs} == {(p, q) for p in ("prefill", "decode") for q in ("fp16", "sage8")}
    assert all("error" not in r for r in recs), recs
    for r in recs:
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] is None  # no CUDA memory on the CPU
    sage = [r for r in recs if r["path"] == "sage8"]
    assert all(r["tokens_per_s_vs_fp16"] > 0 for r in sage)
    assert all(r["cache_cropped_between_repeats"] for r in recs if r["phase"] == "decode")
    assert result["machine"]["device_name"] == "cpu" and result["versions"]["torch"] == torch.__version__
    assert len(result["summary"]) == len(recs) and len(lines) >= 4


def test_decode_leaves_cache_length_and_skips_beyond_context():
    from driftscope.run import throughput as benchmarks

    config = benchmarks.ThroughputConfig(models=("tiny-llama",), prefill=(70000,), decode=(16,), decode_steps=3,
                                         warmup=1, repeats=2, device="cpu", sage_impl="emulate", dtype="float32",
                                         paths=("fp16",))
    result = benchmarks.run_throughput(config, progress=lambda _: None)
    pre = [r for r in result["records"] if r["phase"] == "prefill"]
    assert pre and "exceed" in pre[0]["skipped"]  # tiny-llama's context is 65,536
    dec = [r for r in result["records"] if r["phase"] == "decode"][0]
    assert dec["steps"] == 3 and len(dec["times_s"]) == 2 and dec["cache_cropped_between_repeats"]


def test_unloadable_model_is_recorded_not_fatal():
    from driftscope.run import throughput as benchmarks

    config = benchmarks.ThroughputConfig(models=("no-such-model-xyz",), prefill=(16,), decode=(16,), device="cpu",
                                         sage_impl="emulate")
    result = benchmarks.run_throughput(config, progress=lambda _: None)
    assert result["records"] == [] and "error" in result["models"][0]


def test_bench_cli_smoke_writes_json_and_png(tmp_path):
    from driftscope import bench

    assert bench.main(["--device", "cpu", "--smoke", "--prefill", "32", "--decode", "32", "--out-dir",
                       str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_throughput.json").read_text())
    for key in ("argv", "config", "machine", "versions", "models", "records", "summary", "method"):
        assert key in data
    assert data["argv"][:3] == ["python", "-m", "driftscope.bench"]
    assert (tmp_path / "bench_throughput.png").stat().st_size > 10_000


@pytest.mark.parametrize("script, out_name, keys", [
    ("bench_capture_overhead.py", "bench_capture_overhead.json",
     ("time_ratio", "memory_ratio", "targets", "breakdown", "variants", "profile_top_ops", "points")),
    ("bench_storage.py", "bench_storage.json", ("dd", "writer", "disk_MBps", "target_met", "payload_bytes")),
    ("bench_wrapper.py", "bench_wrapper.json", ("rows", "worst_path_vs_bare", "target_met_all")),
])
def test_experiment_scripts_smoke(tmp_path, script, out_name, keys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_script_{script[:-3]}", REPO / "experiments" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # in-process: no second torch import
    assert module.main(["--device", "cpu", "--smoke", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / out_name).read_text())
    for key in ("argv", "machine", "versions", *keys):
        assert key in data, key
    if script == "bench_capture_overhead.py":
        v = data["variants"]
        assert {"baseline", "full", "hooks_only", "no_logits_drift"} <= set(v)
        # hooks_only records nothing (the non-finite counts come with attn_out's drift, one per layer and path)
        assert v["full"]["metric_rows"] > v["no_outliers"]["metric_rows"] > v["hooks_only"]["metric_rows"] == 0
        assert v["no_attn_drift"]["metric_rows"] < v["full"]["metric_rows"]
        assert [(p["phase"], p["decode_steps"]) for p in data["points"]] == [("prefill", 0), ("decode", 4)]
        assert all(p["variants"][v]["peak_bytes"] > 0 for p in data["points"] for v in ("baseline", "full"))
    if script == "bench_storage.py":
        assert set(data["writer"]) == {"lzf", "none"} and not list(tmp_path.glob(".bench-storage-*"))
    pngs = {"bench_wrapper.py": []}.get(script, [out_name.replace(".json", ".png")])
    for png in pngs:
        assert (tmp_path / png).is_file()


def test_cpu_capture_result_is_committed():
    data = json.loads((REPO / "experiments/results/bench_cpu_capture.json").read_text())
    assert data["first_run"] and data["machine"]["nproc"] and all(r["returncode"] == 0 for r in data["runs"])
    assert "driftscope.capture" in data["command"] and data["wall_s"] > 0


def test_bench_refuses_to_replace_results_or_write_into_a_file(tmp_path):
    """Checked before any model is built: results already in --out-dir need --overwrite; a file is no folder."""
    from conftest import assert_one_line_error, run_in_process

    from driftscope import bench

    (tmp_path / "bench_throughput.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    smoke = ["--device", "cpu", "--smoke", "--prefill", "32", "--decode", "32"]
    assert_one_line_error(run_in_process(bench, *smoke, "--out-dir", str(tmp_path)), "bench_throughput.json",
                          "--overwrite")
    assert_one_line_error(run_in_process(bench, *smoke, "--out-dir", str(tmp_path / "a_file")), "not a directory")
    assert_one_line_error(run_in_process(bench, *smoke, "--sage-impl", "kernel", "--out-dir", str(tmp_path / "n")),
                          "--sage-impl kernel")
    assert (tmp_path / "bench_throughput.json").read_text() == "{}" and not (tmp_path / "n").exists()
