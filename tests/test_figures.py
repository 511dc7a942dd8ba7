"""Figures, their CSV digests, the figures CLI and the paper build, on a real (tiny) capture run file."""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from driftscope.report import figures, plots
from driftscope.report import tables as analysis

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_file(tmp_path_factory) -> Path:
    """The embedded model at 64 tokens, one prompt, one decode step, all four paths, K tensors stored."""
    from driftscope.run.capture import run_capture
    from driftscope.config import CaptureConfig

    out = tmp_path_factory.mktemp("run") / "tiny.h5"
    config = CaptureConfig(paths=("fp32", "fp16", "sage8", "sage8-nosmooth"), lengths=(64,), prompts=1, decode=1,
                           store=("k",))
    return run_capture(config, out=out, progress=False, argv=["python", "-m", "driftscope.capture", "--tiny"])


@pytest.fixture(scope="session")
def df(run_file) -> pd.DataFrame:
    from driftscope import store

    with store.open_run(run_file) as run:
        return figures.metrics_with_meta(run)


def _written(base: Path) -> None:
    for ext in (".png", ".pdf"):
        p = Path(f"{base}{ext}")
        assert p.is_file() and p.stat().st_size > 1000, p


@pytest.mark.parametrize("name", figures.CAPTURE_FIGURES)
def test_each_capture_figure_writes_png_and_pdf(name, df, run_file, tmp_path):
    from driftscope import store

    with store.open_run(run_file) as run:
        data, fig = figures.capture_figure(name, df, tmp_path / name, run)
    assert not data.empty and fig.axes
    _written(tmp_path / name)


def test_smoothing_table(df):
    t = analysis.smoothing_table(df)
    assert len(t) == 30 * 3  # layers x KV heads
    assert (t["channel_bias"].between(0, 1)).all()
    assert t["attn_err_smooth"].notna().all()  # both sage paths were captured in isolated mode
    s = analysis.smoothing_summary(t)
    assert s["helps"] + s["neutral"] + s["hurts"] == s["pairs"]


def test_k_profile_uses_stored_k(df, run_file):
    from driftscope import store

    layer, head = analysis.worst_k_head(df)
    with store.open_run(run_file) as run:
        k, prompt = figures.stored_k(run, df, layer, head)
    prof = analysis.k_channel_profile(df, layer, head, k, prompt=prompt)
    k32 = k.astype("float32")
    # the stored statistics and the stored tensor agree (float16 storage)
    for stat, expect in (("absmax", abs(k32).max(0)), ("absmax smoothed", abs(k32 - k32.mean(0)).max(0))):
        got = prof[prof["statistic"] == stat].sort_values("channel")["value"].to_numpy()
        assert abs(got - expect).max() <= 1e-2 * expect.max(), stat
    assert set(prof["statistic"]) == {"absmax", "absmax smoothed", "|mean|"}


def test_evaluate_and_bench_contracts(tmp_path):
    ev = pd.DataFrame({"path": ["sdpa", "sdpa", "sage8", "sage8", "sage8", "sage8"], "context": [256, 1024] * 3,
                       "metric": ["perplexity"] * 4 + ["kl_mean"] * 2, "value": [12.0, 11.0, 12.1, 11.2, 1e-3, 2e-3]})
    plots.perplexity_logits(ev, tmp_path / "ppl", reference="sdpa")
    _written(tmp_path / "ppl")
    summary = pd.DataFrame({"context": [256, 1024], "ppl_base": [12.0, 11.0], "ppl_quant": [12.1, 11.2],
                            "kl_mean": [1e-3, 2e-3], "top1_agree": [0.99, 0.98]})
    long = analysis.evaluation_long({"summary": summary})
    assert set(long["metric"]) == {"perplexity", "kl_mean", "top1_agree"}
    bench = [{"path": p, "context": c, "phase": ph, "tokens_per_s": 1e5 / c, "peak_memory_gib": c / 1e3}
             for p in ("fp16", "sage8") for c in (1024, 4096) for ph in ("prefill", "decode")]
    plots.throughput_memory(analysis.bench_table(bench), tmp_path / "bench")
    _written(tmp_path / "bench")


def test_quick_figures(df, tmp_path):
    written = figures.quick_figures(df, tmp_path / "run")
    assert [p.name for p in written] == ["heatmap.png", "depth.png", "smoothing.png"]


