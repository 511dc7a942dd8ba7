"""The public API and the command-line entry points as a user meets them."""
import os
import shutil
import subprocess
import sys

import pytest

CLI_MODULES = ("capture", "evaluate", "bench", "figures", "summary")
API_FUNCTIONS = ("run_capture", "run_evaluate", "run_throughput", "open_run", "load_model", "register", "registered")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("first", ["cli_modules_first", "api_first"])
def test_api_names_stay_functions_whatever_was_imported_first(first):
    cli = "".join(f"import driftscope.{m}\n" for m in CLI_MODULES)
    api = "import driftscope as ds\n" + "".join(f"ds.{f}\n" for f in API_FUNCTIONS)
    check = ("import driftscope as ds, inspect\n"
             f"bad = [f for f in {API_FUNCTIONS!r} if not callable(getattr(ds, f)) or inspect.ismodule(getattr(ds, f))]\n"
             "assert not bad, bad\nassert inspect.ismodule(ds.plots) and callable(ds.plots.drift_heatmap)\n")
    r = _python((cli + api if first == "cli_modules_first" else api + cli) + check)
    assert r.returncode == 0, r.stderr


def test_only_the_package_and_its_hooks_are_importable():
    r = _python("import importlib.util as u\n"
                "assert u.find_spec('driftscope.hooks') is not None\n"
                "for name in ('driftscope.tests', 'driftscope.experiments', 'driftscope.paper'):\n"
                "    assert u.find_spec(name) is None, name\n")
    assert r.returncode == 0, r.stderr


def test_import_driftscope_is_cheap():
    r = _python("import sys, driftscope\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_every_entry_point_has_help():
    exe = shutil.which("driftscope", path=os.path.dirname(sys.executable)) or shutil.which("driftscope")
    assert exe, "the console script `driftscope` is not installed"
    commands = [[exe, "--help"], [sys.executable, "-m", "driftscope", "--help"], [exe, "capture", "--help"]]
    commands += [[sys.executable, "-m", f"driftscope.{m}", "--help"] for m in CLI_MODULES]
    for argv in commands:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout and not r.stderr.strip(), (argv, r.stderr)
    r = subprocess.run([exe, "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "capture" in r.stderr


def test_every_user_facing_error_is_a_driftscope_error_and_keeps_its_old_base():
    from driftscope.errors import DriftscopeError, UnsupportedModelError
    from driftscope.paths import PathError, UnknownPathError
    from driftscope.paths.sage_triton import SageModeError, SageUnavailableError

    # cli.run prints a DriftscopeError as one line; callers' `except ValueError/RuntimeError` must still work
    for error, old_base in ((PathError, ValueError), (UnknownPathError, ValueError), (UnsupportedModelError, TypeError),
                            (SageUnavailableError, RuntimeError), (SageModeError, RuntimeError)):
        assert issubclass(error, DriftscopeError) and issubclass(error, old_base), error


def test_driftscope_errors_imports_nothing_of_the_package():
    r = _python("import sys, driftscope.errors\n"
                "assert not [m for m in sys.modules if m.startswith('driftscope.') and m != 'driftscope.errors']")
    assert r.returncode == 0, r.stderr
