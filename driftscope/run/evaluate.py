"""`ds.run_evaluate(...)`: what 8-bit attention costs end to end (the library behind `python -m driftscope.evaluate`).

The same model runs on several *sides*: the baseline `base` (the model's own SDPA in its dtype,
`attn_implementation="sdpa"`) and each compared path (a sage path of `driftscope.paths`, run as
`attn_implementation=<path>`). `quant_attention="8bit"` compares the path the installed sageattention's own `sageattn`
runs on the device (`paths.default_quant_path`, else sage8); `paths=(...)` names them; `"off"` compares the baseline
with itself (side `sdpa`: every delta is exactly zero, a check of the machinery). Four measurements:

1. Perplexity and prefill logit drift: one full-sequence forward per side over non-overlapping corpus windows of
   each context length. This exercises only the *prefill* kernel.
2. Teacher-forced decode (DESIGN §4b): per prompt length P and decode window, the last P tokens of a corpus window
   are prefilled on each side into its own KV cache; the baseline's greedy continuation is then fed one token at
   a time through each side's cache (`hooks.decode.greedy_logits` / `teacher_forced`), so every side predicts
   after the same tokens and every prediction after the first is a decode-kernel step. Window w is corpus tokens
   [w·L, (w+1)·L) with L = max(P): every prompt length continues the same text.
3. Generations: greedy continuations from corpus prompts of several lengths, built-in chat questions (models with a
   chat template) and a prompts file; each side's continuation (cut after the first end-of-text token) is scored by
   the baseline's per-token NLL (teacher-forced through the baseline), which tells garbage from a harmless flip.
4. The verdict (`driftscope.report.verdict`), computed from the stored tables below.

Tables written to the run file (`kind="evaluate"`; each window and prompt is one committed prompt). `side` is "base"
or the compared path's name; `path` is a compared path; KL is KL(base ‖ path):
    perplexity        context, window, prompt, side, attn, nll_sum (float64), tokens, ppl; ppl of a context =
                      exp(Σ nll_sum / Σ tokens) over its windows
    logits            context, window, prompt, path, positions, kl_mean, kl_max, top1_agree, max_abs_dlogit
                      (over every position of the window; measure.logits.logit_drift)
    decode            prompt_length, window, prompt, path, step (1..T), kv_len (= prompt_length + step), token, kl,
                      top1 (1 if both argmaxes agree), nll_base, nll_path: one row per decode step. Step s feeds
                      the baseline's s-th greedy token (its key makes kv_len) and predicts `token`, the baseline's
                      next one; nll_* = −log p(token) on each side. Float64 from float32 logits
                      (measure.logits.next_token_drift)
    decode_prefill    prompt_length, window, prompt, path, positions, kl_mean, kl_last, top1_agree, nll_base,
                      nll_path: the same prompts' prefill (means over the P prompt positions; kl_last: the last
                      position, whose prediction is the first baseline token): the prefill reference
    generations       prompt, group (corpus-<P>, chat, file), source, path, prompt_tokens, new_tokens, base_tokens,
                      path_tokens (kept after the end-of-text cut), exact_match (0/1), first_divergence,
                      nll_base_cont, nll_path_cont (mean NLL per token of each side's continuation teacher-forced
                      through the baseline), nll_ratio (= nll_path_cont / nll_base_cont), prompt_text, base_text,
                      path_text
    generation_tokens prompt, side, step, token
    nonfinite         prompt, side, stage (perplexity | decode | generation), values, nonfinite: logit values
                      computed and how many were NaN or ±inf
    summary           path, context, windows, tokens, ppl_base, ppl_path, ppl_delta, ppl_delta_pct, ci_low, ci_high,
                      ci_low_pct, ci_high_pct (paired bootstrap 95% interval of ppl_delta over windows), kl_mean,
                      kl_max, top1_agree, max_abs_dlogit
    decode_summary    path, prompt_length, windows, steps, kl_mean, kl_max, top1, nll_base, nll_path, prefill_kl,
                      prefill_kl_last, prefill_top1, ratio (= kl_mean / prefill_kl)
    generation_summary path, group (and "all"), prompts, new_tokens, exact_match_rate, mean_first_divergence,
                      nll_base_cont, nll_path_cont (token-weighted), nll_ratio
    verdict           path, kind, name, key, value, text (driftscope.report.verdict)
The environment records `compared` ({flag, paths, by}: which path `8bit` resolved to and why), the attention
implementation of each side, each sage path's implementation and `notes` (skipped prompt lengths or chat prompts).
"""
from __future__ import annotations