@pytest.mark.slow  # a CLI process regenerating every figure
def test_cli_regenerates_identical_digests(run_file, tmp_path):
    def regen(out):
        r = subprocess.run([sys.executable, "-m", "driftscope.figures", str(run_file), "--out", str(out),
                            "--tables", str(tmp_path / "paper" / "generated"), "--quiet", "--overwrite"],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        return out / "data" / "tiny"

    a, b = regen(tmp_path / "a"), regen(tmp_path / "b")
    names = sorted(p.name for p in a.glob("*.csv"))
    assert names == sorted(f"{n}.csv" for n in figures.CAPTURE_FIGURES)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors
    for f in ("numbers.tex", "runs.tex", "smoothing.tex", "commands.tex"):
        assert (tmp_path / "paper" / "generated" / f).is_file()


@pytest.mark.parametrize("make_bad", ["missing", "text", "empty"])
def test_cli_bad_input_is_one_line(make_bad, tmp_path):
    bad = tmp_path / "bad.h5"
    if make_bad == "text":
        bad.write_text("not a run file\n")
    elif make_bad == "empty":
        bad.write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "driftscope.figures", str(bad), "--out", str(tmp_path / "f")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("driftscope figures: error:") and "bad.h5" in lines[0]


@pytest.mark.slow  # TeX
@pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("make") is None, reason="pdflatex not installed")
def test_paper_builds_and_fails_on_a_missing_figure(run_file, tmp_path):
    paper = tmp_path / "paper"
    paper.mkdir()
    for f in ("driftscope.tex", "Makefile"):
        shutil.copy(REPO / "paper" / f, paper / f)
    figures.regenerate([run_file], tmp_path / "figures", paper / "generated", log=lambda *_: None)
    r = subprocess.run(["make", "-C", str(paper)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (paper / "driftscope.pdf").stat().st_size > 10000
    (tmp_path / "figures" / "tiny" / "heatmap.pdf").unlink()
    (tmp_path / "figures" / "tiny" / "heatmap.png").unlink()
    r = subprocess.run(["make", "-C", str(paper)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "heatmap" in r.stdout + r.stderr


# -- outputs checked before anything is written (issue 12) ------------------------------------------------------

def _tree(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_refuses_an_output_that_is_a_file_or_unwritable(tmp_path):
    from conftest import assert_one_line_error, run_in_process, write_capture_run

    from driftscope import figures as cli_figures

    run = write_capture_run(tmp_path / "s.h5")
    (tmp_path / "some_file").write_text("keep me")
    before = _tree(tmp_path)
    for out, fragment in ((tmp_path / "some_file", "not a directory"), ("/proc/driftscope-figures", "/proc"),
                          ("/sys/driftscope-figures", "Permission denied"),
                          (tmp_path / "some_file" / "sub", "not a directory")):
        assert_one_line_error(run_in_process(cli_figures, str(run), "--out", str(out)), fragment)
    assert_one_line_error(run_in_process(cli_figures, str(run), "--out", str(tmp_path / "f"), "--tables",
                                         str(tmp_path / "some_file")), "not a directory")
    # a bad input after a good one: nothing written for the good one either
    assert_one_line_error(run_in_process(cli_figures, str(run), str(tmp_path / "missing.h5"), "--out",
                                         str(tmp_path / "f")), "missing.h5")
    assert _tree(tmp_path) == before and not (tmp_path / "f").exists()


def test_cli_replaces_existing_figures_only_with_overwrite(tmp_path):
    from conftest import assert_one_line_error, run_in_process, write_capture_run

    from driftscope import figures as cli_figures

    run = write_capture_run(tmp_path / "s.h5")
    out = tmp_path / "figs"
    code, _, err = run_in_process(cli_figures, str(run), "--out", str(out), "--quiet")
    assert code == 0, err
    first = _tree(out)
    assert out / "s" / "heatmap.png" in first
    for path in first:  # mark every file, so that a rewrite shows
        path.write_bytes(b"committed")
    assert_one_line_error(run_in_process(cli_figures, str(run), "--out", str(out)), "already holds figures",
                          "--overwrite")
    assert set(_tree(out).values()) == {b"committed"}
    code, _, err = run_in_process(cli_figures, str(run), "--out", str(out), "--quiet", "--overwrite")
    assert code == 0, err
    assert b"committed" not in set(_tree(out).values())
