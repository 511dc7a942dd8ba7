"""`python -m driftscope.capture`: capture drift metrics of each attention path into one HDF5 run file."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from driftscope import cli
from driftscope.config import MODES, STORE_SITES, CaptureConfig
from driftscope.paths import PATH_NAMES, SAGE_IMPLS

EXAMPLES = """\
  python -m driftscope.capture                       # embedded SmolLM2-135M on the CPU (~2 min)
  python -m driftscope.capture --paths fp32,fp16,sage8,sage8-nosmooth --lengths 512 --prompts 4
  python -m driftscope.capture --paths fp16,fp16 --lengths 64   # null drift: every distance is 0
  python -m driftscope.capture --model llama3-8b --device cuda --lengths 2048,8192 --decode 32
  python -m driftscope.capture --store q,k,attn_out --layers 0,15 --heads 0 --tokens 0:256
  python -m driftscope.capture --lengths 512 --out runs/a.h5    # its figures go to runs/a/
  python -m driftscope.capture --lengths 512 --out runs/a.h5 --resume   # continue it after a kill
"""


def build_parser() -> cli.Parser:
    p = cli.parser("driftscope capture", "Capture per-layer, per-head drift of 8-bit attention against a "
                   "reference path, in lockstep (propagated) and isolated mode, prefill and decode. Every option "
                   "is checked before the model loads or a file is written.", EXAMPLES)
    d = CaptureConfig()
    p.add_argument("--paths", type=cli.comma_list(), default=d.paths,
                   help=f"attention paths, comma-separated, the first is the reference; each of "
                        f"{', '.join(PATH_NAMES)}; compared paths once each (the reference may repeat: null drift)")
    p.add_argument("--sage-impl", default=d.sage_impl, choices=SAGE_IMPLS,
                   help="how the sage paths run: kernel (compiled, CUDA), interpret (the same Triton code under "
                        "Triton's interpreter on the CPU, slow; sets TRITON_INTERPRET=1 itself), emulate "
                        "(driftscope's PyTorch model, any device), or auto: kernel on CUDA, else emulate")
    p.add_argument("--mode", default=d.mode, choices=(*MODES, "both"), help="propagated: each path runs its own "
                   "forward in lockstep, drift accumulates; isolated: each layer's paths get the reference's q, k, v")
    p.add_argument("--lengths", type=cli.comma_list(int), default=d.lengths, help="prompt lengths in tokens")
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts per length, each from another document")
    p.add_argument("--decode", type=int, default=d.decode, help="greedy decode steps captured after each prompt")
    p.add_argument("--store", type=cli.comma_list(), default=d.store,
                   help=f"also write full float16 tensors of these sites: {', '.join(STORE_SITES)} "
                        f"(default: none, metrics only)")
    p.add_argument("--layers", type=cli.comma_list(int), help="layers whose tensors --store writes (default: all)")
    p.add_argument("--heads", type=cli.comma_list(int), default=None,
                   help="heads whose tensors --store writes: query heads for q and attn_out, KV heads for k and "
                        "v (default: all)")
    p.add_argument("--tokens", type=cli.token_range, default=None, metavar="START:STOP",
                   help="prefill token positions whose tensors --store writes, within the shortest prompt "
                        "(default: all)")
    cli.add_model_options(p, d, seed_help="orders the corpus documents prompts come from")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the run file; its figures go beside it, into FILE without its extension (runs/a.h5 -> "
                        "runs/a/), or FILE-figures/ when FILE has no extension (default: "
                        "runs/<model>-<paths>.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run file and its figures")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run file (same options)")
    p.add_argument("--no-figures", action="store_true", help="write no figures beside the run file")
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
    from driftscope import environment, store
    from driftscope.report import figures, text
    from driftscope.run.capture import default_out, run_capture

    out = Path(args.out) if args.out is not None else default_out(config)
    environment.check_output_file(out, overwrite=args.overwrite, resume=args.resume)  # before its figures' folder
    folder = None if args.no_figures else figures.figure_dir(out)
    made = figures.check_quick_figures(folder, overwrite=args.overwrite or args.resume) if folder else []
    out = run_capture(config, out=out, overwrite=args.overwrite, resume=args.resume,
                      argv=["python", "-m", "driftscope.capture", *(sys.argv[1:] if argv is None else argv)],
                      progress=not args.quiet)
    with store.open_run(out) as run:
        df = figures.metrics_with_meta(run)
    print(f"\nWorst head per layer, attention output vs {config.paths[0]} (cos: min cosine, relL2: max relative L2):")
    print(text.format_layer_summary(text.layer_summary(df)))
    if folder is not None and figures.quick_figures(df, folder):
        print(f"\nfigures: {folder}/")
    elif folder is not None:
        environment.remove_dirs(made)
    print(f"\nrun file: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope capture", main))
