"""The committed figures and paper come from the committed run files, by the README's own command."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO


def readme_figures_command() -> list[str]:
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("python -m driftscope.figures experiments/results/"):
            return shlex.split(line)[3:]
    raise AssertionError("README.md shows no `python -m driftscope.figures experiments/results/...` line")


def test_figures_regenerate_from_committed_runs(tmp_path):
    from driftscope.report import figures

    args = readme_figures_command()
    inputs = [a for a in args if not a.startswith("--") and a.startswith("experiments/")]
    # the same layout as the repository, so that the paper's relative figure paths agree
    figures.regenerate([REPO / p for p in inputs], out=tmp_path / "figures", tables=tmp_path / "paper" / "generated",
                       argv=["python", "-m", "driftscope.figures", *args], log=lambda *a: None)
    committed = sorted((REPO / "figures" / "data").rglob("*.csv"))
    assert committed, "figures/data holds no CSV digests"
    for csv in committed:
        fresh = tmp_path / "figures" / "data" / csv.relative_to(REPO / "figures" / "data")
        assert fresh.is_file(), f"{csv} is not produced by the README's figures command any more"
        a, b = pd.read_csv(csv), pd.read_csv(fresh)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), csv
        for col in a.columns:
            if pd.api.types.is_numeric_dtype(a[col]):
                assert np.allclose(a[col], b[col], rtol=1e-9, atol=0, equal_nan=True), (csv, col)
            else:
                assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), (csv, col)
    for name in ("numbers.tex", "smoothing.tex", "runs.tex"):
        assert (tmp_path / "paper" / "generated" / name).read_text() == (REPO / "paper" / "generated" / name).read_text(), name


@pytest.mark.skipif(shutil.which("pdflatex") is None and not os.environ.get("CI"),
                    reason="pdflatex is not installed (CI installs it)")
def test_paper_builds_from_committed_figures(tmp_path):
    paper = tmp_path / "paper"
    shutil.copytree(REPO / "paper", paper, ignore=shutil.ignore_patterns("*.pdf", "*.aux", "*.log", "*.out"))
    os.symlink(REPO / "figures", tmp_path / "figures")
    proc = subprocess.run(["make", "-C", str(paper)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (paper / "driftscope.pdf").stat().st_size > 50_000
