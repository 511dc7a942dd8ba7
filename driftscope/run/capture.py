"""`ds.run_capture(...)`: the library behind `python -m driftscope.capture`."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from driftscope import corpus as corpora
from driftscope import environment, paths, store
from driftscope.config import CaptureConfig
from driftscope.errors import ConfigError
from driftscope.models import inspect, load_model
from driftscope.run.tap import StoreSpec, Tap, nonfinite_warnings, run_prompt
from driftscope.measure.records import Context, Records


def default_out(config: CaptureConfig) -> Path:
    name = Path(config.model).name if Path(config.model).exists() else config.model.replace("/", "--")
    return Path("runs") / f"{name}-{'-'.join(config.paths)}.h5"


def check_model(config: CaptureConfig, info) -> None:
    """Fail before any work on what the model cannot do: unsupported head_dim, prompts beyond its context."""
    if any(p.startswith("sage") for p in config.paths):
        paths.check_head_dim(info.head_dim, info.name)
    longest = max(config.lengths) + config.decode
    if info.max_context and longest > info.max_context:
        raise ConfigError(
            f"prompt length {max(config.lengths)} + {config.decode} decode steps = {longest} tokens exceeds "
            f"{info.name}'s context of {info.max_context}; use --lengths up to {info.max_context - config.decode}"
        )


def run_capture(config: CaptureConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
            resume: bool = False, argv: list[str] | None = None, progress: bool = True, **overrides) -> Path:
    """Capture drift metrics (and optionally tensors) for every prompt, path and mode into one run file.

    `ds.run_capture(model="smollm2-135m", paths=("fp16", "sage8"), lengths=(256,))` works like the CLI;
    returns the run file's path. Each prompt is committed as soon as it is done; `resume=True` continues an
    interrupted run with the same configuration.
    """
    config = config or CaptureConfig(**overrides)
    out = Path(out) if out is not None else default_out(config)
    device = environment.resolve_device(config.device)
    check_model(config, inspect(config.model, config.dtype, device, config.trust_remote_code))
    if out.exists() and not (overwrite or resume):
        raise store.OutputExistsError(f"{out} exists; pass --overwrite to replace it or --resume to continue it")
    model, tokenizer, info = load_model(config.model, dtype=config.dtype, device=device,
                                        device_map=config.device_map, trust_remote_code=config.trust_remote_code)
    text = corpora.load_corpus(config.corpus)
    prompts = [(length, ids, source) for length in config.lengths
               for ids, source in corpora.prompts(text, tokenizer, length, config.prompts, seed=config.seed)]
    device = str(model.device)
    path_fns = [paths.get_path(name, config.sage_impl, device=device) for name in config.paths]
    env = environment.describe(device)
    env["sage_impl"] = {fn.name: fn.impl for fn in path_fns}
    env["corpus"] = text.source
    if getattr(model, "hf_device_map", None):  # --device-map: which device holds how many modules
        placed = [str(d) for d in model.hf_device_map.values()]
        env["device_map"] = {d: placed.count(d) for d in sorted(set(placed))}
    spec = StoreSpec(sites=config.store, layers=config.layers, heads=config.heads, tokens=config.tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    with store.RunWriter(out, kind="capture", argv=list(argv if argv is not None else sys.argv),
                         config=config.as_dict(), environment=env, overwrite=overwrite, resume=resume) as writer:
        writer.set_model(info.as_dict())
        done = writer.completed_prompts()
        bar = tqdm(total=len(prompts) * len(config.modes), desc="capture", unit="pass", disable=not progress)
        for index, (length, ids, source) in enumerate(prompts):
            if index in done:
                bar.update(len(config.modes))
                continue
            writer.add_prompt(index, ids, source)
            records = Records()
            for m, mode in enumerate(config.modes):
                bar.set_postfix_str(f"prompt {index} ({length} tokens), {mode}")
                records.context = Context(prompt=index, length=length, mode=mode)
                tap = Tap(path_fns, mode, records, store=spec, sink=writer.store_tensor if spec.sites else None,
                          with_stats=m == 0)
                run_prompt(model, torch.from_numpy(np.asarray(ids)), tap, config.decode)
                bar.update(1)
            columns = records.columns()
            for line in nonfinite_warnings(columns):
                tqdm.write(line, file=sys.stderr)
            writer.append("metrics", columns)
            writer.commit_prompt(index)
        bar.close()
    return out
