"""The notebooks in experiments/ are the tutorial: they must run, and they are committed without outputs.

Each notebook is executed top to bottom with nbclient on a kernel that runs *this* interpreter (a kernelspec
written to a temporary JUPYTER_PATH, so neither a user-level `python3` kernel nor a missing one can send the
notebook to another environment). Run files and figures go to a temporary folder (DRIFTSCOPE_NB_OUT), the
working directory is that folder too, so nothing is written into the repository.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "experiments").glob("*.ipynb"))
KERNEL = "driftscope-tests"
CELL_TIMEOUT_S = 900  # one cell: the slowest capture takes a few minutes on 2 CPU cores


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_smoothing_k.ipynb", "03_decode_and_long_context.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    """CI check: outputs are stripped in git (clear them with `jupyter nbconvert --clear-output --inplace`)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec should be python3"


@pytest.fixture(scope="module")
def kernel_here(tmp_path_factory, monkeypatch_module):
    """A kernelspec that starts ipykernel with the interpreter running the tests, found first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"driftscope tests ({sys.executable})", "language": "python"}))
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    return KERNEL


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_here, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("DRIFTSCOPE_NB_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_here, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.0f} s")
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert shown, f"{path.name} displayed no figure"
    assert any(out.glob("*.h5")), f"{path.name} wrote no run file to DRIFTSCOPE_NB_OUT"
    assert not list((REPO / "experiments").glob("*.h5")), "a notebook wrote a run file into the repository"
