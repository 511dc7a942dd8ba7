"""Every command-line interface, fuzzed from its own parser, and its --help.

The argv of each example is generated from `build_parser()._actions`: each option is left out or given a valid
or an invalid value (the accepted paths and sites are read from driftscope at run time, so new ones are fuzzed
too). Each example runs in this process through `cli.run`, as `python -m driftscope.X` does, and must
- exit with 0 or 2, never with a traceback; exit 2 prints exactly one line;
- leave every file that existed before it unchanged unless --overwrite (or --resume) was given.
Loading a model is the one step replaced (it would take seconds per example): the stub first asserts that the
command's validation had run, then stops the run. figures and summary run for real. Real processes are in
test_reliability.py, test_capture.py and test_figures.py.

Examples (derandomized, so CI sees the same ones every time): capture 60, evaluate 30, bench 25, figures 15,
summary 25, `driftscope` 15: 170 in all, about 17 s on a 2-core machine (the whole module about 30 s).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_in_process, write_capture_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftscope import cli, config, paths

CLIS = ("capture", "evaluate", "bench", "figures", "summary")
EVALUATE_RUN = str(REPO / "experiments/results/smollm2-135m-h100-evaluate.h5")
BENCH_JSON = str(REPO / "experiments/results/bench_throughput.json")
EXAMPLES = {"capture": 60, "evaluate": 30, "bench": 25, "figures": 15, "summary": 25}


REFUSALS: list[str] = []  # the messages seen (printed with -s when a fuzz test fails)


class Stubbed(Exception):
    """Raised where the command would load a model: every check before it passed."""


def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"driftscope.{name}").build_parser()


# -- --help -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CLIS)
def test_help_is_complete_wrapped_and_every_example_parses(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # a wide terminal: the help still stays readable
    p = _parser(name)
    text = p.format_help()
    assert max(len(line) for line in text.splitlines()) <= cli.HELP_WIDTH, text
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} is undocumented"
        shown = p._get_formatter()._expand_help(action) if action.help else ""
        if action.option_strings:
            assert "default" in shown.lower(), f"{name} {action.option_strings[0]}: no default in {shown!r}"
    examples = cli.example_lines(p)
    assert examples, f"{name} --help shows no examples"
    for line in examples:
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", f"driftscope.{name}"], line
        p.parse_args(words[3:])  # exits (SystemExit) if the example is not accepted


def test_examples_name_only_files_that_exist_or_that_an_earlier_example_writes():
    written: set[str] = set()
    for name in CLIS:  # capture's examples come first: they write the run files the others read
        for line in cli.example_lines(_parser(name)):
            words = shlex.split(line)[3:]
            outputs = {w for prev, w in zip(words, words[1:]) if prev in ("--out", "--out-dir", "--tables")}
            for word in words:
                if word.endswith((".h5", ".json", ".jsonl", ".txt")) and word not in outputs:
                    assert word in written or (REPO / word).is_file(), (name, line, word)
            written |= outputs


# -- the resume advice follows the command -----------------------------------------------------------------------

def test_advice_to_resume_only_where_the_command_can(tmp_path, monkeypatch):
    from driftscope import capture, evaluate, store
    from driftscope.run import evaluate as evaluation

    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"not empty")

    def writer_on_existing(*a, **k):  # what run_evaluate's writer meets
        store.RunWriter(existing, kind="evaluate", argv=[], config={}, environment={})

    monkeypatch.setattr(evaluation, "run_evaluate", writer_on_existing)
    code, _, err = run_in_process(evaluate, "--out", str(existing))
    assert code == 2 and "--overwrite" in err and "--resume" not in err, err
    code, _, err = run_in_process(capture, "--out", str(existing))
    assert code == 2 and "--overwrite" in err and "--resume" in err, err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "run_evaluate", interrupted)
    code, _, err = run_in_process(evaluate, "--out", str(tmp_path / "new.h5"))
    assert code == 130 and "interrupted" in err and "--resume" not in err, err
    assert existing.read_bytes() == b"not empty"


# -- the fuzz -----------------------------------------------------------------------------------------------------

def _comma(items, min_size: int = 1) -> st.SearchStrategy:
    """Comma lists of distinct accepted items."""
    return st.lists(st.sampled_from(list(items)), min_size=min_size, max_size=3, unique=True).map(",".join)


def _wrong_list(items) -> list[str]:
    return ["", "bogus", f"{items[0]},bogus", f"{items[-1]},{items[-1]},{items[-1]}"]


def _hints(name: str, tiny) -> dict:
    """Per option (dest): (values it accepts, values it refuses or that are slow to run), as strategies. Paths
    are relative to the example's working folder (see _world); "accepted" means well-formed, not necessarily
    runnable together."""
    model, corpus = map(str, tiny)
    inputs = ["capture.h5"]
    bad_inputs = [EVALUATE_RUN, BENCH_JSON, "empty.h5", "junk.h5", "missing.h5", "a_dir", "a_file"]  # (and slow)
    names = [p for p in paths.PATH_NAMES if name != "evaluate" or p.startswith("sage")]  # evaluate: compared only
    one = st.sampled_from
    hints = {
        "paths": (_comma(names, min_size=1 if name == "evaluate" else 2), one(_wrong_list(names))),
        "store": (_comma(config.STORE_SITES), one(_wrong_list(config.STORE_SITES))),
        "lengths": (one(["16", "8,16"]), one(["0", "-5", "99999", "x", ""])),
        "tokens": (one(["0:8", "4:12"]), one(["8:4", "0:99999", "100:200", "a:b"])),
        "layers": (one(["0", "0,1"]), one(["99", "-1", "x"])),
        "heads": (one(["0"]), one(["2", "99", "-1"])),
        "model": (one([model]), one(["no-such-model", "./missing-folder", "a_dir"])),  # never a hub id (offline)
        "corpus": (one([corpus]), one(["a_dir", "missing.txt", "a_file"])),
        "device": (one(["auto", "cpu"]), one(["cuda", "cuda:7", "tpu", "bogus"])),
        "markdown": (one(["sage8"]), one(["fp16", "sage8-nosmooth", "bogus"])),
        "run": (one(inputs), one(bad_inputs)),
        "inputs": (st.just(inputs), st.lists(one(inputs + bad_inputs), min_size=1, max_size=2)),
        "tables": (one(["tables"]), one(["a_file", "/proc/driftscope-tables"])),
        "out_dir": (one(["bench"]), one(["a_file", "/proc/driftscope-bench"])),
    }
    if name == "figures":
        # (one new folder: once it holds figures, only --overwrite writes there again, and plotting is slow)
        hints["out"] = (one(["figs"]), one(["a_file", "a_dir/sub", "/proc/driftscope-figs"]))
    else:
        hints["out"] = (one(["new.h5", "runs/new.h5", "noext", "capture.h5"]),
                        one(["a_dir", "a_dir/", "a_file/x.h5", "/proc/driftscope/x.h5"]))
    return hints


def _generic(action) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(accepted, refused) values for an option no hint names (e.g. one added since), by its type."""
    if action.choices:
        return st.sampled_from([str(c) for c in action.choices]), st.just("bogus")
    if action.type is int:
        return st.sampled_from(["1", "2", "0"]), st.sampled_from(["-1", "999999999", "x"])
    if action.type is cli.token_range:
        return st.just("0:8"), st.sampled_from(["8:4", "a:b"])
    return st.sampled_from(["1", "8", "8,16", "2,4", "max"]), st.sampled_from(["0", "-1", "x", ""])


