"""`ds.run_capture(...)`: the library behind `python -m driftscope.capture`."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from driftscope import corpus as corpora
from driftscope import environment, paths, store
from driftscope.config import CaptureConfig
from driftscope.errors import ConfigError
from driftscope.models import ModelInfo, check_device_map, inspect, load_model
from driftscope.run.tap import StoreSpec, Tap, nonfinite_warnings, run_prompt
from driftscope.measure.records import Context, Records


def default_out(config: CaptureConfig) -> Path:
    name = Path(config.model).name if Path(config.model).exists() else config.model.replace("/", "--")
    return Path("runs") / f"{name}-{'-'.join(config.paths)}.h5"


@dataclass(frozen=True)
class Plan:
    """A capture that passed every check; nothing is loaded or written yet."""

    device: str  # resolved: cpu, cuda or cuda:N
    info: ModelInfo  # from the model's config alone
    corpus: corpora.Corpus
    made: list  # directories writing the run file will create (removed again if the run never starts)


def check_model(config: CaptureConfig, info) -> None:
    """Fail before any work on what the model cannot do: unsupported head_dim, prompts beyond its context, stored
    layers, heads or tokens it does not have."""
    for p in config.paths:
        if p.startswith("sage"):
            paths.check_head_dim(info.head_dim, info.name, path=p)
    longest = max(config.lengths) + config.decode
    if info.max_context and longest > info.max_context:
        raise ConfigError(
            f"prompt length {max(config.lengths)} + {config.decode} decode steps = {longest} tokens exceeds "
            f"{info.name}'s context of {info.max_context}; use --lengths up to {info.max_context - config.decode}"
        )
    bad = [layer for layer in config.layers or () if layer >= info.n_layers]
    if bad:
        raise ConfigError(f"--layers {bad[0]} does not exist: {info.name} has {info.n_layers} layers, "
                          f"0 to {info.n_layers - 1}")
    if config.heads is not None:
        sites = [s for s in config.store if s != "resid"]
        if not sites:
            raise ConfigError("--heads selects heads of q, k, v or attn_out, and --store resid has none; "
                              "leave --heads out or add a site with heads to --store")
        kv = any(s in ("k", "v") for s in sites)
        limit = info.n_kv_heads if kv else info.n_heads
        bad = [h for h in config.heads if h >= limit]
        if bad:
            raise ConfigError(
                f"--heads {bad[0]} does not exist for --store {','.join(config.store)}: {info.name} has "
                f"{info.n_heads} query heads (q, attn_out: 0 to {info.n_heads - 1}) and {info.n_kv_heads} KV heads "
                f"(k, v: 0 to {info.n_kv_heads - 1})")
    if config.tokens is not None:
        start, stop = config.tokens
        shortest = min(config.lengths)
        if stop > shortest:
            raise ConfigError(f"--tokens {start}:{stop} reaches past the prompts: the shortest has {shortest} tokens "
                              f"(--lengths); give START:STOP within 0:{shortest}")


def check_resume(config: CaptureConfig, out: Path) -> None:
    """--resume continues a capture run of the same configuration: checked before any model loads."""
    with store.open_run(out) as run:
        kind, old = run.kind, run.config
    if kind != "capture":
        raise ConfigError(f"cannot --resume {out}: it is a{'n' if kind[0] in 'aeiou' else ''} {kind} run, not a "
                          f"capture run")
    new = json.loads(json.dumps(config.as_dict()))
    diff = sorted(k for k in set(old) | set(new) if old.get(k, ...) != new.get(k, ...))
    if diff:
        raise ConfigError(f"cannot --resume {out}: its configuration differs in {', '.join(diff)}; rerun with the "
                          f"same options, or pass --overwrite to start again")


def validate(config: CaptureConfig, out: Path, *, overwrite: bool = False, resume: bool = False) -> Plan:
    """Every check a capture can make before it loads weights or touches a file: the device and device map, the
    sage implementation on that device, the corpus, the model's config against the prompts and stored tensors,
    and the run file's path."""
    device = environment.resolve_device(config.device)
    check_device_map(config.device_map)
    sage = [p for p in config.paths if p.startswith("sage")]
    environment.check_sage_impl(config.sage_impl, device, sage)
    text = corpora.load_corpus(config.corpus)
    info = inspect(config.model, config.dtype, device, config.trust_remote_code)
    check_model(config, info)
    made = environment.check_output_file(out, overwrite=overwrite, resume=resume)
    if resume and out.exists():
        check_resume(config, out)
    if sage and config.sage_impl == "interpret":
        environment.prepare_triton_interpreter()
    return Plan(device=device, info=info, corpus=text, made=made)


def run_capture(config: CaptureConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
            resume: bool = False, argv: list[str] | None = None, progress: bool = True, **overrides) -> Path:
    """Capture drift metrics (and optionally tensors) for every prompt, path and mode into one run file.

    `ds.run_capture(model="smollm2-135m", paths=("fp16", "sage8"), lengths=(256,))` works like the CLI;
    returns the run file's path. Every input is checked (`validate`) before the model loads or a file is
    touched; a run that fails before its first prompt is committed leaves no file. Each prompt is committed as
    soon as it is done; `resume=True` continues an interrupted run with the same configuration.
    """
    config = config or CaptureConfig(**overrides)
    out = Path(out) if out is not None else default_out(config)
    plan = validate(config, out, overwrite=overwrite, resume=resume)
    model, tokenizer, info = load_model(config.model, dtype=config.dtype, device=plan.device,
                                        device_map=config.device_map, trust_remote_code=config.trust_remote_code)
    text = plan.corpus
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

    ours = not (resume and out.exists())  # a file this run creates (or replaces) is removed if it never starts
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = store.RunWriter(out, kind="capture", argv=list(argv if argv is not None else sys.argv),
                                 config=config.as_dict(), environment=env, overwrite=overwrite, resume=resume)
    except BaseException:
        environment.remove_dirs(plan.made)
        raise
    try:
        with writer:
            writer.set_model(info.as_dict())
            _capture_prompts(writer, model, prompts, path_fns, spec, config, progress)
    except BaseException:
        if ours and not writer.completed_prompts():
            environment.discard_run_file(out, plan.made)
        raise
    return out


def _capture_prompts(writer, model, prompts, path_fns, spec: StoreSpec, config: CaptureConfig,
                     progress: bool) -> None:
    """Every prompt not yet committed, in both modes; each committed as soon as it is done."""
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
