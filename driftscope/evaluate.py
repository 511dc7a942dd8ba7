"""`python -m driftscope.evaluate`: what 8-bit attention costs end to end, against the model's own SDPA."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from driftscope import cli
from driftscope.config import QUANT_ATTENTION, EvaluateConfig
from driftscope.paths import SAGE_IMPLS

EXAMPLES = """\
  python -m driftscope.evaluate --quant-attention 8bit --contexts 256,512 --windows 3 --generate 2,16   # CPU, minutes
  python -m driftscope.evaluate --quant-attention off        # both sides SDPA: every delta is exactly 0
  python -m driftscope.evaluate --model llama3-8b --device cuda --quant_attention=8bit --contexts 512,2048,max \\
      --windows 20 --generate 8,64
  python -m driftscope.evaluate --corpus my.txt --contexts 1024 --windows 10 --out runs/mine.h5 --overwrite
"""


def context_length(text: str) -> int | str:
    """A context length in tokens, or the word `max` (the model's maximum context)."""
    return "max" if text.strip().lower() == "max" else int(text)


context_length.__name__ = "int-or-max"


def build_parser() -> cli.Parser:
    p = cli.parser("driftscope evaluate", "Compare perplexity, logits (KL, top-1) and greedy generations of "
                   "8-bit attention (sage8) against the model's own SDPA baseline.", EXAMPLES)
    d = EvaluateConfig()
    p.add_argument("--quant-attention", "--quant_attention", dest="quant_attention", default=d.quant_attention,
                   choices=QUANT_ATTENTION, help="8bit: compare attn_implementation sage8 against SDPA; "
                   "off (default): SDPA on both sides, every delta exactly 0")
    p.add_argument("--sage-impl", default=d.sage_impl, choices=SAGE_IMPLS,
                   help="kernel (CUDA), interpret (Triton interpreter, CPU), emulate, or auto (default)")
    p.add_argument("--contexts", type=cli.comma_list(context_length), default=d.contexts,
                   help="window lengths in tokens, 'max' for the model's maximum (default 512,2048,max)")
    p.add_argument("--windows", type=int, default=d.windows,
                   help=f"non-overlapping corpus windows per context (default {d.windows})")
    p.add_argument("--generate", type=cli.comma_list(int), default=d.generate, metavar="N,T",
                   help=f"greedy continuations of N corpus prompts for T tokens; 0,0 skips (default "
                   f"{d.generate[0]},{d.generate[1]})")
    p.add_argument("--prompt-length", type=int, default=d.prompt_length,
                   help=f"tokens of each generation prompt (default {d.prompt_length})")
    cli.add_model_options(p, d, seed_help="seeds the bootstrap and the generation prompts (default 0)")
    p.add_argument("--out", default=None, help="run file (default runs/<model>-evaluate-<flag>.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    return EvaluateConfig(
        model=args.model, quant_attention=args.quant_attention, sage_impl=args.sage_impl,
        contexts=tuple(args.contexts), windows=args.windows, generate=tuple(args.generate),
        prompt_length=args.prompt_length, corpus=args.corpus, device=args.device, dtype=args.dtype,
        device_map=args.device_map, seed=args.seed, trust_remote_code=args.trust_remote_code,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    from driftscope import store
    from driftscope.report.text import format_generations, format_summary
    from driftscope.run import evaluate as evaluation

    out = evaluation.run_evaluate(config, out=args.out, overwrite=args.overwrite, progress=not args.quiet,
                              argv=["python", "-m", "driftscope.evaluate", *(sys.argv[1:] if argv is None else argv)])
    quant = "8bit" if config.quant_attention == "8bit" else "base'"
    with store.open_run(out) as run:
        dtype = run.model["dtype"]
        print(f"\n{evaluation.QUANT_ATTN[config.quant_attention]} ({quant}) vs the SDPA baseline ({dtype}), "
              f"per context (Δ = {quant} − base; KL(base ‖ {quant}) per position):")
        print(format_summary(run.table("summary"), quant))
        if "generations" in run.tables():
            print(f"\nGreedy generations:")
            print(format_generations(run.table("generations"), run.table("generation_summary"), quant))
    print(f"\nrun file: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope evaluate", main))
