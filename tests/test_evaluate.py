"""evaluate on the embedded model: perplexity equals transformers' own loss, `off` is exactly zero drift (prefill and
decode), emulated sage8's decode after short prompts is far worse than its prefill and the verdict says so, bad
input is one line and exit 2, and the run file holds what was printed."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error

from driftscope import cli, store
from driftscope.config import EvaluateConfig
from driftscope.errors import ConfigError
from driftscope.evaluate import build_parser, config_from_args, main
from driftscope.measure.logits import bootstrap_ppl_delta, first_divergence, logit_drift, token_nll
from driftscope.report.text import format_evaluation
from driftscope.run import evaluate as evaluation

# tiny on purpose: the decode prompts cross a 64-key block (8 and 64 tokens), 4 steps each
SMALL = dict(contexts=(32, 64), windows=2, prompt_lengths=(8, 64), decode_windows=1, decode_steps=4, generate=(1, 4),
             generation_lengths=(8,), chat=1, bootstrap=200)
PROG = "driftscope evaluate"


@pytest.fixture
def shared_model(monkeypatch, smol):
    """The CLI's model load returns the session's already loaded embedded model."""
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: smol)
    return smol


def _tables(path) -> dict[str, pd.DataFrame]:
    with store.open_run(path) as run:
        assert run.status == "complete"
        return {name: run.table(name) for name in run.tables()}


@pytest.fixture(scope="module")
def off_run(tmp_path_factory, smol):
    folder = tmp_path_factory.mktemp("off")
    plain = folder / "prompts.txt"
    plain.write_text("The capital of France is\n\nOnce upon a time\n", encoding="utf-8")
    out = evaluation.run_evaluate(EvaluateConfig(quant_attention="off", prompts_file=str(plain), **SMALL), loaded=smol,
                                  progress=False, out=folder / "off.h5", argv=["test"])
    return out, _tables(out)


@pytest.fixture(scope="module")
def quant_cli_run(tmp_path_factory, smol):
    """Two emulated paths through the CLI's main, with a JSONL prompts file; (path, tables, stdout)."""
    folder = tmp_path_factory.mktemp("q8")
    out, prompts = folder / "q8.h5", folder / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Name a colour."}]}) + "\n")
    argv = ["--paths", "sage8,sage8-nosmooth", "--contexts", "32,64", "--windows", "2", "--prompt-lengths", "8,64",
            "--decode-steps", "4", "--generate", "1,4", "--generation-lengths", "8", "--chat", "1",
            "--prompts-file", str(prompts), "--quiet", "--out", str(out)]
    mp = pytest.MonkeyPatch()
    mp.setattr(evaluation, "load_model", lambda *a, **k: smol)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert cli.run(PROG, main, argv) == 0
    finally:
        mp.undo()
    return out, _tables(out), stdout.getvalue()


def test_perplexity_equals_transformers_labels_loss(off_run, smol):
    path, t = off_run
    model = smol[0]
    assert model.config._attn_implementation == "sdpa"
    with store.open_run(path) as run:
        windows = {i: run.prompt_tokens(i) for i in t["perplexity"]["prompt"].unique()}
    for context, rows in t["perplexity"][t["perplexity"]["side"] == "base"].groupby("context"):
        losses = []
        with torch.inference_mode():
            for prompt in rows["prompt"]:
                ids = torch.from_numpy(windows[prompt])[None]
                assert ids.shape[1] == context
                losses.append(model(input_ids=ids, labels=ids).loss.item())  # equal token counts per window
        expected = math.exp(np.mean(losses))
        got = t["summary"].set_index("context").loc[context, "ppl_base"]
        assert abs(got - expected) / expected <= 1e-5, (context, got, expected)
        assert 3 < got < 300, got  # a trained model on English text


def test_off_gives_exactly_zero_deltas_in_prefill_decode_and_generations(off_run):
    _, t = off_run
    s = t["summary"]
    assert list(s["context"]) == [32, 64] and (s["windows"] == 2).all() and set(s["path"]) == {"sdpa"}
    for col in ("ppl_delta", "ppl_delta_pct", "ci_low", "ci_high", "kl_mean", "kl_max", "max_abs_dlogit"):
        assert (s[col] == 0).all(), (col, s[col].tolist())
    assert (s["top1_agree"] == 1).all()
    p = t["perplexity"].pivot(index="prompt", columns="side", values="nll_sum")
    assert (p["base"] == p["sdpa"]).all()
    d = t["decode"]
    assert sorted(d["prompt_length"].unique()) == [8, 64] and len(d) == 2 * 4
    assert (d["kl"] == 0).all() and (d["top1"] == 1).all() and (d["nll_base"] == d["nll_path"]).all()
    assert (d["kv_len"] == d["prompt_length"] + d["step"]).all()
    assert (t["decode_prefill"]["kl_mean"] == 0).all() and (t["decode_summary"]["kl_mean"] == 0).all()
    g = t["generations"]
    assert set(g["group"]) == {"corpus-8", "chat", "file"} and len(g) == 4  # 2 lines of the plain prompts file
    assert (g["exact_match"] == 1).all() and (g["base_text"] == g["path_text"]).all() and (g["nll_ratio"] == 1).all()
    assert (t["nonfinite"]["nonfinite"] == 0).all()
    v = t["verdict"]
    assert not (v["kind"] == "flag").any() and (v["kind"] == "ok").sum() == 1