@st.composite
def argvs(draw, name: str, tiny, forced: frozenset = frozenset()):
    """Each option in one example of four, with an accepted value three times in four."""
    parser, hints = _parser(name), _hints(name, tiny)
    argv: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        accepted, refused = hints[action.dest] if action.dest in hints else _generic(action)
        value = draw(refused if draw(st.integers(0, 3)) == 3 else accepted)
        if not action.option_strings:  # a positional: always given
            argv += value if isinstance(value, list) else [value]
            continue
        if action.dest not in forced and draw(st.integers(0, 3)) != 3:
            continue
        option = draw(st.sampled_from(action.option_strings))
        argv += [option] if action.nargs == 0 else [option, value]
    if draw(st.integers(0, 9)) == 0:  # now and then a stray word
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--no-such-option", "-x", "extra"])))
    return argv


def _world(folder: Path) -> None:
    """The files every example finds in its working folder."""
    write_capture_run(folder / "capture.h5")
    write_capture_run(folder / "empty.h5", prompts=0)
    (folder / "junk.h5").write_text("not a run file")
    (folder / "a_file").write_text("a file, not a folder")
    (folder / "a_dir").mkdir()


def _snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file()}


@pytest.fixture
def stubs(monkeypatch):
    """Model loading replaced by a stub that checks the command's validation ran first. Returns the log of
    validations seen."""
    from driftscope.run import capture as capture_lib
    from driftscope.run import evaluate as evaluate_lib
    from driftscope.run import throughput

    seen: list[str] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            seen.append(name)
            return out
        return wrapped

    def stop(what):
        def stub(*a, **k):
            assert seen and seen[-1] == what, (what, seen)  # validation passed just before
            raise Stubbed(what)
        return stub

    for name, library in (("capture", capture_lib), ("evaluate", evaluate_lib)):
        monkeypatch.setattr(library, "validate", spy(name, library.validate))
        monkeypatch.setattr(library, "load_model", stop(name))
    monkeypatch.setattr(throughput, "run_throughput", lambda *a, **k: (_ for _ in ()).throw(Stubbed("bench")))
    return seen


