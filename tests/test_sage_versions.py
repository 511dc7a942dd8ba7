"""experiments/sage_versions.py: the committed SageAttention 1.0.6 vs 2.x table comes from the committed GPU runs."""
from __future__ import annotations

import importlib.util
import sys

import pandas as pd
import pytest
from conftest import REPO

from driftscope.report import versions
from driftscope.report.tables import AnalysisError
from driftscope.report.text import markdown_table


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("sage_versions_script", REPO / "experiments" / "sage_versions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comparison(script):
    return script.load(script.CAPTURES, script.EVALUATES, [p for p in script.BENCH if p.is_file()], script.FIDELITY)


def test_committed_table_is_reproduced(script, tmp_path):
    assert script.main(["--out-md", str(tmp_path / "v.md"), "--out-fig", str(tmp_path / "v")]) == 0
    committed = (REPO / "experiments" / "results" / "sage_versions.md").read_text(encoding="utf-8")
    assert (tmp_path / "v.md").read_text(encoding="utf-8") == committed, \
        "experiments/results/sage_versions.md is stale: rerun python experiments/sage_versions.py"
    assert (tmp_path / "v.png").stat().st_size > 10_000


def test_each_path_from_its_compiled_run(comparison):
    got = dict(zip(comparison.paths["path"], comparison.paths["version"]))
    assert got == {"sage8": "1.0.6", "sage8-nosmooth": "1.0.6", "sage2-triton": "2.2.0", "sage2-fp8": "2.2.0",
                   "sage2-fp8-nosmooth": "2.2.0"}
    assert set(comparison.evaluate["path"]) == set(got) and set(comparison.fidelity["path"]) == set(got)
    assert comparison.device == "NVIDIA H200"


def test_decode_kernels_science(comparison):
    d = comparison.evaluate[(comparison.evaluate["name"] == "decode_kl") & (comparison.evaluate["key"] == 8)]
    d = d.set_index("path")
    # 1.0.6's decode kernel counts the padded keys of the last block in its softmax: short prompts break
    assert d.loc["sage8", "value"] > 100 * d.loc["sage2-triton", "value"]
    # 2.x masks them: its decode drift is the prefill's quantization noise ("low" = prefill KL, "high" = ratio)
    for path in ("sage2-triton", "sage2-fp8", "sage2-fp8-nosmooth"):
        assert 1 / 3 < d.loc[path, "high"] < 3, (path, d.loc[path].to_dict())
        assert d.loc[path, "value"] == pytest.approx(d.loc[path, "high"] * d.loc[path, "low"], rel=1e-6)


def test_emulators_agree_with_kernels_at_model_scale(comparison):
    a = comparison.agreement
    assert set(a["path"]) == {"sage8", "sage2-triton", "sage2-fp8"} and len(a) == 6
    assert ((a["ratio"] - 1).abs() < 0.02).all(), a.to_string()


def test_layer_thirds_and_markdown_helpers():
    assert [list(v) for v in versions.layer_thirds(7).values()] == [[0, 1, 2], [3, 4], [5, 6]]
    layers = pd.DataFrame({"path": "p", "phase": "prefill", "layer": range(6), "value": [1, 3, 2, 2, 5, 9.0]})
    assert versions.layer_classes(layers)["value"].tolist() == [2.0, 2.0, 7.0]
    with pytest.raises(AnalysisError, match="more than one"):
        versions.compiled_paths({"a": {"sage_impl": {"sage8": "kernel"}}, "b": {"sage_impl": {"sage8": "kernel"}}})
    assert markdown_table(pd.DataFrame({"a": ["x|y"], "n": [1]})) == "| a | n |\n| --- | ---: |\n| x\\|y | 1 |"