def test_emulated_sage8_decode_after_short_prompts_dwarfs_its_prefill_drift(quant_cli_run, smol):
    """Measured on the CPU (bf16, emulated sage8, 4 steps): decode KL after 8-token prompts ~2.0 (top-1 0%)
    against ~2.4e-3 over the same prompts' prefill (~800x); after 64 tokens (kv_len 65-68, 60-63 zero-filled
    keys in the softmax) ~0.07 (~20x)."""
    path, t, _ = quant_cli_run
    d = t["decode_summary"].set_index(["path", "prompt_length"])
    short = d.loc[("sage8", 8)]
    assert short["kl_mean"] > 0.5 and short["ratio"] > 100, short.to_dict()
    assert short["top1"] < 0.75
    s = t["summary"]
    cols = ["ppl_base", "ppl_path", "ppl_delta", "ci_low", "ci_high", "kl_mean", "kl_max", "max_abs_dlogit"]
    assert np.isfinite(s[cols].to_numpy()).all() and (s["kl_mean"] > 0).all()
    assert (s["ci_low"] <= s["ppl_delta"]).all() and (s["ppl_delta"] <= s["ci_high"]).all()
    assert set(s["path"]) == {"sage8", "sage8-nosmooth"}
    assert set(t["perplexity"]["side"]) == {"base", "sage8", "sage8-nosmooth"}
    assert set(t["perplexity"]["attn"]) == {"sdpa", "sage8", "sage8-nosmooth"}
    assert set(t["generations"]["group"]) == {"corpus-8", "chat", "file"}
    with store.open_run(path) as run:
        assert run.environment["sage_impl"] == {"sage8": "emulate", "sage8-nosmooth": "emulate"}
        assert run.environment["compared"]["paths"] == ["sage8", "sage8-nosmooth"]
        assert run.config["quant_attention"] == "8bit"
    assert smol[0].config._attn_implementation == "sdpa"  # restored


def test_verdict_flags_the_short_prompt_decode_failure(quant_cli_run):
    _, t, stdout = quant_cli_run
    flags = t["verdict"][(t["verdict"]["kind"] == "flag") & (t["verdict"]["name"] == "decode_kernel")]
    assert ("sage8", "8") in set(zip(flags["path"], flags["key"]))
    assert "FLAG: decode drift after 8-token prompts is" in stdout
    assert "the decode kernel, not quantization noise" in stdout
    assert "rests on 2 windows (fewer than 10)" in stdout


def test_run_file_tables_match_what_was_printed(quant_cli_run):
    path, t, stdout = quant_cli_run
    with store.open_run(path) as run:
        dtype, env = run.model["dtype"], run.environment
    assert format_evaluation(t, dtype, env["compared"], env["sage_impl"]) in stdout
    assert "Verdict: sage8 (emulate) vs the SDPA baseline (bfloat16)" in stdout
    assert f"run file: {path}" in stdout
    # the stored summaries and verdict are exactly what the stored per-prompt tables give (as for an interrupted run)
    per_prompt = ("perplexity", "logits", "decode", "decode_prefill", "generations", "nonfinite")
    again = evaluation.summaries({k: t[k] for k in per_prompt}, resamples=200, seed=0)
    assert sorted(again) == ["decode_summary", "generation_summary", "summary", "verdict"]
    for name, df in again.items():
        pd.testing.assert_frame_equal(df, t[name], check_dtype=False)
    for g in t["generations"].itertuples():
        tokens = t["generation_tokens"][t["generation_tokens"]["prompt"] == g.prompt]
        base, other = (tokens[tokens["side"] == s].sort_values("step")["token"].to_numpy() for s in ("base", g.path))
        assert first_divergence(base, other) == g.first_divergence


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, shared_model, run_cli):
    def run(*argv):
        code = cli.run(PROG, main, [*argv, "--quiet", "--out", str(tmp_path / "bad.h5")])
        err = capsys.readouterr().err
        return type("Proc", (), {"returncode": code, "stderr": err})

    assert_one_line_error(run("--contexts", "9000"), "9000", "8192")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("A short corpus. It has only a few sentences, far too few for the windows asked.\n")
    assert_one_line_error(run("--corpus", str(tiny), "--contexts", "64", "--windows", "50", "--generate", "0,0"),
                          "64 tokens", "50")
    assert not (tmp_path / "bad.h5").exists()
    assert_one_line_error(run_cli("evaluate", "--quant-attention", "4bit"), "4bit", "off", "8bit")
    assert_one_line_error(run_cli("evaluate", "--quant_attention=int8"), "int8")


