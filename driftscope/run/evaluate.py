"""`ds.evaluate(...)`: what 8-bit attention costs end to end (the library behind `python -m driftscope.evaluate`).

Two sides run the same model on the same tokens. The base side is the model's own SDPA in its dtype
(`attn_implementation="sdpa"`); the quant side is `"sage8"` with `quant_attention="8bit"`, or SDPA again with
`"off"` (then every delta is exactly zero: a check of the machinery itself). Per context length, over
non-overlapping corpus windows, one forward per side and window gives perplexity and logit drift; greedy
generation from corpus prompts gives the exact-match rate and where the texts diverge.

Tables written to the run file (`kind="evaluate"`; each window and generation prompt is one committed prompt):
    perplexity        context, window, prompt, side, attn, nll_sum (float64), tokens, ppl   one row per window
                      and side; ppl of a context = exp(Σ nll_sum / Σ tokens) over its windows
    logits            context, window, prompt, positions, kl_mean, kl_max, top1_agree, max_abs_dlogit
                      (KL(base ‖ quant) over every position of the window; see logit_metrics)
    generations       prompt, source, prompt_tokens, new_tokens, exact_match (0/1), first_divergence,
                      prompt_text, base_text, quant_text
    generation_tokens prompt, side, step, token
    summary           context, windows, tokens, ppl_base, ppl_quant, ppl_delta, ci_low, ci_high (paired
                      bootstrap 95% interval of ppl_delta over windows), kl_mean, kl_max, top1_agree, max_abs_dlogit
    generation_summary prompts, new_tokens, exact_match_rate, mean_first_divergence
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from driftscope import corpus as corpora
from driftscope import environment, paths, store
from driftscope.config import EvaluateConfig
from driftscope.errors import ConfigError
from driftscope.hooks.attention import attention_implementation, registered
from driftscope.hooks.decode import full_logits, greedy
from driftscope.measure.logits import bootstrap_ppl_delta, first_divergence, logit_drift, perplexity, token_nll
from driftscope.models import load_model

BASE_ATTN = "sdpa"
QUANT_ATTN = {"off": BASE_ATTN, "8bit": "sage8"}


def default_out(config: EvaluateConfig) -> Path:
    name = Path(config.model).name if Path(config.model).exists() else config.model.replace("/", "--")
    return Path("runs") / f"{name}-evaluate-{config.quant_attention}.h5"


def check_model(config: EvaluateConfig, info) -> tuple[int, ...]:
    """The resolved context lengths; fails before any work on what the model cannot do."""
    if config.quant_attention != "off":
        paths.check_head_dim(info.head_dim, info.name)
    if "max" in config.contexts and not info.max_context:
        raise ConfigError(f"{info.name} does not declare a maximum context, so 'max' is unknown; give --contexts as numbers")
    contexts = config.resolved_contexts(info.max_context)
    need = [("context", c) for c in contexts]
    if config.generate[0]:
        need.append(("generation prompt + new tokens", config.prompt_length + config.generate[1]))
    for what, n in need:
        if info.max_context and n > info.max_context:
            raise ConfigError(f"{what} {n} exceeds {info.name}'s maximum context of {info.max_context} tokens; "
                              f"use at most {info.max_context} (or the word 'max')")
    return contexts


def window_rows(model, ids_T: torch.Tensor, sides: dict[str, str]) -> tuple[pd.DataFrame, dict]:
    """Perplexity rows (one row per side) and the logit drift row of one window."""
    logits, rows = {}, []
    for side, attn in sides.items():
        with attention_implementation(model, attn):
            logits[side] = full_logits(model, ids_T)
        nll = token_nll(logits[side], ids_T).double().sum().item()
        tokens = ids_T.numel() - 1
        rows.append({"side": side, "attn": attn, "nll_sum": nll, "tokens": tokens, "ppl": perplexity([nll], [tokens])})
    return pd.DataFrame(rows), logit_drift(logits["base"], logits["quant"])


def summarize(ppl: pd.DataFrame, logits: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The per-context summary (the `summary` table) from the `perplexity` and `logits` tables."""
    rows = []
    for context, p in ppl.groupby("context", sort=False):
        wide = p.pivot(index="window", columns="side", values="nll_sum")
        tokens = p[p["side"] == "base"].set_index("window")["tokens"].reindex(wide.index)
        base, quant = perplexity(wide["base"], tokens), perplexity(wide["quant"], tokens)
        lo, hi = bootstrap_ppl_delta(wide["base"], wide["quant"], tokens, resamples=resamples, seed=seed)
        lg = logits[logits["context"] == context]
        rows.append({
            "context": int(context), "windows": len(wide), "tokens": int(tokens.sum()), "ppl_base": base,
            "ppl_quant": quant, "ppl_delta": quant - base, "ci_low": lo, "ci_high": hi,
            "kl_mean": float(np.average(lg["kl_mean"], weights=lg["positions"])), "kl_max": float(lg["kl_max"].max()),
            "top1_agree": float(np.average(lg["top1_agree"], weights=lg["positions"])),
            "max_abs_dlogit": float(lg["max_abs_dlogit"].max()),
        })
    return pd.DataFrame(rows)


