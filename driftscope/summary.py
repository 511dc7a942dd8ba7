"""`python -m driftscope.summary RUN`: the per-layer worst-head summary of a stored capture."""
from __future__ import annotations

import sys
from typing import Sequence

from driftscope import cli

EXAMPLES = """\
  python -m driftscope.summary runs/a.h5
  python -m driftscope.summary runs/a.h5 --markdown sage8
"""


def build_parser() -> cli.Parser:
    p = cli.parser("driftscope summary", "Print the per-layer worst-head summary of a stored capture.", EXAMPLES)
    p.add_argument("run", help="a capture run file")
    p.add_argument("--markdown", metavar="PATH", help="print one path's columns as a Markdown table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from driftscope import store
    from driftscope.report import text

    with store.open_run(args.run) as run:
        table = text.layer_summary(run.metrics(site="attn_out"))
    print(text.markdown_layer_summary(table, args.markdown) if args.markdown else text.format_layer_summary(table))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope summary", main))
