"""`python -m driftscope.figures`: every figure, table and paper number, regenerated from stored run files.

For each run file NAME.h5 it writes NAME/<figure>.png and .pdf and data/NAME/<figure>.csv under --out; with
--tables DIR also the paper's LaTeX fragments. The library is `driftscope.report.figures`.
"""
from __future__ import annotations

import sys
import time
from typing import Sequence

from driftscope import cli

EXAMPLES = """\
  # runs/a.h5 is written by: python -m driftscope.capture --lengths 512 --out runs/a.h5
  python -m driftscope.figures runs/a.h5 --out runs/figures
  python -m driftscope.figures experiments/results/smollm2-135m-cpu-512.h5 --out /tmp/figures
  # the committed figures (see the README's Reproduce section)
  python -m driftscope.figures experiments/results/smollm2-135m-h100-2048.h5 \\
      experiments/results/smollm2-135m-h100-evaluate.h5 \\
      experiments/results/bench_throughput.json \\
      --out figures --tables paper/generated --overwrite
"""


def build_parser() -> cli.Parser:
    p = cli.parser("driftscope figures", "Regenerate every figure (PNG + PDF), its CSV data digest and the "
                   "paper's LaTeX tables and number macros from stored run files only. Every input is read and "
                   "every output folder checked before anything is written; existing figures and tables are "
                   "replaced only with --overwrite.", EXAMPLES)
    p.add_argument("inputs", nargs="+", metavar="RUN",
                   help="run files (.h5: capture or evaluate) and benchmark results (.json)")
    p.add_argument("--out", default="figures", metavar="DIR", help="the figure folder")
    p.add_argument("--tables", default=None, metavar="DIR",
                   help="also write the paper's LaTeX fragments here, e.g. paper/generated (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace figures and tables already there")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    log = (lambda *_: None) if args.quiet else print
    given = list(sys.argv[1:] if argv is None else argv)
    from driftscope.report.figures import regenerate

    regenerate(args.inputs, args.out, args.tables, argv=["python", "-m", "driftscope.figures", *given], log=log,
               overwrite=args.overwrite)
    log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope figures", main))
