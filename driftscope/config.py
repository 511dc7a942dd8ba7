"""Run configurations: dataclasses validated in `__post_init__`, each error naming the bad value."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from driftscope import paths
from driftscope.errors import ConfigError

MODES = ("propagated", "isolated")
STORE_SITES = ("q", "k", "v", "attn_out", "resid")
DTYPE_NAMES = ("auto", "float16", "bfloat16", "float32")


def _positive(name: str, values) -> None:
    bad = [v for v in values if not isinstance(v, int) or v < 1]
    if bad:
        raise ConfigError(f"{name} must be positive integers, got {bad[0]!r}")


def check_one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"unknown {name} {value!r}; expected one of: {', '.join(map(str, accepted))}")


@dataclass(frozen=True)
class CaptureConfig:
    model: str = "smollm2-135m"  # alias, hub id or local folder (driftscope.models)
    paths: tuple[str, ...] = ("fp16", "sage8")  # the first is the reference
    sage_impl: str = "auto"  # kernel | interpret | emulate | auto (kernel on CUDA, emulate on the CPU)
    mode: str = "both"  # propagated | isolated | both
    lengths: tuple[int, ...] = (256,)  # prompt lengths in tokens
    prompts: int = 2  # prompts per length, each from a different document
    decode: int = 4  # greedy decode steps captured after each prompt
    corpus: str | None = None  # a UTF-8 text file; None: the embedded Wikipedia extract
    store: tuple[str, ...] = ()  # sites whose full tensors are written (float16)
    layers: tuple[int, ...] | None = None  # layers to store (None: all)
    heads: tuple[int, ...] | None = None  # heads to store (None: all)
    tokens: tuple[int, int] | None = None  # prefill token range [start, stop) to store (None: all)
    device: str = "auto"  # cpu | cuda[:N] | auto
    dtype: str = "auto"  # the model's dtype; auto: float16 on CUDA, bfloat16 on the CPU
    device_map: str | None = None  # e.g. "auto": spread the model over GPUs with accelerate
    seed: int = 0  # orders the corpus documents prompts are drawn from
    trust_remote_code: bool = False

    def __post_init__(self):
        if len(self.paths) < 2:
            raise ConfigError(f"--paths needs a reference and at least one path to compare, got {','.join(self.paths)!r}")
        for p in self.paths:
            check_one_of("path", p, paths.PATH_NAMES)
        check_one_of("sage implementation", self.sage_impl, paths.SAGE_IMPLS)
        check_one_of("mode", self.mode, (*MODES, "both"))
        check_one_of("dtype", self.dtype, DTYPE_NAMES)
        _positive("lengths", self.lengths)
        _positive("prompts", [self.prompts])
        if not isinstance(self.decode, int) or self.decode < 0:
            raise ConfigError(f"decode steps must be a non-negative integer, got {self.decode!r}")
        for s in self.store:
            check_one_of("store site", s, STORE_SITES)
        if self.tokens is not None and not (0 <= self.tokens[0] < self.tokens[1]):
            raise ConfigError(f"token range must be START:STOP with 0 <= START < STOP, got {self.tokens!r}")
        for name, values in (("layers", self.layers), ("heads", self.heads)):
            if values is not None and any(v < 0 for v in values):
                raise ConfigError(f"{name} must be non-negative, got {values!r}")

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)

    def as_dict(self) -> dict:
        return asdict(self)


QUANT_ATTENTION = ("off", "8bit")  # the runtime flag: off = the model's own SDPA, 8bit = attn_implementation "sage8"


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = "smollm2-135m"  # alias, hub id or local folder (driftscope.models)
    quant_attention: str = "off"  # off: both sides are the SDPA baseline (every delta is exactly 0); 8bit: sage8
    sage_impl: str = "auto"  # kernel | interpret | emulate | auto (kernel on CUDA, emulate on the CPU)
    contexts: tuple[int | str, ...] = (512, 2048, "max")  # perplexity/logit window lengths; "max": the model's context
    windows: int = 4  # non-overlapping corpus windows per context
    generate: tuple[int, int] = (4, 32)  # (prompts N, new tokens T) of greedy generation; N = 0 skips it
    prompt_length: int = 128  # tokens of each generation prompt
    corpus: str | None = None  # a UTF-8 text file; None: the embedded Wikipedia extract
    device: str = "auto"  # cpu | cuda[:N] | auto
    dtype: str = "auto"  # the model's (and the baseline's) dtype; auto: float16 on CUDA, bfloat16 on the CPU
    device_map: str | None = None  # e.g. "auto": spread the model over GPUs with accelerate
    seed: int = 0  # seeds the bootstrap and orders the documents generation prompts come from
    bootstrap: int = 2000  # bootstrap resamples of the windows for the perplexity delta's 95% interval
    trust_remote_code: bool = False

    def __post_init__(self):
        check_one_of("--quant-attention value", self.quant_attention, QUANT_ATTENTION)
        check_one_of("sage implementation", self.sage_impl, paths.SAGE_IMPLS)
        check_one_of("dtype", self.dtype, DTYPE_NAMES)
        if not self.contexts:
            raise ConfigError("contexts must name at least one window length, e.g. 512,2048,max")
        for c in self.contexts:
            if c != "max" and (not isinstance(c, int) or isinstance(c, bool) or c < 2):
                raise ConfigError(f"context {c!r} must be an integer of at least 2 tokens or the word 'max'")
        _positive("windows", [self.windows])
        if len(self.generate) != 2 or any(not isinstance(v, int) or v < 0 for v in self.generate):
            raise ConfigError(f"generate must be N,T (prompts, new tokens), non-negative integers, "
                              f"got {','.join(map(str, self.generate))!r}")
        if self.generate[0] > 0 and self.generate[1] < 1:
            raise ConfigError(f"generate {self.generate[0]},{self.generate[1]} asks for prompts with 0 new tokens; "
                              f"give T >= 1, or N = 0 to skip generation")
        _positive("prompt_length", [self.prompt_length])
        _positive("bootstrap", [self.bootstrap])

    def resolved_contexts(self, max_context: int) -> tuple[int, ...]:
        """The contexts with "max" replaced by `max_context`, deduplicated, in the order given."""
        out = [max_context if c == "max" else c for c in self.contexts]
        return tuple(dict.fromkeys(out))

    def as_dict(self) -> dict:
        return asdict(self)
