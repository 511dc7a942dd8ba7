"""Run configurations: dataclasses validated in `__post_init__`, each error naming the bad value."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from driftscope import paths
from driftscope.errors import ConfigError

MODES = ("propagated", "isolated")
STORE_SITES = ("q", "k", "v", "attn_out", "resid")
DTYPE_NAMES = ("auto", "float16", "bfloat16", "float32")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements


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
        for p in self.paths:
            check_one_of("path", p, paths.PATH_NAMES)  # read now: the list grows with the Sage versions
        if len(self.paths) < 2:
            raise ConfigError(f"--paths needs a reference and at least one path to compare, got {','.join(self.paths)!r}")
        compared = self.paths[1:]
        repeated = sorted({p for p in compared if compared.count(p) > 1})
        if repeated:
            raise ConfigError(f"--paths {','.join(self.paths)} names {repeated[0]} twice; name each compared path "
                              f"once (the reference may repeat once, e.g. fp16,fp16, the null-drift check)")
        check_one_of("sage implementation", self.sage_impl, paths.SAGE_IMPLS)
        check_one_of("mode", self.mode, (*MODES, "both"))
        check_one_of("dtype", self.dtype, DTYPE_NAMES)
        _positive("lengths", self.lengths)
        _positive("prompts", [self.prompts])
        if not isinstance(self.decode, int) or self.decode < 0:
            raise ConfigError(f"decode steps must be a non-negative integer, got {self.decode!r}")
        if self.device_map is not None:
            check_one_of("device map", self.device_map, DEVICE_MAPS)
        for s in self.store:
            check_one_of("store site", s, STORE_SITES)
        given = [f"--{name}" for name in ("layers", "heads", "tokens") if getattr(self, name) is not None]
        if given and not self.store:
            raise ConfigError(f"{', '.join(given)} select(s) which stored tensors to write; add --store SITES "
                              f"({', '.join(STORE_SITES)}), or leave {given[0]} out")
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


QUANT_ATTENTION = ("off", "8bit")  # off: the baseline against itself; 8bit: the installed sageattention's own choice


def sage_path_names() -> tuple[str, ...]:
    """The attention paths evaluate can compare with the baseline: every sage path (read at call time)."""
    return tuple(p for p in paths.PATH_NAMES if p.startswith("sage"))


def _lengths(name: str, values, minimum: int = 1) -> None:
    if not values:
        raise ConfigError(f"{name} must name at least one length")
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < minimum]
    if bad:
        raise ConfigError(f"{name} must be integers of at least {minimum}, got {bad[0]!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = "smollm2-135m"  # alias, hub id or local folder (driftscope.models)
    # off: both sides are the SDPA baseline (every delta is exactly 0); 8bit: the installed sageattention's own
    # choice for the device (paths.default_quant_path, else sage8); None: 8bit when `paths` is given, else off
    quant_attention: str | None = None
    paths: tuple[str, ...] = ()  # sage paths to compare with the baseline, each as attn_implementation=<path>
    sage_impl: str = "auto"  # kernel | interpret | emulate | auto (kernel on CUDA, emulate on the CPU)
    contexts: tuple[int | str, ...] = (64, 256)  # perplexity/logit window lengths; "max": the model's context
    windows: int = 3  # non-overlapping corpus windows per context (intervals want >= 10; the GPU run passes 20)
    prompt_lengths: tuple[int, ...] = (8, 32, 128, 512)  # teacher-forced decode: tokens prefilled before decoding
    decode_windows: int = 1  # corpus windows (different offsets) per prompt length
    decode_steps: int = 32  # decode steps fed the baseline's greedy continuation
    generate: tuple[int, int] = (1, 24)  # (N corpus prompts per generation length, T new tokens); T = 0: none at all
    generation_lengths: tuple[int, ...] = (8, 128)  # tokens of the corpus generation prompts
    chat: int = 2  # built-in chat questions to generate from (models with a chat template); 0 skips them
    prompts_file: str | None = None  # the user's own prompts (driftscope.prompts: plain text or JSONL)
    corpus: str | None = None  # a UTF-8 text file; None: the embedded Wikipedia extract
    device: str = "auto"  # cpu | cuda[:N] | auto
    dtype: str = "auto"  # the model's (and the baseline's) dtype; auto: float16 on CUDA, bfloat16 on the CPU
    device_map: str | None = None  # e.g. "auto": spread the model over GPUs with accelerate
    seed: int = 0  # seeds the bootstrap and orders the documents generation prompts come from
    bootstrap: int = 2000  # bootstrap resamples of the windows for the perplexity delta's 95% interval
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.quant_attention is None:  # resolved here, so the run file records the flag that was in effect
            object.__setattr__(self, "quant_attention", "8bit" if self.paths else "off")
        check_one_of("--quant-attention value", self.quant_attention, QUANT_ATTENTION)
        object.__setattr__(self, "paths", tuple(self.paths))
        for p in self.paths:
            check_one_of("path to compare", p, sage_path_names())
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"--paths names a path twice: {','.join(self.paths)!r}")
        if self.paths and self.quant_attention == "off":
            raise ConfigError(f"--paths {','.join(self.paths)} compares 8-bit paths, but --quant-attention is off "
                              f"(the baseline against itself); drop one of them")
        check_one_of("sage implementation", self.sage_impl, paths.SAGE_IMPLS)
        check_one_of("dtype", self.dtype, DTYPE_NAMES)
        if self.device_map is not None:
            check_one_of("device map", self.device_map, DEVICE_MAPS)
        if not self.contexts:
            raise ConfigError("contexts must name at least one window length, e.g. 512,2048,max")
        for c in self.contexts:
            if c != "max" and (not isinstance(c, int) or isinstance(c, bool) or c < 2):
                raise ConfigError(f"context {c!r} must be an integer of at least 2 tokens or the word 'max'")
        _positive("windows", [self.windows])
        _lengths("prompt lengths", self.prompt_lengths)
        if not isinstance(self.decode_windows, int) or self.decode_windows < 0:
            raise ConfigError(f"decode windows must be a non-negative integer (0 skips decode), got "
                              f"{self.decode_windows!r}")
        _positive("decode steps", [self.decode_steps])
        if len(self.generate) != 2 or any(not isinstance(v, int) or v < 0 for v in self.generate):
            raise ConfigError(f"generate must be N,T (prompts, new tokens), non-negative integers, "
                              f"got {','.join(map(str, self.generate))!r}")
        if self.generate[1] < 1 and (self.generate[0] > 0 or self.prompts_file):
            raise ConfigError(f"generate {self.generate[0]},{self.generate[1]} asks for "
                              f"{'a prompts file' if self.prompts_file else 'prompts'} with 0 new tokens; give T >= 1, "
                              f"or 0,0 (without --prompts-file) to skip generation")
        _lengths("generation lengths", self.generation_lengths)
        from driftscope.prompts import CHAT_QUESTIONS

        if not isinstance(self.chat, int) or not 0 <= self.chat <= len(CHAT_QUESTIONS):
            raise ConfigError(f"chat must be a number of built-in questions from 0 to {len(CHAT_QUESTIONS)}, "
                              f"got {self.chat!r}")
        _positive("bootstrap", [self.bootstrap])

    def resolved_contexts(self, max_context: int) -> tuple[int, ...]:
        """The contexts with "max" replaced by `max_context`, deduplicated, in the order given."""
        out = [max_context if c == "max" else c for c in self.contexts]
        return tuple(dict.fromkeys(out))

    def as_dict(self) -> dict:
        return asdict(self)
