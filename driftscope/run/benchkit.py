"""What every driftscope benchmark shares: timing, peak memory, machine and version records, random-weight models
of a real model's shape, and JSON output.

Timing (`time_it`): `warmup` untimed calls, then `repeats` timed ones; on CUDA each is bracketed by CUDA events
after a synchronize, on the CPU by perf_counter. Benchmarks report the median and keep every sample.
Peak memory (`peak_memory`): `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, per measurement.

Random-weight models (`random_model`) are built straight on the target device from a config (no download, no
checkpoint), in the target dtype, with transformers' own initialization (normal, std = initializer_range), which
on a GPU takes well under a second even for Llama-3-8B's shape.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from driftscope.errors import DriftscopeError

# Model shapes that need no download: name -> LlamaConfig arguments.
SHAPES = {
    # Meta-Llama-3-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256 (~16 GB fp16)
    "llama3-8b-shape": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # a few MB, for CPU tests of the benchmarks' control flow (Llama-3's head layout: 4 query / 2 KV heads of 64)
    "tiny-llama": dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, vocab_size=1024, max_position_embeddings=65536, tie_word_embeddings=False),
}


class CudaRequiredError(DriftscopeError):
    pass


def require_cuda(what: str) -> None:
    """Raise a one-line CudaRequiredError unless a CUDA GPU is usable."""
    if not torch.cuda.is_available():
        raise CudaRequiredError(
            f"{what} measures GPU throughput and needs CUDA, but torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}); run it on a CUDA GPU, or pass --device cpu --smoke to check the plumbing")


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device, *, warmup: int = 1, repeats: int = 3,
            setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of `repeats` timed calls of fn (after `warmup` untimed ones); `setup` runs untimed before
    every call."""
    cuda = is_cuda(device)
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return times


def wall_it(fn: Callable[[], object], device, *, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Like time_it, but synchronize + perf_counter (counts host work the GPU waits on, e.g. host copies)."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs) if xs else math.nan


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict whose 'peak_bytes' is set on exit: the peak allocated CUDA memory inside the block
    (None on the CPU)."""
    box: dict = {"peak_bytes": None}
    if is_cuda(device):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield box
    finally:
        if is_cuda(device):
            sync(device)
            box["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))


def allocated(device) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if is_cuda(device) else None


def release(device) -> None:
    """Free cached blocks between measurements (does not change what max_memory_allocated reports)."""
    import gc

    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def gib(n) -> float | None:
    return None if n is None else n / 2**30


def ratio(a, b) -> float | None:
    return None if a is None or b is None or not b or math.isnan(a) or math.isnan(b) else a / b


# ---------------------------------------------------------------------------------------------- models
def model_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise DriftscopeError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[shape])


def random_model(shape: str, dtype: torch.dtype, device, seed: int = 0):
    """A Llama model of `shape` (see SHAPES) with random weights, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)
    return model.eval()


def model_shape_info(model) -> dict:
    c = model.config
    return {"architecture": type(model).__name__, "n_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "max_context": getattr(c, "max_position_embeddings", 0),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "n_params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------- records
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    from driftscope import __version__

    return {"driftscope": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": _version("transformers"),
            "sageattention": _version("sageattention"), "triton": _version("triton"), "h5py": _version("h5py"),
            "git": _git_state()}


def _git_state() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (working tree modified)' if dirty else ''}" if head else "unknown"


def cpu_machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def machine(device) -> dict:
    """The card (name, memory, compute capability) and the host."""
    out = {"device": str(device), **cpu_machine()}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, device_memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    else:
        out["device_name"] = "cpu"
    return out


def _plain(x):
    if isinstance(x, (torch.Tensor,)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    return str(x)


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(result), indent=1, default=_plain) + "\n")
    os.replace(tmp, path)
    return path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_script(main: Callable[[], int], name: str) -> int:
    """Run an experiments/ script's main: a DriftscopeError (e.g. no CUDA) is one line on stderr and exit 2."""
    try:
        return main() or 0
    except DriftscopeError as e:
        print(f"{name}: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
