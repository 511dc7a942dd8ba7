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
# spawns a CLI, executes notebooks, kills processes, runs TeX or the interpreter grid (these fixtures and modules,
# and tests marked slow).
SLOW_FIXTURES = {"smol", "smol_folder", "run_cli"}
SLOW_MODULES = {"test_notebooks", "test_reliability", "test_store_crash", "test_committed_results",
                "test_emulator_fidelity"}  # the last: 448 cases under the Triton interpreter, about 4 minutes


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


# an in-memory random Llama for the fast suite: two layers, grouped-query attention (2 query heads, 1 KV head)
TINY_LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def tiny_llama():
    """A random fp32 LlamaForCausalLM of TINY_LLAMA's shape, built in memory (no files); one per test module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


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


def save_tiny_model(folder: Path, layers: int = 2, max_context: int = 512) -> Path:
    """A tiny random Llama checkpoint with its own 200-word tokenizer (words w0 ... w199): real transformers
    files that load in a fraction of a second, with no dependency on the embedded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(200)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=max_context, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    return folder


def write_corpus(path: Path, documents: int = 6, words: int = 200) -> Path:
    """A UTF-8 corpus of the tiny model's words: `documents` blank-line-separated documents."""
    import random

    rng = random.Random(0)
    docs = ["\n".join(" ".join(f"w{rng.randrange(200)}" for _ in range(words // 5)) for _ in range(5))
            for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model folder, corpus file) of save_tiny_model and write_corpus."""
    base = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(base / "model"), write_corpus(base / "corpus.txt")


def write_capture_run(path: Path, prompts: int = 1, layers: int = 2, heads: int = 3,
                      paths=("fp16", "sage8"), nonfinite: dict | None = None) -> Path:
    """A capture run file made by the store alone (no model): `prompts` committed prompts of attention-output
    drift rows (cosine, rel_l2) per layer and head, propagated and isolated, prefill and decode, and a
    non-finite count per layer, path and phase (0, or nonfinite[(path, phase, layer)] in the propagated mode).
    prompts=0 gives the file a run that failed before its first prompt leaves behind (status interrupted)."""
    import numpy as np

    from driftscope import store

    config = {"paths": list(paths), "lengths": [16], "store": [], "heads": None, "tokens": None}
    writer = store.RunWriter(path, kind="capture", argv=["test"], config=config, environment={"device": "cpu"})
    writer.set_model({"name": "tiny", "n_layers": layers, "n_heads": heads, "n_kv_heads": 1, "head_dim": 64})
    for p in range(prompts):
        writer.add_prompt(p, np.arange(16), f"doc@{p}")
        rows = [dict(prompt=p, length=16, mode=mode, phase=phase, step=0 if phase == "prefill" else 1,
                     layer=layer, head_index=head, site="attn_out", path=path, metric=metric, element=-1,
                     value=(1 - 1e-3 * (layer + 1)) if metric == "cosine" else 1e-2 * (layer + head + 1))
                for mode in ("propagated", "isolated") for phase in ("prefill", "decode")
                for layer in range(layers) for head in range(heads) for path in paths[1:]
                for metric in ("cosine", "rel_l2")]
        rows += [dict(prompt=p, length=16, mode=mode, phase=phase, step=0 if phase == "prefill" else 1,
                      layer=layer, head_index=-1, site="attn_out", path=path, metric="nonfinite", element=-1,
                      value=(nonfinite or {}).get((path, phase, layer), 0) if mode == "propagated" else 0)
                 for mode in ("propagated", "isolated") for phase in ("prefill", "decode")
                 for layer in range(layers) for path in paths]
        writer.append("metrics", {c: np.array([r[c] for r in rows]) for c in store.METRICS_COLUMNS})
        writer.commit_prompt(p)
    writer.close("complete" if prompts else "interrupted")
    return path


@pytest.fixture
def run_cli():
    """Run `python -m driftscope.<module> args...` in a subprocess; returns CompletedProcess (text). An `env`
    value of None removes that variable (e.g. TRITON_INTERPRET, which this test session sets)."""

    def run(module: str, *args: str, env: dict | None = None, timeout: int = 600, cwd=REPO):
        full_env = {**os.environ, **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        return subprocess.run([sys.executable, "-m", f"driftscope.{module}", *args], capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=cwd)

    return run


def run_in_process(module, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m driftscope.<module> args...` run in this process through
    cli.run, as its `__main__` does (argparse's own errors exit through SystemExit)."""
    import contextlib
    import io

    from driftscope import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.run(f"driftscope {module.__name__.rsplit('.', 1)[-1]}", module.main, list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(proc, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback. `proc` is a CompletedProcess or the
    (code, stdout, stderr) of run_in_process."""
    code, stderr = (proc[0], proc[2]) if isinstance(proc, tuple) else (proc.returncode, proc.stderr)
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
