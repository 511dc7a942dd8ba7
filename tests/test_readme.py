"""The README's commands and examples, run as written."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_first_two_blocks_set_up_and_run_the_main_job_and_the_tests():
    blocks = re.findall(r"```\n(.*?)```", README, flags=re.S)
    assert blocks[0].startswith("python3 -m venv .venv") and "driftscope.capture" in blocks[0]
    assert blocks[1].startswith("python3 -m venv .venv") and "pytest" in blocks[1]


@pytest.mark.slow
def test_python_example_runs_as_written(tmp_path, monkeypatch, smol):
    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert Path("runs/readme.h5").is_file() and Path("runs/readme-heatmap.png").is_file()
    assert namespace["logits"].shape[:2] == namespace["ids"].shape and namespace["logits"].isfinite().all()
    assert namespace["model"].config._attn_implementation == "sdpa"
