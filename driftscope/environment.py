"""The machine a run uses: what a run file records about its software and device, and the checks, made before
anything loads or is written, that this machine can do what a run asks (the device, the sage implementation, the
output paths). Each check raises one `DriftscopeError` naming the value and what would be accepted."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from driftscope.errors import DeviceError, OutputError, OutputExistsError
from driftscope.store.journal import journal_path

DEVICES = "auto, cpu, cuda or cuda:N"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def resolve_device(device: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cpu`, `cuda`, `cuda:N` checked against this machine."""
    name = str(device).strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {name!r}; expected {DEVICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise DeviceError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return name


def check_sage_impl(impl: str, device: str, sage_paths) -> None:
    """Fail now, not at the first attention call, when the sage paths cannot run as `impl` on `device`. What runs
    is driftscope.paths' own resolution (a kernel the installed sageattention lacks falls back to the emulator,
    with a warning); refused here is what would fail: a compiled kernel without CUDA, the interpreter on a GPU
    or with a triton too old for it."""
    if not sage_paths or impl in ("auto", "emulate"):
        return
    from driftscope import paths

    on_cuda = str(device).startswith("cuda")
    runs = {name: paths.get_path(name, impl, device=device).impl for name in sage_paths}
    kernel = [name for name, how in runs.items() if how == "kernel"]
    interpret = [name for name, how in runs.items() if how == "interpret"]
    if kernel and not on_cuda:
        raise DeviceError(f"--sage-impl kernel runs the compiled CUDA kernels (for {', '.join(kernel)}), and the "
                          f"device is {device}; use --sage-impl emulate (any device) or interpret (the Triton code "
                          f"on the CPU), or --device cuda")
    if interpret and on_cuda:
        raise DeviceError(f"--sage-impl interpret runs the Triton code on the CPU (for {', '.join(interpret)}), and "
                          f"the device is {device}; use --sage-impl kernel on CUDA, or --device cpu")
    if interpret:
        version = _version("triton")
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
        if parts < (3, 9):
            raise DeviceError(f"--sage-impl interpret needs triton >= 3.9 (found {version}): older interpreters "
                              f"fail on SageAttention's kernels; pip install 'triton>=3.9' or use --sage-impl emulate")


def prepare_triton_interpreter() -> None:
    """Sets TRITON_INTERPRET=1 while triton is not imported yet (the interpreter is chosen at that import)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise DeviceError("--sage-impl interpret needs TRITON_INTERPRET=1 before triton is imported, and this "
                          "Python process has imported triton already; set TRITON_INTERPRET=1 in the environment "
                          "before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"


# -- output paths ----------------------------------------------------------------------------------------------

def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe(folder: Path, what: str) -> None:
    """Create and remove a temporary file in `folder`: the only sure test that it is writable (root bypasses
    permission bits, /proc and read-only mounts refuse at create)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".driftscope-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"cannot write {what}: no file can be created in {folder} ({e.strerror or e}); choose "
                          f"another location") from None


def check_output_dir(folder, what: str | None = None) -> list[Path]:
    """That `folder` is, or can be created as, a writable directory. Creates nothing; returns the directories
    that writing there will create (outermost first)."""
    folder = Path(folder)
    what = what or str(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"cannot write {what}: {folder} exists and is not a directory; choose another location")
    base = _first_existing(folder)
    if not base.is_dir():
        raise OutputError(f"cannot write {what}: {base} is a file, not a directory; choose another location")
    _probe(base, what)
    missing, p = [], folder
    while p != base:
        missing.append(p)
        p = p.parent
    return missing[::-1]


def check_output_file(path, *, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> list[Path]:
    """That `path` can be written as a new file: not a directory, its folder writable, and replaced only with
    `overwrite` (or continued with `resume`). Creates nothing; returns the directories writing it will create."""
    raw, path = os.fspath(path), Path(path)
    if path.is_dir():
        raise OutputError(f"{raw} is a directory; give a file path for the output")
    if raw.endswith(os.sep) or path.name in ("", ".", ".."):
        raise OutputError(f"{raw} names a directory, not a file; give a file path for the output")
    made = check_output_dir(path.parent, what=str(path))
    if os.path.lexists(path):
        if not (overwrite or resume):
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it",
                                    resume_advice=" or --resume to continue it" if resumable else "")
        if not path.is_file():
            raise OutputError(f"{path} exists and is not a regular file; choose another output")
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as e:
            raise OutputError(f"cannot write {path} ({e.strerror or e}); check its permissions or choose another "
                              f"output") from None
    return made


def remove_dirs(made: list[Path]) -> None:
    """Removes, innermost first, the directories check_output_* reported as new, where they are still empty."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            break


def discard_run_file(path: Path, made: list[Path]) -> None:
    """Removes a run file that committed no prompt, its journal and the folders made for it, so that a rerun is
    not refused for an existing output. Only for a file this run created (or replaced)."""
    for p in (Path(path), Path(journal_path(path))):
        p.unlink(missing_ok=True)
    remove_dirs(made)


# -- what a run file records -----------------------------------------------------------------------------------

def describe(device: str) -> dict:
    from driftscope import __version__

    env = {
        "driftscope": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "sageattention": _version("sageattention"),
        "triton": _version("triton"),
        "h5py": _version("h5py"),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = "cpu"
    return env
