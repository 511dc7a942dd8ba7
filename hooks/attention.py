"""transformers' AttentionInterface: driftscope's attention paths as attention functions, and scoped switches.

An attention function registered in `AttentionInterface` receives post-RoPE `query [B, Hq, Tq, D]` and
`key`/`value [B, Hkv, Tk, D]` after the cache update, not expanded for GQA, and returns `[B, Tq, Hq, D]`.
Its mask function must be registered under the same name in `AttentionMaskInterface`, or masks silently
become None.

Registration and a model's attention implementation are global state, so both are switched in context managers
that restore the previous state in a `finally` (nesting-safe: each restores exactly what it replaced):

    with registered("emulate"), attention_implementation(model, "sage8"):
        model(input_ids=ids)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from driftscope import paths
from driftscope.errors import ConfigError

# SageAttention 1.0.6's names (`attn_implementation="sage8"`), always registered. `registered()` registers every sage
# path of `paths.PATH_NAMES` (`sage_implementations()`), read when it is called: the family grows (sage2-*).
QUANT_IMPLEMENTATIONS = ("sage8", "sage8-nosmooth")


def sage_implementations() -> tuple[str, ...]:
    """Every sage path of `driftscope.paths.PATH_NAMES`, each usable as `attn_implementation=<name>` once registered."""
    return tuple(name for name in paths.PATH_NAMES if name.startswith("sage"))


class LayerAttention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 scale: float | None) -> torch.Tensor:
        """q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] -> out [B,Hq,Tq,D]."""


def is_causal_call(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask, is_causal) -> bool:
    """Whether this call is causal prefill, as transformers' own SDPA integration decides it."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(causal) and query.shape[2] > 1


def check_mask(attention_mask, name: str) -> None:
    """The sage kernels only know causal masking; refuse padding masks rather than ignore them."""
    if attention_mask is not None:
        raise ConfigError(
            f"attention path {name!r} got an explicit attention mask of shape {tuple(attention_mask.shape)} "
            f"(padding or a custom mask), which the SageAttention kernels cannot apply; run unpadded batches"
        )


# Attention arguments some architectures pass that no driftscope path honours: computing attention without them
# would silently compare something other than the model (Mistral's window, Gemma 2's softcap, gpt-oss's sinks, T5's
# bias). Refused for every path, the reference included, so both sides of a comparison stay the same computation.
UNSUPPORTED_ARGUMENTS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")


def check_arguments(module: torch.nn.Module, kwargs: dict) -> None:
    bad = [k for k in UNSUPPORTED_ARGUMENTS if kwargs.get(k) is not None]
    if bad:
        model = getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__
        raise ConfigError(
            f"model {model!r} passes {', '.join(f'{k}={kwargs[k]!r}' if not torch.is_tensor(kwargs[k]) else k for k in bad)} "
            f"to its attention, which driftscope's attention paths cannot apply (they compute full causal "
            f"attention); its comparisons would be wrong, so it is not supported")


def interface_function(fn: LayerAttention, name: str) -> Callable:
    """An AttentionInterface function that calls `fn(layer, q, k, v, causal=..., scale=...)`."""

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
        check_arguments(module, kwargs)
        check_mask(attention_mask, name)
        causal = is_causal_call(module, query, key, attention_mask, is_causal)
        out_BxHxTxD = fn(getattr(module, "layer_idx", -1), query, key, value, causal=causal, scale=scaling)
        return out_BxHxTxD.transpose(1, 2).contiguous(), None

    forward.__name__ = f"driftscope_{name.replace('-', '_')}"
    return forward


def attention_function(path: paths.AttentionPath, nonfinite: dict | None = None) -> Callable:
    """An AttentionInterface function that runs `path`. With `nonfinite` (a dict), the count of non-finite output
    values of every call is added to nonfinite[(path name, layer)] as a device tensor (no host sync)."""

    def run(layer, q, k, v, *, causal, scale):
        out = path(q, k, v, causal=causal, scale=scale)
        if nonfinite is not None:
            key = (path.name, layer)
            nonfinite[key] = nonfinite.get(key, 0) + out.isfinite().logical_not().sum()
        return out

    return interface_function(run, path.name)


def register_function(name: str, fn: Callable) -> None:
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def unregister_function(name: str) -> None:
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


@contextlib.contextmanager
def function_registered(name: str, fn: Callable) -> Iterator[str]:
    """`fn` registered as `name` for the duration; whatever was registered under `name` before comes back."""
    saved = [(m, m.get(name)) for m in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)]
    register_function(name, fn)
    try:
        yield name
    finally:
        for mapping, previous in saved:
            if previous is None:
                mapping.pop(name, None)
            else:
                mapping[name] = previous


def _path_function(name: str, impl: str, nonfinite: dict | None) -> Callable:
    """The attention function of sage path `name`; where `paths.get_path` refuses it (an implementation this install
    lacks), a function that raises that error when a model calls it, so only its users see the refusal."""
    try:
        return attention_function(paths.get_path(name, impl), nonfinite)
    except paths.PathError as err:
        message = str(err)

        def refused(module, *args, **kwargs):
            raise ConfigError(f"attention path {name!r} (impl {impl!r}) is unavailable: {message}")

        return refused


def register(impl: str = "auto") -> tuple[str, ...]:
    """Make `attn_implementation="sage8"` (and every other sage path, `sage_implementations()`) usable by any
    transformers model, for good.

    `impl` picks the sage implementation (`auto`, `kernel`, `interpret`, `emulate`). Returns the names.
    Prefer the scoped `registered(impl)`, which restores the previous registrations on exit.
    """
    names = sage_implementations()
    for name in names:
        register_function(name, _path_function(name, impl, None))
    return names


@contextlib.contextmanager
def registered(impl: str = "auto", nonfinite: dict | None = None) -> Iterator[tuple[str, ...]]:
    """`register(impl)` for the duration of the block; the previous registrations are restored on exit.
    `nonfinite`: see `attention_function`."""
    names = sage_implementations()
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(function_registered(name, _path_function(name, impl, nonfinite)))
        yield names


@contextlib.contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Run `model` with attn_implementation `name`; the previous one is restored on exit, also on errors."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
