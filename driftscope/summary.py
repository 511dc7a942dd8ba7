"""`python -m driftscope.summary RUN`: the per-layer worst-head summary of a stored capture."""
from __future__ import annotations

import sys
from typing import Sequence

from driftscope import cli

EXAMPLES = """\
  # runs/a.h5 is written by: python -m driftscope.capture --lengths 512 --out runs/a.h5
  python -m driftscope.summary runs/a.h5
  python -m driftscope.summary runs/a.h5 --markdown sage8       # one compared path, as in the README
  python -m driftscope.summary experiments/results/smollm2-135m-cpu-512.h5 --markdown sage8-nosmooth
"""


def build_parser() -> cli.Parser:
    p = cli.parser("driftscope summary", "Print the per-layer worst-head summary (attention output: min cosine, "
                   "max relative L2) of a stored capture run, one block per compared path.", EXAMPLES)
    p.add_argument("run", metavar="RUN", help="a capture run file")
    p.add_argument("--markdown", metavar="PATH",
                   help="print one compared path's columns as a Markdown table (default: every path, as text)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from driftscope import store
    from driftscope.errors import ConfigError
    from driftscope.report import text

    with store.open_run(args.run) as run:
        if run.kind != "capture":
            raise ConfigError(f"{args.run} is a{'n' if run.kind[:1] in 'aeiou' else ''} {run.kind} run; summary "
                              f"reads capture runs (python -m driftscope.figures {args.run} draws this one)")
        if not run.prompts()["complete"].any():
            raise ConfigError(f"{args.run} finished no prompt (status {run.status}): nothing to summarize; continue "
                              f"it with python -m driftscope.capture --resume and its options")
        reference = (run.config.get("paths") or ["?"])[0]
        metrics = run.metrics(site="attn_out")
    for line in text.nonfinite_warnings(metrics):  # stderr: a --markdown table stays clean
        print(line, file=sys.stderr)
    table = text.layer_summary(metrics)
    if args.markdown is None:
        print(text.format_layer_summary(table))
        return 0
    compared = list(dict.fromkeys(table.columns.get_level_values("path"))) if not table.empty else []
    if args.markdown not in compared:
        why = ("is this run's reference: drift is measured against it" if args.markdown == reference
               else "was not captured in this run")
        raise ConfigError(f"--markdown {args.markdown!r} {why}; its compared paths are: "
                          f"{', '.join(compared) or 'none'}")
    print(text.markdown_layer_summary(table, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope summary", main))
