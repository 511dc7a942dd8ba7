"""What every `python -m driftscope.X` shares: one-line errors with exit code 2, and argument parsers.

Bad input never shows a traceback: each known error becomes `driftscope X: error: <one sentence>`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from driftscope.errors import DriftscopeError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def parser(prog: str, description: str, examples: str) -> Parser:
    return Parser(prog=prog, description=description, epilog="examples:\n" + examples,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def _known_errors() -> tuple[type[BaseException], ...]:
    from driftscope import paths, store

    return (DriftscopeError, paths.PathError, store.StoreError, store.RunFileError, FileNotFoundError)


def run(prog: str, main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI's main; known errors print one line and return 2, Ctrl-C returns 130."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; every hook was removed and the run file (if any) is marked interrupted; "
              f"continue it with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _known_errors() as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def add_model_options(p: argparse.ArgumentParser, defaults, seed_help: str) -> None:
    """The options every command that loads a model shares: model, corpus, device, dtype, device map, seed,
    remote code."""
    p.add_argument("--model", default=defaults.model, help="embedded 'smollm2-135m' (default), an alias such as "
                   "llama3-8b, a hub id or a local checkpoint folder")
    p.add_argument("--corpus", default=None, help="a UTF-8 text file (default: the embedded Wikipedia extract)")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=defaults.dtype,
                   help="auto (fp16 on CUDA, bf16 on the CPU), float16, bfloat16, float32")
    p.add_argument("--device-map", default=None, help="e.g. auto: spread the model over several GPUs (accelerate)")
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