def _check(name: str, argv: list[str], folder: Path, tiny) -> str:
    before = _snapshot(folder, *(Path(p).parent for p in tiny))
    module = importlib.import_module(f"driftscope.{name}")
    try:
        code, out, err = run_in_process(module, *argv)
    except Stubbed:
        return "validated"
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        REFUSALS.append(lines[-1][:160])
        assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    if "--overwrite" not in argv and "--resume" not in argv:
        after = _snapshot(folder, *(Path(p).parent for p in tiny))
        changed = [str(p) for p in before if after.get(p) != before[p]]
        assert not changed, (argv, changed)
    return "ok" if code == 0 else "refused"


def _fuzz(name, tmp_path_factory, tiny, forced=frozenset()):
    folder = tmp_path_factory.mktemp(f"fuzz-{name}")
    _world(folder)
    outcomes: list[str] = []

    @settings(derandomize=True, deadline=None, max_examples=EXAMPLES[name], database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv=argvs(name, tiny, forced))
    def example(argv):
        outcomes.append(_check(name, argv, folder, tiny))

    cwd = Path.cwd()
    import os

    os.chdir(folder)
    try:
        example()
    finally:
        os.chdir(cwd)
    return outcomes


@pytest.mark.parametrize("name", CLIS)
def test_fuzz_cli(name, tmp_path_factory, tiny, stubs):
    # the model is always named, so that an example never inspects the embedded model's cache
    forced = frozenset({"model"}) if name in ("capture", "evaluate") else frozenset()
    REFUSALS.clear()
    outcomes = _fuzz(name, tmp_path_factory, tiny, forced)
    print("\n".join(REFUSALS), "\n", {o: outcomes.count(o) for o in set(outcomes)})
    assert "refused" in outcomes, outcomes  # the fuzz reached the checks ...
    if name != "bench":  # (bench gets past them only on a CUDA machine or with --device cpu --smoke)
        assert {"validated", "ok"} & set(outcomes), outcomes  # ... and got past them


@settings(derandomize=True, deadline=None, max_examples=15, database=None)
@given(command=st.sampled_from(["capture", "evaluate", "bench", "figures", "summary", "bogus", "--help",
                                "--version", "help", "-x"]),
       rest=st.lists(st.sampled_from(["--help", "-x", "missing.h5", "--out", "--no-such-option"]), min_size=1,
                     max_size=2))
def test_fuzz_driftscope_command(command, rest):
    """The console script's dispatch (never a bare command: that would start a real run)."""
    import contextlib
    import io

    from driftscope import __main__ as entry

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry.main([command, *rest])
        except SystemExit as e:
            code = e.code
    assert code in (0, 2), (command, rest, code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
