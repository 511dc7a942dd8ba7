"""`python -m driftscope.evaluate`: what 8-bit attention costs end to end, against the model's own SDPA."""
from __future__ import annotations

import sys
from typing import Sequence

from driftscope import cli
from driftscope.config import QUANT_ATTENTION, EvaluateConfig, sage_path_names
from driftscope.paths import SAGE_IMPLS

EXAMPLES = """\
  python -m driftscope.evaluate --quant-attention 8bit       # CPU (emulated), about 3 min: prints the verdict
  python -m driftscope.evaluate --quant-attention off        # both sides SDPA: every delta is exactly 0
  python -m driftscope.evaluate --paths sage8,sage8-nosmooth --prompt-lengths 8,64,65,128 --decode-windows 4
  python -m driftscope.evaluate --prompts-file experiments/prompts.jsonl --quant-attention 8bit --chat 0 --generate 0,64
  python -m driftscope.evaluate --model llama3-8b --quant-attention 8bit --contexts 512,2048,max --windows 20
"""


def build_parser() -> cli.Parser:
    from driftscope.report.verdict import THRESHOLDS_HELP

    p = cli.parser("driftscope evaluate", "Compare 8-bit attention paths with the model's own SDPA baseline: "
                   "perplexity and prefill logits (KL, top-1), teacher-forced decode after short and long prompts "
                   "(the decode kernel), greedy generations scored by the baseline's NLL, and a verdict per path. "
                   f"Verdict {THRESHOLDS_HELP}.", EXAMPLES)
    d = EvaluateConfig()
    p.add_argument("--quant-attention", "--quant_attention", dest="quant_attention", default=None,
                   choices=QUANT_ATTENTION, help="8bit: compare the path the installed sageattention's own sageattn "
                   "runs on this device (sage8 for 1.0.6 and on the CPU); off: SDPA on both sides, every delta "
                   "exactly 0 (default: off, or 8bit with --paths)")
    p.add_argument("--paths", type=cli.comma_list(), default=(), metavar="P1,P2",
                   help=f"compare these paths with the baseline instead, each as attn_implementation=<path>: "
                   f"{', '.join(sage_path_names())} (default: what --quant-attention says)")
    p.add_argument("--sage-impl", default=d.sage_impl, choices=SAGE_IMPLS,
                   help="kernel (CUDA), interpret (Triton interpreter, CPU), emulate, or auto: kernel on CUDA, else "
                   "emulate")
    p.add_argument("--contexts", type=cli.comma_list(context_length), default=d.contexts, metavar="C1,C2",
                   help="perplexity window lengths in tokens, 'max' for the model's maximum")
    p.add_argument("--windows", type=int, default=d.windows, help="non-overlapping corpus windows per context")
    p.add_argument("--prompt-lengths", type=cli.comma_list(int), default=d.prompt_lengths, metavar="P1,P2",
                   help="teacher-forced decode: prompt lengths prefilled before decoding")
    p.add_argument("--decode-windows", type=int, default=d.decode_windows,
                   help="teacher-forced decode: corpus windows (different offsets) per prompt length; 0 skips it")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps,
                   help="teacher-forced decode: steps fed the baseline's greedy continuation")
    p.add_argument("--generate", type=cli.comma_list(int), default=d.generate, metavar="N,T",
                   help="greedy continuations of N corpus prompts per generation length, T new tokens each (T "
                   "also for chat and file prompts); N = 0 skips the corpus prompts, T = 0 every generation")
    p.add_argument("--generation-lengths", type=cli.comma_list(int), default=d.generation_lengths, metavar="L1,L2",
                   help="tokens of the corpus generation prompts")
    p.add_argument("--chat", type=int, default=d.chat,
                   help="built-in chat questions to generate from, with the model's chat template (if any); 0: none")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="your own generation prompts: plain text, one per line, or JSONL with a 'prompt' string or "
                   "a 'messages' list (chat) per line")
    cli.add_model_options(p, d, seed_help="seeds the bootstrap and orders the documents generation prompts come from")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the run file (default: runs/<model>-evaluate-<flag or paths>.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def context_length(text: str) -> int | str:
    """A context length in tokens, or the word `max` (the model's maximum context)."""
    return "max" if text.strip().lower() == "max" else int(text)


context_length.__name__ = "int-or-max"


def config_from_args(args) -> EvaluateConfig:
    keep = ("model", "quant_attention", "sage_impl", "windows", "decode_windows", "decode_steps", "chat",
            "prompts_file", "corpus", "device", "dtype", "device_map", "seed", "trust_remote_code")
    lists = ("paths", "contexts", "prompt_lengths", "generate", "generation_lengths")
    return EvaluateConfig(**{k: getattr(args, k) for k in keep}, **{k: tuple(getattr(args, k)) for k in lists})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    from driftscope import store
    from driftscope.report.text import format_evaluation
    from driftscope.run.evaluate import run_evaluate

    out = run_evaluate(config, out=args.out, overwrite=args.overwrite, progress=not args.quiet,
                       argv=["python", "-m", "driftscope.evaluate", *(sys.argv[1:] if argv is None else argv)])
    with store.open_run(out) as run:
        env = run.environment or {}
        print(format_evaluation({name: run.table(name) for name in run.tables()}, run.model.get("dtype", ""),
                                env.get("compared"), env.get("sage_impl")))
    print(f"\nrun file: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope evaluate", main))
