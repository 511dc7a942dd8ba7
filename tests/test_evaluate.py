"""evaluate on the embedded model: perplexity equals transformers' own loss, `off` is exactly zero drift,
8-bit drift is real, bad input is one line and exit 2, and the run file holds what was printed."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error

from driftscope import cli, store
from driftscope.run import evaluate as evaluation
from driftscope.config import EvaluateConfig
from driftscope.errors import ConfigError
from driftscope.evaluate import build_parser, main
from driftscope.report.text import format_generations, format_summary
from driftscope.measure.logits import bootstrap_ppl_delta, first_divergence, logit_drift, token_nll

SMALL = dict(contexts=(32, 64), windows=2, generate=(2, 4), prompt_length=16, bootstrap=200)
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
    out = evaluation.run_evaluate(EvaluateConfig(quant_attention="off", **SMALL), loaded=smol, progress=False,
                              out=tmp_path_factory.mktemp("off") / "off.h5", argv=["test"])
    return out, _tables(out)


@pytest.fixture(scope="module")
def quant_cli_run(tmp_path_factory, smol):
    """The 8-bit run through the CLI's main, with the `--quant_attention=8bit` spelling; (path, tables, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("q8") / "q8.h5"
    argv = ["--quant_attention=8bit", "--contexts", "32,64", "--windows", "2", "--generate", "2,4",
            "--prompt-length", "16", "--quiet", "--out", str(out)]
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


def test_off_gives_exactly_zero_deltas(off_run):
    _, t = off_run
    s = t["summary"]
    assert list(s["context"]) == [32, 64] and (s["windows"] == 2).all()
    for col in ("ppl_delta", "ci_low", "ci_high", "kl_mean", "kl_max", "max_abs_dlogit"):
        assert (s[col] == 0).all(), (col, s[col].tolist())
    assert (s["top1_agree"] == 1).all()
    assert (t["logits"][["kl_mean", "kl_max", "max_abs_dlogit"]] == 0).all().all()
    p = t["perplexity"].pivot(index="prompt", columns="side", values="nll_sum")
    assert (p["base"] == p["quant"]).all()
    g = t["generations"]
    assert (g["exact_match"] == 1).all() and (g["first_divergence"] == 4).all()
    assert (g["base_text"] == g["quant_text"]).all()
    assert t["generation_summary"]["exact_match_rate"].item() == 1.0
    assert set(t["perplexity"]["attn"]) == {"sdpa"}


def test_emulated_8bit_gives_finite_nonzero_deltas(quant_cli_run, smol):
    path, t, _ = quant_cli_run
    s = t["summary"]
    cols = ["ppl_base", "ppl_quant", "ppl_delta", "ci_low", "ci_high", "kl_mean", "kl_max", "max_abs_dlogit"]
    assert np.isfinite(s[cols].to_numpy()).all()
    assert (s["kl_mean"] > 0).all() and (s["max_abs_dlogit"] > 0).all() and (s["ppl_delta"] != 0).all()
    assert ((s["top1_agree"] > 0.5) & (s["top1_agree"] <= 1)).all()
    assert (s["ci_low"] <= s["ppl_delta"]).all() and (s["ppl_delta"] <= s["ci_high"]).all()
    assert set(t["perplexity"]["attn"]) == {"sdpa", "sage8"}
    with store.open_run(path) as run:
        assert run.environment["sage_impl"] == {"sage8": "emulate"}
        assert run.config["quant_attention"] == "8bit"
    assert smol[0].config._attn_implementation == "sdpa"  # restored


def test_run_file_tables_match_what_was_printed(quant_cli_run):
    path, t, stdout = quant_cli_run
    assert format_summary(t["summary"], "8bit") in stdout
    assert format_generations(t["generations"], t["generation_summary"], "8bit") in stdout
    assert f"run file: {path}" in stdout
    # the stored summary is exactly what the stored per-window tables give
    again = evaluation.summarize(t["perplexity"], t["logits"], resamples=2000, seed=0)
    pd.testing.assert_frame_equal(again, t["summary"], check_dtype=False)
    for g in t["generations"].itertuples():
        tokens = t["generation_tokens"][t["generation_tokens"]["prompt"] == g.prompt]
        base, quant = (tokens[tokens["side"] == s].sort_values("step")["token"].to_numpy() for s in ("base", "quant"))
        assert first_divergence(base, quant) == g.first_divergence


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
    assert build_parser().parse_args([]).quant_attention == "off"
    assert build_parser().parse_args(["--contexts", "512,max"]).contexts == (512, "max")
    assert EvaluateConfig(contexts=(512, "max", 8192)).resolved_contexts(8192) == (512, 8192)
    for bad in (dict(contexts=(1,)), dict(contexts=("huge",)), dict(windows=0), dict(generate=(3,)),
                dict(generate=(2, 0)), dict(quant_attention="4bit")):
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