import itertools
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from driftscope import corpus as corpora
from driftscope import environment, paths, store
from driftscope import prompts as user_prompts
from driftscope.config import EvaluateConfig
from driftscope.errors import ConfigError
from driftscope.hooks.attention import attention_implementation, registered
from driftscope.hooks.decode import eos_token_ids, full_logits, greedy_logits, teacher_forced
from driftscope.measure.logits import (bootstrap_ppl_delta, count_nonfinite, first_divergence, logit_drift,
                                       next_token_drift, next_token_nll, perplexity, token_nll)
from driftscope.models import check_device_map, inspect, load_model
from driftscope.report import verdict as verdicts

BASE = "base"  # the baseline's side name in every table
BASE_ATTN = "sdpa"  # the baseline: the model's own SDPA in its dtype
NULL_PATH = "sdpa"  # quant_attention "off": the baseline compared with itself


def default_out(config: EvaluateConfig) -> Path:
    name = Path(config.model).name if Path(config.model).exists() else config.model.replace("/", "--")
    tag = "-".join(config.paths) if config.paths else config.quant_attention
    return Path("runs") / f"{name}-evaluate-{tag}.h5"


def compared_paths(config: EvaluateConfig, device: str) -> tuple[tuple[str, ...], dict]:
    """The paths compared with the baseline, and how they were chosen (recorded in the run file)."""
    if config.paths:
        return config.paths, {"flag": config.quant_attention, "paths": list(config.paths), "by": "--paths"}
    if config.quant_attention == "off":
        return (NULL_PATH,), {"flag": "off", "paths": [NULL_PATH], "by": "the baseline against itself"}
    choose = getattr(paths, "default_quant_path", None)
    name = choose(device) if choose is not None else "sage8"
    by = (f"paths.default_quant_path({device!r}): what the installed sageattention's sageattn runs there"
          if choose is not None else "sage8 (this driftscope has no paths.default_quant_path)")
    return (name,), {"flag": "8bit", "paths": [name], "by": by}


