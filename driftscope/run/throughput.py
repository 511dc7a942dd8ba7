"""Throughput and peak memory of each attention path: the library behind `python -m driftscope.bench`.

For each model and each length, every path is measured back to back in the same process (so ratios compare
like with like):
- prefill: one forward over T random tokens, batch 1, no KV cache, `logits_to_keep=1` (the full logits of
  Llama-3's 128k vocabulary at 32k tokens would be 8 GB and time the LM head, not attention);
  tokens/s = T / median time.
- decode: the context of T tokens is prefilled once (with the KV cache), then `decode_steps` greedy steps are
  timed; the cache is cropped back to T before every repeat. tokens/s = steps / median time (batch 1).
Peak memory is `torch.cuda.max_memory_allocated` inside each measurement (reset before it), weights included
(decode: during the timed steps, KV cache included; the context's prefill peak is `peak_prefill_bytes`);
`peak_over_weights_bytes` subtracts the memory allocated before the measurement.

Paths map to transformers' attention implementations: `fp16` is transformers' own `sdpa` (the baseline a user
runs), `sage8` / `sage8-nosmooth` are driftscope's attention functions (`driftscope.hooks.attention`)
with the compiled kernel (`sage_impl="kernel"`). Results are long-form records (one per model, phase, length,
path); `plot_throughput(df, save_to)` draws them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from driftscope.run import benchkit as bt
from driftscope import paths as attention_paths
from driftscope.errors import ConfigError
from driftscope.hooks import decode
from driftscope.hooks.attention import attention_implementation, registered

PREFILL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DECODE_LENGTHS = (1024, 4096, 16384, 32768)
MODELS = ("llama3-8b-shape", "smollm2-135m")
BENCH_PATHS = ("fp16",) + tuple(n for n in attention_paths.PATH_NAMES if n.startswith("sage"))


def attn_implementation(path: str) -> str:
    """The transformers attn_implementation a bench path runs as: SDPA for fp16, else driftscope's registered path."""
    return "sdpa" if path == "fp16" else path


@dataclass(frozen=True)
class ThroughputConfig:
    models: tuple[str, ...] = MODELS  # shapes from benchkit.SHAPES (random weights) or a driftscope model name
    paths: tuple[str, ...] = ("fp16", "sage8")  # the first is the baseline of every ratio
    prefill: tuple[int, ...] = PREFILL_LENGTHS  # prompt lengths, tokens
    decode: tuple[int, ...] = DECODE_LENGTHS  # KV-cache lengths the decode steps start from
    decode_steps: int = 32  # timed greedy steps per repeat
    warmup: int = 1  # untimed calls before the timed ones (the first also compiles the Triton kernels)
    repeats: int = 3  # timed calls; the median is reported
    device: str = "cuda"
    sage_impl: str = "kernel"  # kernel (CUDA); emulate only for plumbing checks on the CPU
    dtype: str = "float16"
    seed: int = 0

    def __post_init__(self):
        for p in self.paths:
            if p not in BENCH_PATHS:
                raise ConfigError(f"unknown path {p!r} for bench; expected some of: {', '.join(BENCH_PATHS)}")
        if len(self.paths) < 1 or len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"--paths must name distinct paths, got {','.join(self.paths)!r}")
        for name, values in (("prefill lengths", self.prefill), ("decode lengths", self.decode)):
            bad = [v for v in values if not isinstance(v, int) or v < 1]
            if bad:
                raise ConfigError(f"{name} must be positive integers, got {bad[0]!r}")
        for name, v, low in (("decode steps", self.decode_steps, 1), ("warmup", self.warmup, 0),
                             ("repeats", self.repeats, 1)):
            if not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.sage_impl not in attention_paths.SAGE_IMPLS:
            raise ConfigError(f"unknown sage implementation {self.sage_impl!r}; expected one of: "
                              f"{', '.join(attention_paths.SAGE_IMPLS)}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected float16, bfloat16 or float32")

    def as_dict(self) -> dict:
        return asdict(self)


def load_bench_model(name: str, config: ThroughputConfig):
    """(model, info dict): a random-weight model of a known shape, or a driftscope model (e.g. the embedded one)."""
    dtype = getattr(torch, config.dtype)
    if name in bt.SHAPES:
        model = bt.random_model(name, dtype, config.device, seed=config.seed)
        return model, {"name": name, "weights": "random (normal, std = initializer_range)", **bt.model_shape_info(model)}
    from driftscope.models import load_model

    model, _tok, info = load_model(name, dtype=config.dtype, device=config.device)
    return model, {"name": name, "weights": info.source, **bt.model_shape_info(model)}


