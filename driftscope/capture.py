"""`python -m driftscope.capture`: capture drift metrics of each attention path into one HDF5 run file."""
from __future__ import annotations

import sys
from typing import Sequence

from driftscope import cli
from driftscope.config import STORE_SITES, CaptureConfig
from driftscope.paths import PATH_NAMES, SAGE_IMPLS

EXAMPLES = """\
  python -m driftscope.capture                                  # embedded SmolLM2-135M on the CPU (~2 min)
  python -m driftscope.capture --paths fp32,fp16,sage8,sage8-nosmooth --lengths 512 --prompts 4
  python -m driftscope.capture --model llama3-8b --device cuda --lengths 2048,8192 --decode 32
  python -m driftscope.capture --store q,k,attn_out --layers 0,15 --heads 0 --tokens 0:256
  python -m driftscope.capture --out runs/a.h5 --resume         # continue an interrupted run
"""


def build_parser() -> cli.Parser:
    p = cli.parser("driftscope capture", "Capture per-layer, per-head drift of 8-bit attention against a "
                   "reference path, in lockstep (propagated) and isolated mode, prefill and decode.", EXAMPLES)
    d = CaptureConfig()
    p.add_argument("--paths", type=cli.comma_list(), default=d.paths,
                   help=f"comma list, the first is the reference; from {', '.join(PATH_NAMES)} (default fp16,sage8)")
    p.add_argument("--sage-impl", default=d.sage_impl, choices=SAGE_IMPLS,
                   help="kernel (CUDA), interpret (Triton interpreter, CPU), emulate, or auto (default)")
    p.add_argument("--mode", default=d.mode, choices=("propagated", "isolated", "both"))
    p.add_argument("--lengths", type=cli.comma_list(int), default=d.lengths, help="prompt lengths in tokens (default 256)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts per length (default 2)")
    p.add_argument("--decode", type=int, default=d.decode, help="greedy decode steps after each prompt (default 4)")
    p.add_argument("--store", type=cli.comma_list(), default=(),
                   help=f"also write full float16 tensors of these sites: {', '.join(STORE_SITES)}")
    p.add_argument("--layers", type=cli.comma_list(int), default=None, help="layers to store (default all)")
    p.add_argument("--heads", type=cli.comma_list(int), default=None, help="heads to store (default all)")
    p.add_argument("--tokens", type=cli.token_range, default=None, help="prefill token range START:STOP to store")
    cli.add_model_options(p, d, seed_help="orders the documents prompts come from (default 0)")
    p.add_argument("--out", default=None, help="run file (default runs/<model>-<paths>.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run file")
    p.add_argument("--no-figures", action="store_true", help="skip writing figures next to the run file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> CaptureConfig:
    return CaptureConfig(
        model=args.model, paths=tuple(args.paths), sage_impl=args.sage_impl, mode=args.mode,
        lengths=tuple(args.lengths), prompts=args.prompts, decode=args.decode, corpus=args.corpus,
        store=tuple(args.store), layers=args.layers, heads=args.heads, tokens=args.tokens, device=args.device,
        dtype=args.dtype, device_map=args.device_map, seed=args.seed, trust_remote_code=args.trust_remote_code,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    from driftscope import store
    from driftscope.report import text
    from driftscope.run.capture import run_capture

    out = run_capture(config, out=args.out, overwrite=args.overwrite, resume=args.resume,
                         argv=["python", "-m", "driftscope.capture", *(sys.argv[1:] if argv is None else argv)],
                         progress=not args.quiet)
    with store.open_run(out) as run:
        df = run.metrics()
    print(f"\nWorst head per layer, attention output vs {config.paths[0]} "
          f"(cos: min cosine, relL2: max relative L2):")
    print(text.layer_summary(df).pipe(text.format_layer_summary))
    if not args.no_figures:
        from driftscope.report.figures import quick_figures

        written = quick_figures(df, out.with_suffix(""))
        if written:
            print(f"\nfigures: {written[0].parent}/")
    print(f"\nrun file: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope capture", main))
