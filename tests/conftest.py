"""Shared fixtures: the embedded model (loaded once), tiny random checkpoints, and a CLI runner."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Without CUDA the sage kernels can only run under Triton's interpreter, which must be chosen before anything
# imports triton (torch's profiler does): set it for the whole test session, as a user would in the shell.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# `pytest -m "not slow"` is the suite a developer runs every few minutes. Slow: whatever loads the embedded model,
# spawns a CLI, executes notebooks, kills processes or runs TeX (these fixtures and modules, and tests marked slow).
SLOW_FIXTURES = {"smol", "smol_folder", "run_cli"}
SLOW_MODULES = {"test_notebooks", "test_reliability", "test_store_crash", "test_committed_results"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer, info) of the embedded SmolLM2-135M, bf16 on the CPU."""
    from driftscope.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_folder(smol) -> Path:
    from driftscope.models import embedded_folder

    return embedded_folder()[0]


def save_tiny_llama(folder: Path, tokenizer_from: Path, head_dim: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama checkpoint (real transformers files) with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=3 * head_dim,
                         intermediate_size=128, num_hidden_layers=layers, num_attention_heads=3,
                         num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture
def run_cli():
    """Run `python -m driftscope.<module> args...` in a subprocess; returns CompletedProcess (text)."""

    def run(module: str, *args: str, env: dict | None = None, timeout: int = 600):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", f"driftscope.{module}", *args], capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=REPO)

    return run


def assert_one_line_error(proc, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
