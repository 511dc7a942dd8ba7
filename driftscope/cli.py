"""What every `python -m driftscope.X` shares: one-line errors with exit code 2, argument parsers and their help.

Bad input never shows a traceback: each `DriftscopeError` becomes `driftscope X: error: <one sentence>`. Every
command validates all of its input before it loads a model or touches a file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from typing import Callable, Sequence

from driftscope.errors import ConfigError, DriftscopeError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
HELP_WIDTH = 100  # --help is wrapped to the terminal, at most this wide


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _show_default(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written for the description and examples (cli.parser wraps them), every option's default shown
    once: options whose help does not say its default get "(default: X)"."""

    def __init__(self, prog, indent_increment=2, max_help_position=30, width=None):
        width = width or min(shutil.get_terminal_size().columns, HELP_WIDTH) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "off" if action.default is False else "on"
        else:
            shown = _show_default(action.default)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


def _layout_examples(examples: str, width: int = HELP_WIDTH - 2) -> str:
    """Example lines at most `width` wide: a trailing `# comment` that does not fit goes on its own line above its
    command, and a command that still does not fit continues on the next line (shell `\\` continuation)."""
    out = []
    for line in examples.rstrip("\n").splitlines():
        if len(line) > width and "  # " in line:
            command, comment = line.split("  # ", 1)
            out.append(f"  # {comment.strip()}")
            line = command.rstrip()
        indent = " " * (len(line) - len(line.lstrip()))
        while len(line) > width:
            start = len(line) - len(line.lstrip()) + 1  # never cut inside the leading blanks
            cut = line.rfind(" -", start, width - 1)  # before an option, so that it keeps its value
            if cut < start:
                cut = line.rfind(" ", start, width - 1)
            if cut < start:
                break  # one word longer than the width: leave it
            out.append(line[:cut] + " \\")
            line = indent + "    " + line[cut + 1:]
        out.append(line)
    return "\n".join(out) + "\n"


def parser(prog: str, description: str, examples: str) -> Parser:
    return Parser(prog=prog, description=textwrap.fill(" ".join(description.split()), HELP_WIDTH - 2),
                  epilog="examples:\n" + _layout_examples(examples), formatter_class=HelpFormatter)


def example_lines(p: argparse.ArgumentParser) -> list[str]:
    """The commands of a parser's examples, continuation lines joined, comments dropped."""
    text = (p.epilog or "").replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = line.split("  # ")[0].strip()
        if line.startswith(("python ", "driftscope ")):
            lines.append(" ".join(line.split()))
    return lines


def _accepts(main: Callable, option: str) -> bool:
    """Whether the command whose `main` this is (a module with `build_parser`) has `option`."""
    build = getattr(sys.modules.get(getattr(main, "__module__", ""), None), "build_parser", None)
    if build is None:
        return True
    try:
        return option in build()._option_string_actions
    except Exception:
        return True


def one_line(err: BaseException, resumable: bool = True) -> str:
    if isinstance(err, DriftscopeError):
        return err.one_line(resumable)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run(prog: str, main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI's main; known errors print one line and return 2, Ctrl-C returns 130.

    Advice to pass --resume is given only where the command has --resume."""
    try:
        prepare_sage_impl(list(sys.argv[1:] if argv is None else argv), own_process=_own_process())
        return main(argv) or 0
    except KeyboardInterrupt:
        advice = "; continue it with --resume" if _accepts(main, "--resume") else ""
        print(f"{prog}: interrupted; every hook was removed, and a run file that holds finished prompts is kept, "
              f"marked interrupted{advice}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DriftscopeError as err:
        print(f"{prog}: error: {one_line(err, _accepts(main, '--resume'))}", file=sys.stderr)
        return EXIT_BAD_INPUT


# -- the Triton interpreter ----------------------------------------------------------------------------------

def _own_process() -> bool:
    """Whether this Python process was started to run a driftscope command (so that it may re-execute itself)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.split(".")[0] == "driftscope" or os.path.basename(sys.argv[0] or "") == "driftscope"


def _sage_impl_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--sage-impl" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--sage-impl="):
            return a.split("=", 1)[1]
    return None


def prepare_sage_impl(argv: list[str], own_process: bool) -> None:
    """`--sage-impl interpret` runs SageAttention's Triton code under Triton's interpreter, which is chosen by
    TRITON_INTERPRET=1 when triton is first imported. The command sets it before anything imports triton; if
    triton is already imported, a process started for this command re-executes itself with the variable set, and a
    command called from Python raises one clear error."""
    if _sage_impl_arg(argv) != "interpret" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    if own_process and getattr(sys, "orig_argv", None):
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    raise ConfigError("--sage-impl interpret needs TRITON_INTERPRET=1 before triton is imported, and this Python "
                      "process has imported triton already; set TRITON_INTERPRET=1 in the environment before "
                      "starting Python, or run the command in a process of its own")


# -- shared options ------------------------------------------------------------------------------------------

def add_model_options(p: argparse.ArgumentParser, defaults, seed_help: str) -> None:
    """The options every command that loads a model shares: model, corpus, device, dtype, device map, seed,
    remote code."""
    from driftscope.config import DEVICE_MAPS, DTYPE_NAMES

    p.add_argument("--model", default=defaults.model, help="the embedded 'smollm2-135m', an alias such as "
                   "llama3-8b, a hub id or a local checkpoint folder (default: smollm2-135m)")
    p.add_argument("--corpus", default=None, metavar="FILE",
                   help="a UTF-8 text file to draw prompts from (default: the embedded Wikipedia extract)")
    p.add_argument("--device", default=defaults.device,
                   help="cpu, cuda, cuda:N, or auto: cuda when a GPU is visible, else cpu (default: auto)")
    p.add_argument("--dtype", default=defaults.dtype, choices=DTYPE_NAMES,
                   help="the model's dtype; auto is float16 on CUDA, bfloat16 on the CPU (default: auto)")
    p.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="spread the model over several GPUs with accelerate (default: none, one device)")
    p.add_argument("--seed", type=int, default=defaults.seed, help=seed_help)
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own modeling code")


def comma_list(kind: Callable = str) -> Callable[[str], tuple]:
    """An argparse type for comma-separated values, e.g. `fp16,sage8` or `256,1024`."""

    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(kind(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def token_range(text: str) -> tuple[int, int]:
    """`START:STOP` token positions."""
    try:
        start, stop = (int(t) for t in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP token positions, got {text!r}") from None
    return start, stop
