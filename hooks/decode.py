"""The forward and decode loops every stage uses: prefill, greedy and teacher-forced decoding with a KV cache.

transformers 5.24 renamed the cache argument and output `past_key_values` to `cache` (the old name warns until
5.40): this module is the one place that knows which name the installed version takes.

Prompts are prefilled in one call (the sage kernels cannot run chunked prefill), then one token per call.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model, ids_BxT: torch.Tensor, cache=None, *, use_cache: bool = True, logits_to_keep: int | None = None):
    """(logits [B, T or logits_to_keep, V], cache) of one forward, extending `cache` if given."""
    kwargs = {"input_ids": ids_BxT.to(model.device), "use_cache": use_cache}
    if cache is not None:
        kwargs[_cache_argument(type(model))] = cache
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(**kwargs)
    if not use_cache:
        return out.logits, None
    return out.logits, out["cache"] if "cache" in out else out.get("past_key_values")


def full_logits(model, ids_T: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] in the model's dtype for one unpadded sequence, in one full-sequence forward without cache."""
    return forward(model, ids_T[None], use_cache=False)[0][0]


def greedy_from(model, logits_BxV: torch.Tensor, cache, steps: int, *,
                on_step: Callable[[int], None] | None = None,
                on_logits: Callable[[int, torch.Tensor], None] | None = None) -> list[int]:
    """`steps` greedy tokens continuing from the last logits and cache. Every row is fed row 0's argmax, so the
    rows of a lockstep batch stay comparable (teacher forcing). `on_step(s)` runs before step s's forward,
    `on_logits(s, logits [B, 1, V])` after it. End-of-text does not stop it."""
    rows, chosen = logits_BxV.shape[0], []
    for step in range(1, steps + 1):
        token = logits_BxV[0].argmax()
        chosen.append(int(token))
        if step == steps and on_logits is None:
            break  # the last token needs no forward of its own
        if on_step is not None:
            on_step(step)
        logits, cache = forward(model, token.view(1, 1).expand(rows, 1).contiguous(), cache)
        if on_logits is not None:
            on_logits(step, logits)
        logits_BxV = logits[:, -1]
    return chosen


def greedy(model, ids_BxT: torch.Tensor, steps: int, *, on_step: Callable[[int], None] | None = None,
           on_logits: Callable[[int, torch.Tensor], None] | None = None) -> list[int]:
    """Prefill `ids` (step 0), then `steps` greedy steps (see `greedy_from`). Returns row 0's greedy tokens."""
    if on_step is not None:
        on_step(0)
    logits, cache = forward(model, ids_BxT, use_cache=steps > 0, logits_to_keep=None if on_logits else 1)
    if on_logits is not None:
        on_logits(0, logits)
    return greedy_from(model, logits[:, -1], cache, steps, on_step=on_step, on_logits=on_logits)


def teacher_forced(model, prompt_T: torch.Tensor, forced_N: torch.Tensor, *,
                   on_prefill: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Next-token logits [N, V] (float32) for each token of `forced` after `prompt`: the prompt is prefilled into
    a KV cache, then `forced` is fed one token at a time, so every prediction after the first is a decode step.

    Row 0 comes from the prefill (it predicts forced[0]); row s >= 1 from the decode step that feeds forced[s - 1]
    against a cache of len(prompt) + s - 1 tokens (kv length len(prompt) + s after the step's own key).
    `on_prefill(logits [len(prompt), V])`, in the model's dtype, sees every prompt position's logits (the prefill
    then keeps them all, which it otherwise does not)."""
    return _decode(model, prompt_T, len(forced_N), forced_N, on_prefill)[1]


def greedy_logits(model, prompt_T: torch.Tensor, steps: int, *,
                  on_prefill: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [steps], logits [steps, V] float32): the greedy continuation of `prompt` and the next-token logits
    that chose each token, row 0 from the prefill and row s from the decode step feeding token s - 1.

    It is the same loop as `teacher_forced`, feeding its own argmax: `teacher_forced(model, prompt, tokens)` on the
    same model and attention returns these logits bitwise, which makes it the baseline side of a teacher-forced
    comparison. End-of-text does not stop it."""
    return _decode(model, prompt_T, steps, None, on_prefill)


def _decode(model, prompt_T, n: int, forced_N, on_prefill) -> tuple[torch.Tensor, torch.Tensor]:
    """n next-token predictions after `prompt`, feeding `forced` (or, when None, the argmax of each prediction)."""
    if n < 1:
        raise ValueError(f"need at least one token to predict, got {n}")
    logits, cache = forward(model, prompt_T[None], logits_to_keep=None if on_prefill else 1)
    if on_prefill is not None:
        on_prefill(logits[0])
    rows_NxV = [logits[0, -1].float()]
    tokens = []
    for i in range(n):
        token = rows_NxV[-1].argmax() if forced_N is None else forced_N[i]
        tokens.append(token.to(torch.long).reshape(()))
        if i == n - 1:
            break  # the last token is predicted, never fed
        logits, cache = forward(model, tokens[-1].view(1, 1), cache)
        rows_NxV.append(logits[0, -1].float())
    return torch.stack(tokens).cpu(), torch.stack(rows_NxV)


def crop_cache(cache, length: int) -> bool:
    """Crop a DynamicCache back to `length` tokens across transformers versions; False if it cannot."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return extra == 0
    try:
        cache.crop(-extra)  # a negative argument removes that many tokens, in old and new transformers alike
    except (ValueError, TypeError, AttributeError, RuntimeError):
        return False
    return cache.get_seq_length() == length


def eos_token_ids(model, tokenizer) -> set[int]:
    """The end-of-text token ids: the tokenizer's and the model's generation config's (an int or a list)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
