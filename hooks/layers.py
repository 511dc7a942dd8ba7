"""Instrumenting a model: every attention call through one function, every decoder layer's output to another.

`instrumented()` installs both and always restores the model in a `finally` (hooks are global state), also on
KeyboardInterrupt. The callbacks see plain tensors, never transformers objects:
- attention(layer, q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] after the cache update, causal=, scale=) -> out [B,Hq,Tq,D]
- residual(layer, hidden [B,T,C]): the decoder layer's output (the residual stream after the layer).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import torch

from driftscope.errors import UnsupportedModelError

from .attention import LayerAttention, attention_implementation, function_registered, interface_function

_ids = itertools.count()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama, Mistral, Qwen2/3, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        found = "no decoder" if decoder is None else f"a decoder ({type(decoder).__name__}) without `layers`"
        raise UnsupportedModelError(
            f"{type(model).__name__} has {found}; driftscope accepts decoder-only LMs whose get_decoder() "
            f"(or .model) holds the decoder layers as `layers`, as Llama, Mistral and Qwen2/3 do")
    return layers


@contextlib.contextmanager
def instrumented(model, attention: LayerAttention,
                 residual: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[None]:
    """Route every attention call of `model` through `attention` and every decoder layer's output to `residual`."""
    name = f"driftscope-tap-{next(_ids)}"
    handles = []
    with function_registered(name, interface_function(attention, "driftscope capture")), \
            attention_implementation(model, name):
        try:
            if residual is not None:
                for i, layer in enumerate(decoder_layers(model)):
                    # decoder layers may return tuples: unwrap before anything else touches the tensor
                    handles.append(layer.register_forward_hook(
                        lambda _m, _a, out, i=i: residual(i, out[0] if isinstance(out, (tuple, list)) else out)))
            yield
        finally:
            for h in handles:
                h.remove()
