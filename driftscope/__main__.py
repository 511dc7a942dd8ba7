"""`driftscope COMMAND ...` (the console script) and `python -m driftscope COMMAND ...`."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from driftscope import __version__, cli

COMMANDS = {
    "capture": "capture drift metrics of each attention path into one HDF5 run file",
    "evaluate": "what 8-bit attention costs: perplexity, prefill and decode KL, generations, a verdict",
    "bench": "prefill and decode tokens/s and peak memory of each attention path (CUDA)",
    "figures": "every figure, table and paper number from stored run files",
    "summary": "the per-layer worst-head summary of a stored capture",
}

USAGE = "usage: driftscope [--version] COMMAND [ARGS...]   (driftscope COMMAND --help for its options)\n\ncommands:\n" + \
    "".join(f"  {name:<10}{what}\n" for name, what in COMMANDS.items()) + \
    "\nexamples:\n  driftscope capture\n  driftscope capture --paths fp16,sage8 --lengths 512 --prompts 4\n" \
    "  driftscope evaluate --quant-attention 8bit\n  python -m driftscope summary runs/smollm2-135m-fp16-sage8.h5\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] == "--version":
        print(f"driftscope {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"driftscope: error: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)} "
              "(see driftscope --help)", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    command = importlib.import_module(f"driftscope.{args[0]}")
    return cli.run(f"driftscope {args[0]}", command.main, args[1:])


if __name__ == "__main__":
    sys.exit(main())
