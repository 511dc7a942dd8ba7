"""Teacher-forced decode, prompts files, the verdict and the decode figures, on tiny random models and synthetic
tables (fast), plus the emulated decode failure after short prompts on a tiny model."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AttentionInterface

from driftscope import cli, paths
from driftscope.errors import ConfigError
from driftscope.evaluate import main
from driftscope.hooks import decode
from driftscope.hooks.attention import registered, sage_implementations
from driftscope.measure.logits import next_token_drift, next_token_nll, token_nll
from driftscope.prompts import encode, read_prompts_file
from driftscope.report import verdict
from driftscope.run import evaluate as evaluation

# -- the teacher-forced loop ---------------------------------------------------------------------------------

def test_teacher_forced_baseline_nlls_equal_a_full_forward(tiny_llama):
    prompt = torch.arange(5, 17)
    with torch.inference_mode():
        tokens, greedy_NxV = decode.greedy_logits(tiny_llama, prompt, 7)
        forced_NxV = decode.teacher_forced(tiny_llama, prompt, tokens)
        full_TxV = decode.full_logits(tiny_llama, torch.cat([prompt, tokens])).float()
    assert torch.equal(greedy_NxV, forced_NxV)  # the same loop: the baseline side of a comparison, bitwise
    assert tokens.tolist() == greedy_NxV.argmax(-1).tolist()
    ids = torch.cat([prompt, tokens])
    full_nll = token_nll(full_TxV, ids)[len(prompt) - 1:].double().numpy()
    assert np.abs(next_token_nll(forced_NxV, tokens) - full_nll).max() < 1e-4


def test_decode_rows_of_the_baseline_against_itself_are_exactly_zero(tiny_llama):
    with torch.inference_mode():
        dec, pre, bad = evaluation.decode_rows(tiny_llama, torch.arange(3, 11), 5, {"base": "sdpa", "sdpa": "sdpa"})
    assert list(dec["step"]) == [1, 2, 3, 4, 5] and list(dec["kv_len"]) == [9, 10, 11, 12, 13]
    assert (dec["kl"] == 0).all() and (dec["top1"] == 1).all() and (dec["nll_base"] == dec["nll_path"]).all()
    assert pre["kl_mean"].item() == 0 and pre["positions"].item() == 8 and (bad["nonfinite"] == 0).all()
    # the baseline's NLLs are the full forward's: step s predicts the baseline's token s, at position 7 + s
    with torch.inference_mode():
        prompt = torch.arange(3, 11)
        tokens, _ = decode.greedy_logits(tiny_llama, prompt, 6)
        ids = torch.cat([prompt, tokens])
        full = decode.full_logits(tiny_llama, ids).float()
    assert dec["token"].tolist() == tokens[1:].tolist()
    assert np.abs(dec["nll_base"].to_numpy() - token_nll(full, ids)[8:].double().numpy()).max() < 1e-4


def test_emulated_sage8_decode_is_worse_after_a_partial_key_block(tiny_llama):
    """sage8's decode kernel counts the zero-filled keys of the last 64-key block: a tiny_llama random model already
    shows decode drift far above its prefill drift after an 8-token prompt."""
    with torch.inference_mode(), registered("emulate"):
        dec, pre, _ = evaluation.decode_rows(tiny_llama, torch.arange(3, 11), 4, {"base": "sdpa", "sage8": "sage8"})
    assert dec["kl"].mean() > 10 * pre["kl_mean"].item() > 0


@pytest.mark.parametrize("path", ["sage2-triton", "sage2-fp8"])
def test_emulated_sage2_decode_stays_near_its_prefill_drift(tiny_llama, path):
    """2.x quantizes the decode step's single query and its keys like a prefill: after the same 8-token prompt its
    decode drift is of the order of its prefill drift, where sage8's is over 10x above it (the test above)."""
    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)  # 2.x takes half-precision inputs only
    with torch.inference_mode(), registered("emulate"):
        dec, pre, _ = evaluation.decode_rows(model, torch.arange(3, 11), 4, {"base": "sdpa", path: path, "sage8": "sage8"})
    ratio = dec.groupby("path")["kl"].mean() / pre.set_index("path")["kl_mean"]
    assert ratio[path] < 3 and ratio["sage8"] > 10 * ratio[path], ratio.to_dict()


