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

# The runtime flag's names (`attn_implementation="sage8"`); each maps to the driftscope path of that name.
QUANT_IMPLEMENTATIONS = ("sage8", "sage8-nosmooth")


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


def interface_function(fn: LayerAttention, name: str) -> Callable:
    """An AttentionInterface function that calls `fn(layer, q, k, v, causal=..., scale=...)`."""

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
        check_mask(attention_mask, name)
        causal = is_causal_call(module, query, key, attention_mask, is_causal)
        out_BxHxTxD = fn(getattr(module, "layer_idx", -1), query, key, value, causal=causal, scale=scaling)
        return out_BxHxTxD.transpose(1, 2).contiguous(), None

    forward.__name__ = f"driftscope_{name.replace('-', '_')}"
    return forward


def attention_function(path: paths.AttentionPath) -> Callable:
    """An AttentionInterface function that runs `path`."""
    return interface_function(lambda _layer, q, k, v, *, causal, scale: path(q, k, v, causal=causal, scale=scale),
                              path.name)


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


def register(impl: str = "auto") -> tuple[str, ...]:
    """Make `attn_implementation="sage8"` (and `"sage8-nosmooth"`) usable by any transformers model, for good.

    `impl` picks the sage implementation (`auto`, `kernel`, `interpret`, `emulate`). Returns the names.
    Prefer the scoped `registered(impl)`, which restores the previous registrations on exit.
    """
    for name in QUANT_IMPLEMENTATIONS:
        register_function(name, attention_function(paths.get_path(name, impl)))
    return QUANT_IMPLEMENTATIONS


@contextlib.contextmanager
def registered(impl: str = "auto") -> Iterator[tuple[str, ...]]:
    """`register(impl)` for the duration of the block; the previous registrations are restored on exit."""
    with contextlib.ExitStack() as stack:
        for name in QUANT_IMPLEMENTATIONS:
            stack.enter_context(function_registered(name, attention_function(paths.get_path(name, impl))))
        yield QUANT_IMPLEMENTATIONS


@contextlib.contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Run `model` with attn_implementation `name`; the previous one is restored on exit, also on errors."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