def summarize_generations(gen: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{"prompts": len(gen), "new_tokens": int(gen["new_tokens"].max()),
                          "exact_match_rate": float(gen["exact_match"].mean()),
                          "mean_first_divergence": float(gen["first_divergence"].mean())}])


def _columns(df: pd.DataFrame) -> dict:
    return {c: (df[c].astype(str).to_numpy(dtype=str) if df[c].dtype == object else df[c].to_numpy()) for c in df}


def run_evaluate(config: EvaluateConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
             argv: list[str] | None = None, progress: bool = True, loaded: tuple | None = None,
             **overrides) -> Path:
    """Compare the SDPA baseline with 8-bit attention (perplexity, logits, greedy generations) into one run file.

    `ds.run_evaluate(quant_attention="8bit", contexts=(512, 2048), windows=8, generate=(4, 32))` works like the CLI;
    returns the run file's path. `loaded=(model, tokenizer, info)` reuses a model from `load_model` (its
    attention implementation is restored afterwards). Read the results with `ds.open_run(path).table("summary")`.
    """
    config = config or EvaluateConfig(**overrides)
    out = Path(out) if out is not None else default_out(config)
    device = environment.resolve_device(config.device)
    model, tokenizer, info = loaded or load_model(config.model, dtype=config.dtype, device=device,
                                                  device_map=config.device_map,
                                                  trust_remote_code=config.trust_remote_code)
    contexts = check_model(config, info)
    text = corpora.load_corpus(config.corpus)
    windows = {c: corpora.windows(text, tokenizer, c, config.windows) for c in contexts}  # CorpusError if too short
    n_gen, new_tokens = config.generate
    prompts = corpora.prompts(text, tokenizer, config.prompt_length, n_gen, seed=config.seed) if n_gen else []

    sides = {"base": BASE_ATTN, "quant": QUANT_ATTN[config.quant_attention]}
    env = environment.describe(str(model.device))
    env.update(attn_implementation=sides, corpus=text.source)
    impl = paths.get_path("sage8", config.sage_impl, device=str(model.device)).impl
    if config.quant_attention != "off":
        env["sage_impl"] = {"sage8": impl}

    out.parent.mkdir(parents=True, exist_ok=True)
    with registered(impl), store.RunWriter(out, kind="evaluate", argv=list(argv if argv is not None else sys.argv),
                                           config=config.as_dict(), environment=env, overwrite=overwrite) as writer, \
            torch.inference_mode():
        writer.set_model(info.as_dict())
        index, ppl_parts, logit_parts = 0, [], []
        for context in contexts:
            for w, ids in enumerate(tqdm(windows[context], desc=f"windows of {context}", unit="window",
                                         disable=not progress)):
                writer.add_prompt(index, ids, f"window {w} of {context} tokens @ token {w * context}")
                ppl, drift = window_rows(model, torch.from_numpy(ids), sides)
                keys = {"context": context, "window": w, "prompt": index}
                ppl_parts.append(ppl.assign(**keys)[[*keys, *ppl.columns]])
                logit_parts.append(pd.DataFrame([{**keys, **drift}]))
                writer.append("perplexity", _columns(ppl_parts[-1]))
                writer.append("logits", _columns(logit_parts[-1]))
                writer.commit_prompt(index)
                index += 1
        gen_parts = []
        for p, (ids, source) in enumerate(tqdm(prompts, desc="generations", unit="prompt", disable=not progress)):
            writer.add_prompt(index, ids, source)
            tokens = {}
            for side, attn in sides.items():
                with attention_implementation(model, attn):
                    tokens[side] = torch.tensor(greedy(model, torch.from_numpy(ids)[None], new_tokens), dtype=torch.long)
                writer.append("generation_tokens", {"prompt": np.full(new_tokens, index), "side": np.full(new_tokens, side),
                                                    "step": np.arange(new_tokens), "token": tokens[side].numpy()})
            diverge = first_divergence(tokens["base"], tokens["quant"])
            gen_parts.append(pd.DataFrame([{
                "prompt": index, "source": source, "prompt_tokens": len(ids), "new_tokens": new_tokens,
                "exact_match": int(diverge == new_tokens), "first_divergence": diverge,
                "prompt_text": tokenizer.decode(ids), "base_text": tokenizer.decode(tokens["base"]),
                "quant_text": tokenizer.decode(tokens["quant"])}]))
            writer.append("generations", _columns(gen_parts[-1]))
            writer.commit_prompt(index)
            index += 1
        writer.append("summary", _columns(summarize(pd.concat(ppl_parts), pd.concat(logit_parts),
                                                    config.bootstrap, config.seed)))
        if gen_parts:
            writer.append("generation_summary", _columns(summarize_generations(pd.concat(gen_parts))))
    return out