def test_next_token_drift_known_values():
    torch.manual_seed(0)
    a = torch.randn(4, 9)
    same = next_token_drift(a, a.clone(), torch.tensor([0, 1, 2, 3]))
    assert (same["kl"] == 0).all() and (same["top1"] == 1).all() and (same["nll_base"] == same["nll_test"]).all()
    b = a.clone()
    b[0, 8] += 50
    d = next_token_drift(a, b)
    p, q = torch.softmax(a[0].double(), -1), torch.softmax(b[0].double(), -1)
    assert d["kl"].dtype == np.float64 and abs(d["kl"][0] - (p * (p / q).log()).sum().item()) < 1e-12
    assert d["top1"].tolist()[0] == 0 and "nll_base" not in d


# -- prompts files -------------------------------------------------------------------------------------------

class _Tokenizer:
    chat_template = "{{ messages }}"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_prompts_files_in_both_formats(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n  \nsecond {not json}\n", encoding="utf-8")
    got = read_prompts_file(plain)
    assert [p.text for p in got] == ["first prompt", "second {not json}"] and got[1].source == "file:p.txt:4"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "yo"}], "id": 7}) + "\n", encoding="utf-8")
    a, b = read_prompts_file(jsonl)
    assert a.text == "hi" and b.messages == ({"role": "user", "content": "yo"},) and b.source == "file:p.jsonl:3"
    assert encode(b, _Tokenizer()).tolist() == [ord(c) for c in "<user>yo<assistant>"]
    sniffed = tmp_path / "sniffed.txt"  # JSONL without the suffix: the first line is an object
    sniffed.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert read_prompts_file(sniffed)[0].text == "x"