def check_model(config: EvaluateConfig, info,
                compared: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """(context lengths, decode prompt lengths, a note or ""); fails before any work on what the model cannot do.

    Decode prompt lengths whose prompt + steps exceed the model's context are dropped with a warning (the defaults
    reach 512 + 32 tokens); an error only when none is left."""
    for p in compared:
        if p.startswith("sage"):
            paths.check_head_dim(info.head_dim, info.name, path=p)
    if "max" in config.contexts and not info.max_context:
        raise ConfigError(f"{info.name} does not declare a maximum context, so 'max' is unknown; give --contexts "
                          f"as numbers")
    contexts = config.resolved_contexts(info.max_context)
    limit = info.max_context
    for c in contexts:
        if limit and c > limit:
            raise ConfigError(f"context {c} exceeds {info.name}'s maximum context of {limit} tokens; use at most "
                              f"{limit} (or the word 'max')")
    lengths, note = config.prompt_lengths, ""
    if config.decode_windows and limit:
        lengths = tuple(P for P in config.prompt_lengths if P + config.decode_steps <= limit)
        dropped = [P for P in config.prompt_lengths if P not in lengths]
        if not lengths:
            raise ConfigError(f"every decode prompt length ({','.join(map(str, dropped))}) plus {config.decode_steps} "
                              f"decode steps exceeds {info.name}'s maximum context of {limit} tokens; give shorter "
                              f"--prompt-lengths or fewer --decode-steps")
        if dropped:
            note = (f"decode prompt lengths {','.join(map(str, dropped))} were skipped: with {config.decode_steps} "
                    f"steps they exceed {info.name}'s maximum context of {limit} tokens")
            warnings.warn(note, stacklevel=2)
    longest = max(config.generation_lengths) + config.generate[1]
    if config.generate[0] and limit and longest > limit:
        raise ConfigError(f"generation prompt + new tokens {longest} exceeds {info.name}'s maximum context of {limit} "
                          f"tokens; give shorter --generation-lengths or fewer new tokens (--generate N,T)")
    return contexts, lengths, note


@dataclass
class Plan:
    device: str
    info: object  # ModelInfo
    corpus: corpora.Corpus
    file_prompts: list
    compared: tuple[str, ...]
    choice: dict
    contexts: tuple[int, ...]
    prompt_lengths: tuple[int, ...]  # the decode prompt lengths that fit the model's context
    notes: list[str]
    made: list


def validate(config: EvaluateConfig, out: Path, *, overwrite: bool = False, info=None) -> Plan:
    """Every check evaluate can make before it loads weights or touches a file: device, device map, the compared
    paths and their implementation, the prompts file, the corpus, the model's config, the run file's path."""
    device = environment.resolve_device(config.device)
    check_device_map(config.device_map)
    compared, choice = compared_paths(config, device)
    sage = [p for p in compared if p.startswith("sage")]
    environment.check_sage_impl(config.sage_impl, device, sage)
    file_prompts = user_prompts.read_prompts_file(config.prompts_file) if config.prompts_file else []
    text = corpora.load_corpus(config.corpus)
    info = info or inspect(config.model, config.dtype, device, config.trust_remote_code)
    contexts, lengths, note = check_model(config, info, compared)
    made = environment.check_output_file(out, overwrite=overwrite, resumable=False)
    if sage and config.sage_impl == "interpret":
        environment.prepare_triton_interpreter()
    return Plan(device, info, text, file_prompts, compared, choice, contexts, lengths, [note] if note else [], made)


# -- the measurements (one prompt each) --------------------------------------------------------------------------

def window_rows(model, ids_T: torch.Tensor, sides: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Perplexity rows (one per side), logit drift rows (one per compared path) and non-finite counts of one window."""
    rows, drift, bad, base = [], [], [], None
    for side, attn in sides.items():
        with attention_implementation(model, attn):
            logits_TxV = full_logits(model, ids_T)
        nll = token_nll(logits_TxV, ids_T).double().sum().item()
        tokens = ids_T.numel() - 1
        rows.append({"side": side, "attn": attn, "nll_sum": nll, "tokens": tokens, "ppl": perplexity([nll], [tokens])})
        bad.append({"side": side, "stage": "perplexity", "values": logits_TxV.numel(),
                    "nonfinite": count_nonfinite(logits_TxV)})
        if side == BASE:
            base = logits_TxV
        else:
            drift.append({"path": side, **logit_drift(base, logits_TxV)})
    return pd.DataFrame(rows), pd.DataFrame(drift), pd.DataFrame(bad)


def decode_rows(model, prompt_T: torch.Tensor, steps: int, sides: dict[str, str]):
    """Teacher-forced decode of one prompt: (decode rows, decode_prefill rows, non-finite rows), one set per path.

    The baseline decodes greedily (`steps` + 1 predictions: the prefill's and `steps` decode steps'); every other
    side is fed the baseline's tokens through its own cache."""
    P = prompt_T.numel()
    prefill, logits, tokens = {}, {}, None
    for side, attn in sides.items():
        def keep(logits_PxV, side=side):
            prefill[side] = logits_PxV

        with attention_implementation(model, attn):
            if side == BASE:
                tokens, logits[side] = greedy_logits(model, prompt_T, steps + 1, on_prefill=keep)
            else:
                logits[side] = teacher_forced(model, prompt_T, tokens, on_prefill=keep)
    prompt_targets_P = torch.cat([prompt_T[1:], tokens[:1]])  # position i of the prompt predicts token i + 1
    dec, pre, bad = [], [], []
    for side in sides:
        bad.append({"side": side, "stage": "decode", "values": prefill[side].numel() + logits[side][1:].numel(),
                    "nonfinite": count_nonfinite(prefill[side]) + count_nonfinite(logits[side][1:])})
        if side == BASE:
            continue
        d = next_token_drift(logits[BASE][1:], logits[side][1:], tokens[1:])
        dec.append(pd.DataFrame({"path": side, "step": np.arange(1, steps + 1), "kv_len": P + np.arange(1, steps + 1),
                                 "token": tokens[1:].numpy(), "kl": d["kl"], "top1": d["top1"].astype(np.int64),
                                 "nll_base": d["nll_base"], "nll_path": d["nll_test"]}))
        p = next_token_drift(prefill[BASE], prefill[side], prompt_targets_P)
        pre.append({"path": side, "positions": P, "kl_mean": float(p["kl"].mean()), "kl_last": float(p["kl"][-1]),
                    "top1_agree": float(p["top1"].mean()), "nll_base": float(p["nll_base"].mean()),
                    "nll_path": float(p["nll_test"].mean())})
    return pd.concat(dec, ignore_index=True), pd.DataFrame(pre), pd.DataFrame(bad)


def cut_at_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """The tokens up to and including the first end-of-text token."""
    hits = [i for i, t in enumerate(tokens.tolist()) if t in eos]
    return tokens[:hits[0] + 1] if hits else tokens


def generation_rows(model, tokenizer, prompt_T: torch.Tensor, new_tokens: int, sides: dict[str, str], eos: set[int]):
    """Greedy continuations of one prompt on every side, each scored by the baseline: (generation rows per path,
    generation_tokens rows, non-finite rows).

    A continuation's score is its mean NLL per token teacher-forced through the baseline (prefill the prompt, feed
    the continuation): the baseline's own continuation is scored by the very logits that chose it (the same loop)."""
    cont, scores, bad = {}, {}, []
    for side, attn in sides.items():
        with attention_implementation(model, attn):
            tokens, logits_NxV = greedy_logits(model, prompt_T, new_tokens)
        cont[side] = cut_at_eos(tokens, eos)
        n = cont[side].numel()
        bad.append({"side": side, "stage": "generation", "values": logits_NxV.numel(),
                    "nonfinite": count_nonfinite(logits_NxV)})
        if side == BASE:
            scores[side] = float(next_token_nll(logits_NxV[:n], cont[side]).mean())
    with attention_implementation(model, sides[BASE]):
        for side in sides:
            if side == BASE:
                continue
            if torch.equal(cont[side], cont[BASE]):
                scores[side] = scores[BASE]
                continue
            logits_NxV = teacher_forced(model, prompt_T, cont[side])
            scores[side] = float(next_token_nll(logits_NxV, cont[side]).mean())
            bad[0]["values"] += logits_NxV.numel()  # the scoring runs on the baseline
            bad[0]["nonfinite"] += count_nonfinite(logits_NxV)
    rows = []
    for side in sides:
        if side == BASE:
            continue
        rows.append({"path": side, "prompt_tokens": prompt_T.numel(), "new_tokens": new_tokens,
                     "base_tokens": cont[BASE].numel(), "path_tokens": cont[side].numel(),
                     "exact_match": int(torch.equal(cont[BASE], cont[side])),
                     "first_divergence": first_divergence(cont[BASE], cont[side]),
                     "nll_base_cont": scores[BASE], "nll_path_cont": scores[side],
                     "nll_ratio": scores[side] / scores[BASE] if scores[BASE] > 0 else float("nan"),
                     "prompt_text": tokenizer.decode(prompt_T), "base_text": tokenizer.decode(cont[BASE]),
                     "path_text": tokenizer.decode(cont[side])})
    token_rows = pd.concat([pd.DataFrame({"side": side, "step": np.arange(cont[side].numel()),
                                          "token": cont[side].numpy()}) for side in sides], ignore_index=True)
    return pd.DataFrame(rows), token_rows, pd.DataFrame(bad)


# -- summaries (pure functions of the stored per-prompt tables) ---------------------------------------------------

def summarize(ppl: pd.DataFrame, logits: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The per-(path, context) summary (the `summary` table) from the `perplexity` and `logits` tables."""
    rows = []
    for (path, context), lg in logits.groupby(["path", "context"], sort=False):
        p = ppl[(ppl["context"] == context) & ppl["side"].isin([BASE, path])]
        wide = p.pivot(index="window", columns="side", values="nll_sum")
        tokens = p[p["side"] == BASE].set_index("window")["tokens"].reindex(wide.index)
        base, other = perplexity(wide[BASE], tokens), perplexity(wide[path], tokens)
        lo, hi = bootstrap_ppl_delta(wide[BASE], wide[path], tokens, resamples=resamples, seed=seed)
        rows.append({
            "path": str(path), "context": int(context), "windows": len(wide), "tokens": int(tokens.sum()),
            "ppl_base": base, "ppl_path": other, "ppl_delta": other - base, "ppl_delta_pct": 100 * (other / base - 1),
            "ci_low": lo, "ci_high": hi, "ci_low_pct": 100 * lo / base, "ci_high_pct": 100 * hi / base,
            "kl_mean": float(np.average(lg["kl_mean"], weights=lg["positions"])), "kl_max": float(lg["kl_max"].max()),
            "top1_agree": float(np.average(lg["top1_agree"], weights=lg["positions"])),
            "max_abs_dlogit": float(lg["max_abs_dlogit"].max()),
        })
    return pd.DataFrame(rows)


def summarize_decode(decode: pd.DataFrame, prefill: pd.DataFrame) -> pd.DataFrame:
    """The per-(path, prompt length) summary of teacher-forced decode (the `decode_summary` table)."""
    rows = []
    for (path, length), d in decode.groupby(["path", "prompt_length"], sort=False):
        p = prefill[(prefill["path"] == path) & (prefill["prompt_length"] == length)]
        ref = float(p["kl_mean"].mean())
        kl = float(d["kl"].mean())
        rows.append({"path": str(path), "prompt_length": int(length), "windows": int(d["window"].nunique()),
                     "steps": int(d["step"].max()), "kl_mean": kl, "kl_max": float(d["kl"].max()),
                     "top1": float(d["top1"].mean()), "nll_base": float(d["nll_base"].mean()),
                     "nll_path": float(d["nll_path"].mean()), "prefill_kl": ref,
                     "prefill_kl_last": float(p["kl_last"].mean()), "prefill_top1": float(p["top1_agree"].mean()),
                     "ratio": kl / ref if ref > 0 else (float("inf") if kl > 0 else float("nan"))})
    return pd.DataFrame(rows)


def summarize_generations(gen: pd.DataFrame) -> pd.DataFrame:
    """Per (path, prompt group), and over all prompts ("all"): exact match, first divergence and the NLL ratio of
    the continuations under the baseline (token-weighted means)."""
    rows = []
    for path, g_path in gen.groupby("path", sort=False):
        groups = [(grp, g) for grp, g in g_path.groupby("group", sort=False)] + [("all", g_path)]
        for group, g in groups:
            base = float(np.average(g["nll_base_cont"], weights=g["base_tokens"]))
            other = float(np.average(g["nll_path_cont"], weights=g["path_tokens"]))
            rows.append({"path": str(path), "group": str(group), "prompts": len(g),
                         "new_tokens": int(g["new_tokens"].max()), "exact_match_rate": float(g["exact_match"].mean()),
                         "mean_first_divergence": float(g["first_divergence"].mean()),
                         "nll_base_cont": base, "nll_path_cont": other,
                         "nll_ratio": other / base if base > 0 else float("nan")})
    return pd.DataFrame(rows)


class CachedTokenizer:
    """The tokenizer, remembering each text's encoding: `corpus.windows` and `corpus.prompts` tokenize the whole
    corpus on every call (about 5 s for the embedded one on 2 cores), and evaluate calls them once per length."""

    def __init__(self, tokenizer):
        self._tokenizer, self._memo = tokenizer, {}

    def __call__(self, text: str, add_special_tokens: bool = True):
        key = (text, add_special_tokens)
        if key not in self._memo:
            self._memo[key] = self._tokenizer(text, add_special_tokens=add_special_tokens)
        return self._memo[key]


def summaries(tables: dict[str, pd.DataFrame], resamples: int = 2000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The summary tables (summary, decode_summary, generation_summary) and the verdict of an evaluate run's
    per-prompt tables: what a complete run stores at its end, rebuilt here also for an interrupted run's file
    (`summaries({n: run.table(n) for n in run.tables()})`)."""
    out = {}
    if "perplexity" in tables and "logits" in tables:
        out["summary"] = summarize(tables["perplexity"], tables["logits"], resamples, seed)
    if "decode" in tables and "decode_prefill" in tables:
        out["decode_summary"] = summarize_decode(tables["decode"], tables["decode_prefill"])
    if "generations" in tables:
        out["generation_summary"] = summarize_generations(tables["generations"])
    out["verdict"] = verdicts.verdict_rows({**tables, **out})
    return out


def _columns(df: pd.DataFrame) -> dict:
    return {c: (df[c].astype(str).to_numpy(dtype=str) if df[c].dtype == object else df[c].to_numpy()) for c in df}


def generation_prompts(config: EvaluateConfig, plan: Plan, tokenizer, cached=None) -> tuple[list, str | None]:
    """(token ids, source, group) of every generation prompt, and a note when the chat prompts were skipped."""
    out, note = [], None
    n_gen, new_tokens = config.generate
    if new_tokens == 0:
        return out, note
    if n_gen:
        for length in config.generation_lengths:
            for ids, source in corpora.prompts(plan.corpus, cached or tokenizer, length, n_gen, seed=config.seed):
                out.append((ids, source, f"corpus-{length}"))
    if config.chat:
        if user_prompts.has_chat_template(tokenizer):
            out += [(user_prompts.encode(p, tokenizer), p.source, "chat")
                    for p in user_prompts.chat_prompts(config.chat)]
        else:
            note = (f"the {config.chat} built-in chat prompts were skipped: {plan.info.name}'s tokenizer has no chat "
                    f"template")
    for p in plan.file_prompts:
        ids = user_prompts.encode(p, tokenizer)
        if plan.info.max_context and ids.size + new_tokens > plan.info.max_context:
            raise ConfigError(f"prompt {p.source} has {ids.size} tokens; with {new_tokens} new tokens it exceeds "
                              f"{plan.info.name}'s maximum context of {plan.info.max_context}")
        out.append((ids, p.source, "file"))
    return out, note


def run_evaluate(config: EvaluateConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
                 argv: list[str] | None = None, progress: bool = True, loaded: tuple | None = None,
                 **overrides) -> Path:
    """Compare the SDPA baseline with 8-bit attention paths (perplexity, logits, teacher-forced decode, scored
    generations, a verdict) into one run file.

    `ds.run_evaluate(quant_attention="8bit", contexts=(512, 2048), windows=10)` or
    `ds.run_evaluate(paths=("sage8", "sage8-nosmooth"))` works like the CLI; returns the run file's path.
    `loaded=(model, tokenizer, info)` reuses a model from `load_model` (its attention implementation is restored
    afterwards). A run that fails before its first prompt is committed leaves no file. Read the results with
    `ds.open_run(path).table("verdict")` (see the module docstring).
    """
    config = config or EvaluateConfig(**overrides)
    out = Path(out) if out is not None else default_out(config)
    plan = validate(config, out, overwrite=overwrite, info=loaded[2] if loaded else None)
    model, tokenizer, info = loaded or load_model(config.model, dtype=config.dtype, device=plan.device,
                                                  device_map=config.device_map,
                                                  trust_remote_code=config.trust_remote_code)
    text = plan.corpus
    cached = CachedTokenizer(tokenizer)
    windows = {c: corpora.windows(text, cached, c, config.windows) for c in plan.contexts}  # CorpusError if short
    span = max(plan.prompt_lengths)
    decode_windows = corpora.windows(text, cached, span, config.decode_windows) if config.decode_windows else []
    gen_prompts, chat_note = generation_prompts(config, plan, tokenizer, cached)

    sides = {BASE: BASE_ATTN, **{p: (BASE_ATTN if p == NULL_PATH else p) for p in plan.compared}}
    device = str(model.device)
    env = environment.describe(device)
    env.update(attn_implementation=sides, corpus=text.source, compared=plan.choice)
    sage = [p for p in plan.compared if p.startswith("sage")]
    if sage:
        env["sage_impl"] = {p: paths.get_path(p, config.sage_impl, device=device).impl for p in sage}
    notes = plan.notes + ([chat_note] if chat_note else [])
    if notes:
        env["notes"] = notes

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = store.RunWriter(out, kind="evaluate", argv=list(argv if argv is not None else sys.argv),
                                 config=config.as_dict(), environment=env, overwrite=overwrite)
    except BaseException:
        environment.remove_dirs(plan.made)  # the file may be another run's (locked): leave it
        raise
    try:
        with registered(config.sage_impl), writer, torch.inference_mode():
            writer.set_model(info.as_dict())
            tables = _measure(writer, model, tokenizer, config, plan, sides, windows, decode_windows, gen_prompts,
                              progress)
            for name, df in summaries(tables, config.bootstrap, config.seed).items():
                writer.append(name, _columns(df))
    except BaseException:
        if not writer.completed_prompts():  # nothing worth keeping, and its file would block a rerun
            environment.discard_run_file(out, plan.made)
        raise
    return out


PROMPT_KEYED = ("nonfinite", "generation_tokens")  # tables keyed by the prompt alone


def _measure(writer, model, tokenizer, config: EvaluateConfig, plan: Plan, sides: dict[str, str], windows: dict,
             decode_windows: list, gen_prompts: list, progress: bool) -> dict[str, pd.DataFrame]:
    """Every window and prompt, each committed as soon as it is measured; returns every per-prompt table."""
    parts: dict[str, list[pd.DataFrame]] = {}
    index = itertools.count()

    def commit(ids, source: str, keys: dict, **tables: pd.DataFrame) -> None:
        writer.add_prompt(keys["prompt"], ids, source)
        for name, df in tables.items():
            k = {"prompt": keys["prompt"]} if name in PROMPT_KEYED else keys
            df = df.assign(**k)[[*k, *[c for c in df.columns if c not in k]]]
            parts.setdefault(name, []).append(df)
            writer.append(name, _columns(df))
        writer.commit_prompt(keys["prompt"])

    for context in plan.contexts:
        for w, ids in enumerate(tqdm(windows[context], desc=f"windows of {context}", unit="window",
                                     disable=not progress)):
            ppl, drift, bad = window_rows(model, torch.from_numpy(ids), sides)
            commit(ids, f"window {w} of {context} tokens @ token {w * context}",
                   {"context": context, "window": w, "prompt": next(index)}, perplexity=ppl, logits=drift,
                   nonfinite=bad)
    span = max(plan.prompt_lengths)
    jobs = [(P, w) for w in range(len(decode_windows)) for P in plan.prompt_lengths]
    for P, w in tqdm(jobs, desc="teacher-forced decode", unit="prompt", disable=not progress):
        ids = decode_windows[w][span - P:]
        dec, pre, bad = decode_rows(model, torch.from_numpy(ids), config.decode_steps, sides)
        commit(ids, f"decode window {w}: the last {P} of corpus tokens [{w * span}, {(w + 1) * span})",
               {"prompt_length": P, "window": w, "prompt": next(index)}, decode=dec, decode_prefill=pre,
               nonfinite=bad)
    eos = eos_token_ids(model, tokenizer)
    for ids, source, group in tqdm(gen_prompts, desc="generations", unit="prompt", disable=not progress):
        gen, tokens, bad = generation_rows(model, tokenizer, torch.from_numpy(ids), config.generate[1], sides, eos)
        commit(ids, source, {"prompt": next(index), "group": group, "source": source}, generations=gen,
               generation_tokens=tokens, nonfinite=bad)
    return {name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items()}