def measure_prefill(model, tokens: int, config: ThroughputConfig, generator: torch.Generator) -> dict:
    device = config.device
    ids = torch.randint(model.config.vocab_size, (1, tokens), generator=generator).to(device)
    base = bt.allocated(device)

    def step():
        decode.forward(model, ids, use_cache=False, logits_to_keep=1)

    with bt.peak_memory(device) as mem:
        times = bt.time_it(step, device, warmup=config.warmup, repeats=config.repeats)
    t = bt.median(times)
    return {"seconds": t, "times_s": times, "tokens_per_s": tokens / t, "peak_bytes": mem["peak_bytes"],
            "peak_over_weights_bytes": None if base is None else mem["peak_bytes"] - base}


def measure_decode(model, kv_len: int, config: ThroughputConfig, generator: torch.Generator) -> dict:
    device, steps = config.device, config.decode_steps
    ids = torch.randint(model.config.vocab_size, (1, kv_len), generator=generator).to(device)
    base = bt.allocated(device)
    with bt.peak_memory(device) as mem_prefill:
        logits, cache = decode.forward(model, ids, logits_to_keep=1)
    last = logits[:, -1]
    del logits
    cropped = [True]

    def reset():
        cropped[0] &= decode.crop_cache(cache, kv_len)

    def run():
        decode.greedy_from(model, last, cache, steps + 1)  # steps + 1 tokens: `steps` forwards

    with bt.peak_memory(device) as mem:
        times = bt.time_it(run, device, warmup=config.warmup, repeats=config.repeats, setup=reset)
    t = bt.median(times)
    del cache
    return {"seconds": t, "times_s": times, "steps": steps, "tokens_per_s": steps / t,
            "ms_per_token": 1e3 * t / steps, "peak_bytes": mem["peak_bytes"],
            "peak_prefill_bytes": mem_prefill["peak_bytes"],
            "peak_over_weights_bytes": None if base is None else mem["peak_bytes"] - base,
            "cache_cropped_between_repeats": cropped[0]}


def _guarded(fn: Callable[[], dict], device) -> dict:
    """Run one measurement; an out-of-memory or kernel error is recorded, not fatal."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    except (RuntimeError, ValueError, AssertionError, attention_paths.PathError) as e:
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    finally:
        bt.release(device)


def bench_model(model, info: dict, config: ThroughputConfig, progress: Callable[[str], None] = bt.log) -> list[dict]:
    """Long-form records for one model: every (phase, length, path)."""
    generator = torch.Generator().manual_seed(config.seed)
    max_ctx = info.get("max_context") or math.inf
    records = []
    plan = [("prefill", n) for n in config.prefill] + [("decode", n) for n in config.decode]
    for phase, n in plan:
        skip = n + (config.decode_steps if phase == "decode" else 0) > max_ctx
        for path in config.paths:
            rec = {"model": info["name"], "phase": phase, "tokens": n, "path": path,
                   "attn_implementation": attn_implementation(path),
                   "sage_impl": attention_paths.get_path(path, config.sage_impl, device=config.device).impl}
            if skip:
                rec["skipped"] = f"{n} tokens exceed the model's context of {info.get('max_context')}"
                records.append(rec)
                continue
            with attention_implementation(model, attn_implementation(path)), torch.inference_mode():
                measure = measure_prefill if phase == "prefill" else measure_decode
                rec.update(_guarded(lambda: measure(model, n, config, generator), config.device))
            records.append(rec)
            if "error" in rec:
                progress(f"{info['name']} {phase} {n:>6} {path:<15} ERROR {rec['error']}")
            else:
                peak = bt.gib(rec["peak_bytes"])
                progress(f"{info['name']} {phase} {n:>6} {path:<15} {rec['tokens_per_s']:>12,.1f} tok/s"
                         + (f"  peak {peak:.2f} GiB" if peak is not None else ""))
    return records


def with_ratios(records: Sequence[dict], baseline: str) -> list[dict]:
    """Each record gets `tokens_per_s_ratio` and `peak_ratio` against the baseline path's record of the same
    model, phase and length (measured in the same run)."""
    ref = {(r["model"], r["phase"], r["tokens"]): r for r in records if r["path"] == baseline and "tokens_per_s" in r}
    out = []
    for r in records:
        r = dict(r)
        b = ref.get((r["model"], r["phase"], r["tokens"]))
        if b is not None and "tokens_per_s" in r:
            r[f"tokens_per_s_vs_{baseline}"] = bt.ratio(r["tokens_per_s"], b["tokens_per_s"])
            r[f"peak_vs_{baseline}"] = bt.ratio(r.get("peak_bytes"), b.get("peak_bytes"))
        out.append(r)
    return out


def run_throughput(config: ThroughputConfig, argv: Sequence[str] | None = None,
                   progress: Callable[[str], None] = bt.log, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Every model of `config`: records with ratios, plus machine, versions and config (JSON-ready).

    `checkpoint(partial_result)` is called after each model (so a run cut short keeps what it measured)."""
    records, models = [], []
    machine, versions = bt.machine(config.device), bt.versions()

    def result(complete: bool) -> dict:
        recs = with_ratios(records, config.paths[0])
        return {
            "benchmark": "throughput",
            "complete": complete,
            "argv": list(argv) if argv is not None else None,
            "config": config.as_dict(),
            "machine": machine,
            "versions": versions,
            "models": models,
            "method": __doc__.split("\n\n", 1)[1].strip(),
            "records": recs,
            "summary": summarize(recs, config.paths[0]),
        }

    for name in config.models:
        progress(f"building {name} on {config.device}")
        try:
            model, info = load_bench_model(name, config)
        except Exception as e:  # a model that cannot load (e.g. the embedded package missing) is recorded
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            progress(f"{name}: cannot load ({msg}); skipped")
            models.append({"name": name, "error": msg})
            continue
        models.append(info)
        try:
            with registered(config.sage_impl):
                records += bench_model(model, info, config, progress)
        finally:
            del model
            bt.release(config.device)
        if checkpoint is not None:
            checkpoint(result(False))
    return result(True)


