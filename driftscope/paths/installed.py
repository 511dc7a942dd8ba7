"""Which sageattention is installed, and what it would run: found without importing it.

1.0.6 and 2.x share the import name `sageattention`; importing it compiles or interprets Triton code and loads CUDA
extensions, so this module only reads the distribution's version and files: `core.py`'s `def sageattn*` entry points
and, for 2.x, which compiled extensions exist (`_fused` is imported by core.py itself; `_qattn_sm80`, `_qattn_sm89`,
`_qattn_sm90` back the CUDA entry points, see upstream `setup.py` and `sageattention/core.py`).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import UnsupportedDeviceError

# 2.x entry point -> the compiled extension it needs besides _fused (None: Triton only)
_EXTENSION = {
    "sageattn_qk_int8_pv_fp16_triton": None,
    "sageattn_qk_int8_pv_fp16_cuda": "_qattn_sm80",
    "sageattn_qk_int8_pv_fp8_cuda": "_qattn_sm89",
    "sageattn_qk_int8_pv_fp8_cuda_sm90": "_qattn_sm90",
}
# what 2.2.0's `sageattn` dispatches to on each compute capability (core.py), as driftscope path names
_SAGEATTN_DISPATCH = {(8, 0): "sage2-fp16-ampere", (8, 6): "sage2-triton", (8, 9): "sage2-fp8-ada",
                      (9, 0): "sage2-fp8"}


class InstalledSage(NamedTuple):
    family: str  # "1.0.6" (the 1.x Triton-only releases) or "2.x"
    version: str  # the distribution's version, e.g. "1.0.6" or "2.2.0" ("unknown" without metadata)
    functions: tuple[str, ...]  # the sageattn* entry points that can run (their compiled extensions exist)


@functools.lru_cache(maxsize=1)
def installed_sage() -> InstalledSage | None:
    """(family, version, available function names) of the installed sageattention, or None if there is none."""
    try:
        spec = importlib.util.find_spec("sageattention")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        version = importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return describe(Path(next(iter(spec.submodule_search_locations))), version)


def describe(pkg: Path, version: str) -> InstalledSage:
    """What the sageattention package in folder `pkg`, of distribution version `version`, provides."""
    try:
        defs = re.findall(r"^def (sageattn\w*)\(", (pkg / "core.py").read_text(errors="replace"), re.M)
    except OSError:
        defs = []
    two = version.startswith("2") or (version == "unknown" and (pkg / "triton").is_dir())
    if not two:
        return InstalledSage("1.0.6", version, tuple(defs))

    def built(ext: str) -> bool:
        return any(pkg.glob(f"{ext}*.so")) or any(pkg.glob(f"{ext}*.pyd"))

    usable = () if not built("_fused") else tuple(
        f for f in defs if f in ("sageattn", "sageattn_varlen") or (f in _EXTENSION and (
            _EXTENSION[f] is None or built(_EXTENSION[f]))))
    return InstalledSage("2.x", version, usable)


def default_quant_path(device: str | torch.device | None = None) -> str:
    """The path that the installed sageattention's own `sageattn` would run on `device`.

    CPU (or None), no sageattention, or 1.0.6: "sage8". 2.x on CUDA: what 2.2.0's `sageattn` dispatches to for the
    card's compute capability (sm80 sage2-fp16-ampere, sm86 sage2-triton, sm89 sage2-fp8-ada, sm90 sage2-fp8);
    UnsupportedDeviceError for any other (sm120's per-warp FP8 kernel is not modelled; others sageattn refuses).
    """
    if device is None or torch.device(device).type != "cuda":
        return "sage8"
    sage = installed_sage()
    if sage is None or sage.family == "1.0.6":
        return "sage8"
    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap not in _SAGEATTN_DISPATCH:
        raise UnsupportedDeviceError(
            f"sageattention {sage.version}'s sageattn on compute capability sm{cap[0]}{cap[1]} runs a kernel that no "
            f"driftscope path models (supported: {', '.join(f'sm{a}{b}' for a, b in _SAGEATTN_DISPATCH)}); name a "
            "path explicitly")
    return _SAGEATTN_DISPATCH[cap]