@pytest.mark.parametrize("content, fragments", [
    (None, ["does not exist"]),
    ("\n  \n", ["holds no prompts"]),
    (b"ok line\n\xff\xfe bad\n", ["line 2", "not UTF-8"]),
    ('{"prompt": "a"}\n{"prompt": \n', ["line 2", "not valid JSON"]),
    ('{"prompt": "a"}\n{"text": "b"}\n', ["line 2", "'prompt'", "'messages'"]),
    ('{"messages": [{"role": "user"}]}\n', ["line 1", "'content'"]),
])
def test_bad_prompts_files_are_one_line_naming_file_and_line(tmp_path, capsys, content, fragments):
    f = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        read_prompts_file(f)
    assert "bad.jsonl" in str(e.value) and all(x in str(e.value) for x in fragments), str(e.value)
    # the CLI checks it before loading any model: one line, exit 2, no file written
    code = cli.run("driftscope evaluate", main, ["--prompts-file", str(f), "--out", str(tmp_path / "o.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl" in err[0] and not (tmp_path / "o.h5").exists()


# -- registration --------------------------------------------------------------------------------------------

def test_every_sage_path_is_registered_and_restored():
    names = sage_implementations()
    assert names == tuple(p for p in paths.PATH_NAMES if p.startswith("sage")) and "sage8" in names
    before = dict(AttentionInterface._global_mapping)
    with registered("emulate") as got:
        assert got == names and all(n in AttentionInterface._global_mapping for n in names)
    assert dict(AttentionInterface._global_mapping) == before


# -- the verdict ---------------------------------------------------------------------------------------------

def _tables(decode_kl: float, prefill_kl: float, ratio: float, windows: int = 4,
            prompts: int = 4) -> dict[str, pd.DataFrame]:
    return {
        "summary": pd.DataFrame([{"path": "sage8", "context": 256, "windows": windows, "ppl_base": 10.0,
                                  "ppl_path": 10.01, "ppl_delta": 0.01, "ppl_delta_pct": 0.1, "ci_low": -0.01,
                                  "ci_high": 0.03, "ci_low_pct": -0.1, "ci_high_pct": 0.3, "kl_mean": prefill_kl,
                                  "kl_max": 0.1, "top1_agree": 0.98, "max_abs_dlogit": 1.0}]),
        "decode_summary": pd.DataFrame([{"path": "sage8", "prompt_length": 8, "windows": 1, "steps": 32,
                                         "kl_mean": decode_kl, "kl_max": 3.0, "top1": 0.41, "nll_base": 1.0,
                                         "nll_path": 2.0, "prefill_kl": prefill_kl, "prefill_kl_last": prefill_kl,
                                         "prefill_top1": 0.98, "ratio": decode_kl / prefill_kl}]),
        "generation_summary": pd.DataFrame([{"path": "sage8", "group": g, "prompts": prompts, "new_tokens": 24,
                                             "exact_match_rate": 0.0, "mean_first_divergence": 1.0,
                                             "nll_base_cont": 1.0, "nll_path_cont": r, "nll_ratio": r}
                                            for g, r in (("corpus-8", ratio), ("corpus-128", 1.1), ("all", 2.0))]),
        "nonfinite": pd.DataFrame({"prompt": [0, 0], "side": ["base", "sage8"], "stage": "decode",
                                   "values": [10, 10], "nonfinite": [0, 0]}),
    }


def test_verdict_flags_decode_kernel_and_garbage_and_warns_on_few_windows():
    rows = verdict.verdict_rows(_tables(1.55, 0.003, 4.0))
    flags = rows[rows["kind"] == "flag"]
    assert set(flags["name"]) == {"decode_kernel", "generation_garbage"}
    text = verdict.format_verdict(rows)
    assert "decode drift after 8-token prompts is 517× the prefill drift" in text
    assert "the decode kernel, not quantization noise" in text
    assert "generations from 8-token corpus prompts are 4.0× less likely" in text
    assert "harmless flips" in text and "128-token corpus prompts diverge" in text  # ratio 1.1: a note, no flag
    assert "rests on 4 windows (fewer than 10)" in text and "+0.10% [-0.10%, +0.30%]" in text
    # the same generations from 2 prompts: a note, no flag
    few = verdict.verdict_rows(_tables(1.55, 0.003, 4.0, prompts=2))
    assert set(few.loc[few["kind"] == "flag", "name"]) == {"decode_kernel"}
    assert "4.0× less likely under the baseline than its own (4.00 vs 1.00 nats per token), on 2 prompts only: no " \
           "flag" in verdict.format_verdict(few)


def test_verdict_thresholds_hold_back_small_or_prefill_sized_drift():
    quiet = verdict.verdict_rows(_tables(0.004, 0.003, 1.2, windows=20))
    assert not (quiet["kind"].isin(["flag", "warning"])).any() and (quiet["kind"] == "ok").sum() == 1
    tiny_but_large_ratio = verdict.verdict_rows(_tables(verdict.DECODE_KL_FLAG / 2, 1e-6, 1.0, windows=20))
    assert not (tiny_but_large_ratio["kind"] == "flag").any()


# -- figures -------------------------------------------------------------------------------------------------

def test_decode_figures_from_tables(tmp_path):
    from driftscope.report import figures, plots

    steps = np.arange(1, 9)
    dec = pd.concat([pd.DataFrame({"path": "sage8", "prompt_length": p, "window": 0, "step": steps,
                                   "kv_len": p + steps, "kl": kl / steps}) for p, kl in ((8, 1.5), (128, 0.03))])
    pre = pd.DataFrame({"path": "sage8", "prompt_length": [8, 128], "window": 0, "kl_mean": [0.003, 0.002]})
    data = figures.decode_table(dec, pre)
    assert list(data.columns) == ["path", "prompt_length", "kv_len", "kl", "prefill_kl"] and len(data) == 16
    plots.decode_kl(data, tmp_path / "decode")
    metrics = pd.DataFrame({"prompt": 0, "length": 64, "mode": "propagated", "phase": "decode", "step": steps,
                            "layer": 0, "head_index": -1, "site": "attn_out", "path": "sage8", "metric": "rel_l2",
                            "element": -1, "value": 0.1 / steps})
    cap = figures.capture_decode_table(metrics)
    assert list(cap["kv_len"]) == list(64 + steps) and np.allclose(cap["value"], 0.1 / steps)
    plots.decode_drift_vs_kv(cap, tmp_path / "decode_kv")
    for name in ("decode", "decode_kv"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.pdf").is_file()


def test_a_perplexity_move_is_flagged_only_over_enough_windows():
    for windows, kind in ((20, "flag"), (4, "note")):
        t = _tables(0.004, 0.003, 1.0, windows=windows)
        t["summary"] = t["summary"].assign(ppl_delta_pct=2.5, ci_low_pct=1.5, ci_high_pct=3.5)
        rows = verdict.verdict_rows(t)
        assert rows.loc[rows["name"] == "perplexity", "kind"].tolist() == [kind], rows