def test_flag_spellings_and_config_validation():
    for spelling in (["--quant-attention", "8bit"], ["--quant_attention=8bit"], ["--quant-attention=8bit"]):
        assert build_parser().parse_args(spelling).quant_attention == "8bit"
    assert config_from_args(build_parser().parse_args([])).quant_attention == "off"
    both = config_from_args(build_parser().parse_args(["--paths", "sage8,sage8-nosmooth"]))
    assert both.quant_attention == "8bit" and both.paths == ("sage8", "sage8-nosmooth")
    assert build_parser().parse_args(["--contexts", "512,max"]).contexts == (512, "max")
    assert EvaluateConfig(contexts=(512, "max", 8192)).resolved_contexts(8192) == (512, 8192)
    assert evaluation.compared_paths(EvaluateConfig(quant_attention="8bit"), "cpu")[0] == ("sage8",)
    assert evaluation.compared_paths(EvaluateConfig(), "cpu")[0] == ("sdpa",)
    for bad in (dict(contexts=(1,)), dict(contexts=("huge",)), dict(windows=0), dict(generate=(3,)),
                dict(generate=(2, 0)), dict(quant_attention="4bit"), dict(paths=("fp16",)),
                dict(paths=("sage8", "sage8")), dict(paths=("sage8",), quant_attention="off"),
                dict(prompt_lengths=()), dict(prompt_lengths=(0,)), dict(decode_steps=0), dict(chat=99),
                dict(prompts_file="x", generate=(0, 0))):
        with pytest.raises(ConfigError):
            EvaluateConfig(**bad)


def test_logit_metrics_on_known_values():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    ids = torch.tensor([0, 3, 6, 1, 2])
    expected = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
    assert torch.allclose(token_nll(logits, ids, chunk=2), expected)
    same = logit_drift(logits, logits.clone(), chunk=2)
    assert same == {"positions": 5, "kl_mean": 0.0, "kl_max": 0.0, "top1_agree": 1.0, "max_abs_dlogit": 0.0}
    other = logits.clone()
    other[0] += torch.tensor([0, 0, 0, 0, 0, 0, 10.0])
    d = logit_drift(logits, other)
    assert d["max_abs_dlogit"] == 10.0 and d["top1_agree"] == 0.8 and d["kl_max"] > 0
    assert bootstrap_ppl_delta([1.0, 2.0], [1.0, 2.0], [1, 1]) == (0.0, 0.0)
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2 and first_divergence([1, 2], [1, 2]) == 2


def test_a_run_that_commits_nothing_leaves_no_file(tmp_path, tiny, monkeypatch):
    model, corpus = tiny
    out = tmp_path / "runs" / "never.h5"
    config = EvaluateConfig(model=str(model), corpus=str(corpus), quant_attention="off", contexts=(16,), windows=2,
                            prompt_lengths=(8,), decode_steps=2, generate=(0, 0), chat=0, bootstrap=10)
    real = evaluation.window_rows
    for exc in (RuntimeError("the first forward failed"), KeyboardInterrupt()):
        def fail(*a, **k):
            raise exc
        monkeypatch.setattr(evaluation, "window_rows", fail)
        with pytest.raises(type(exc)):
            evaluation.run_evaluate(config, out=out, progress=False)
        assert not list(tmp_path.iterdir())  # no run file, no journal, no runs/ folder
    calls = []

    def fail_second(*a, **k):  # a window committed, then a failure: the file stays
        if calls:
            raise RuntimeError("the second window failed")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "window_rows", fail_second)
    with pytest.raises(RuntimeError):
        evaluation.run_evaluate(config, out=out, progress=False)
    with store.open_run(out) as run:
        assert run.status == "interrupted" and run.prompts()["complete"].tolist() == [True]
    monkeypatch.setattr(evaluation, "window_rows", real)
    evaluation.run_evaluate(config, out=out, overwrite=True, progress=False)  # and a finished run stays
    assert _tables(out)["perplexity"]["window"].tolist() == [0, 0, 1, 1]
