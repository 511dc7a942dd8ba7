"""transformers' AttentionInterface adapters for driftscope's attention paths.

An attention function registered in `AttentionInterface` receives post-RoPE `query [B, Hq, Tq, D]` and
`key`/`value [B, Hkv, Tk, D]` after the cache update, not expanded for GQA, and returns `[B, Tq, Hq, D]`.
Its mask function must be registered under the same name in `AttentionMaskInterface`, or masks silently
become None.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from driftscope import paths
from driftscope.errors import ConfigError

# The runtime flag's names (`attn_implementation="sage8"`); each maps to the driftscope path of that name.
QUANT_IMPLEMENTATIONS = ("sage8", "sage8-nosmooth")


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


def attention_function(path: paths.AttentionPath) -> Callable:
    """An AttentionInterface function that runs `path`."""

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
        check_mask(attention_mask, path.name)
        out_BxHxTxD = path(query, key, value, causal=is_causal_call(module, query, key, attention_mask, is_causal),
                           scale=scaling)
        return out_BxHxTxD.transpose(1, 2).contiguous(), None

    forward.__name__ = f"driftscope_{path.name.replace('-', '_')}"
    return forward


def register_function(name: str, fn: Callable) -> None:
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def unregister_function(name: str) -> None:
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def register(impl: str = "auto") -> tuple[str, ...]:
    """Make `attn_implementation="sage8"` (and `"sage8-nosmooth"`) usable by any transformers model.

    `impl` picks the sage implementation (`auto`, `kernel`, `interpret`, `emulate`). Returns the names.
    Switch a loaded model with `model.set_attn_implementation("sage8")`, and back with `"sdpa"`.
    """
    for name in QUANT_IMPLEMENTATIONS:
        register_function(name, attention_function(paths.get_path(name, impl)))
    return QUANT_IMPLEMENTATIONS