def summarize(records: Sequence[dict], baseline: str) -> list[str]:
    """One line per (model, phase, length, path) with tokens/s, peak memory and the ratios."""
    lines = []
    for r in records:
        head = f"{r['model']:<16} {r['phase']:<7} {r['tokens']:>6} {r['path']:<15}"
        if "tokens_per_s" not in r:
            lines.append(f"{head} {r.get('error') or r.get('skipped')}")
            continue
        peak = bt.gib(r.get("peak_bytes"))
        line = f"{head} {r['tokens_per_s']:>12,.1f} tok/s" + (f" peak {peak:6.2f} GiB" if peak is not None else "")
        if r["path"] != baseline and r.get(f"tokens_per_s_vs_{baseline}") is not None:
            pr = r.get(f"peak_vs_{baseline}")
            line += f"  x{r[f'tokens_per_s_vs_{baseline}']:.3f} speed" + (f", x{pr:.3f} peak" if pr else "") + \
                    f" vs {baseline}"
        lines.append(line)
    return lines


def plot_throughput(df, save_to=None, title: str | None = None, baseline: str = "fp16"):
    """Tokens/s, speed ratio vs `baseline` and peak memory (rows) against tokens, for prefill and decode (columns);
    one colour per path, one marker per model. `df`: the records as a DataFrame (`run_throughput()["records"]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(11, 10), sharex="col")
    df = df[df["tokens_per_s"].notna()] if "tokens_per_s" in df else df.iloc[0:0]
    markers = dict(zip(sorted(df["model"].unique()) if len(df) else [], "osD^v"))
    colors = dict(zip(BENCH_PATHS, plt.get_cmap("tab10").colors))
    ratio_col = f"tokens_per_s_vs_{baseline}"
    for col, phase in enumerate(("prefill", "decode")):
        part = df[df["phase"] == phase]
        for (model, path), g in part.groupby(["model", "path"]):
            g = g.sort_values("tokens")
            kw = dict(marker=markers.get(model, "o"), color=colors.get(path), label=f"{model} {path}")
            axes[0, col].plot(g["tokens"], g["tokens_per_s"], **kw)
            if path != baseline and ratio_col in g:
                axes[1, col].plot(g["tokens"], g[ratio_col], **kw)
            if "peak_bytes" in g and g["peak_bytes"].notna().any():
                axes[2, col].plot(g["tokens"], g["peak_bytes"] / 2**30, **kw)
        axes[0, col].set_title(f"{phase}: tokens/s" + (" (batch 1, per decoded token)" if phase == "decode" else ""))
        axes[1, col].set_title(f"{phase}: tokens/s relative to {baseline} (same run)")
        axes[1, col].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[2, col].set_title(f"{phase}: peak allocated memory (GiB)")
        axes[2, col].set_xlabel("prompt tokens" if phase == "prefill" else "KV-cache length (tokens)")
        for row in range(3):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].grid(alpha=0.3)
        axes[0, col].set_yscale("log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    if save_to is not None:
        fig.savefig(save_to, dpi=120)
        plt.close(fig)
    return fig
