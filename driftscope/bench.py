"""`python -m driftscope.bench`: prefill and decode tokens/s and peak memory of fp16 (SDPA) vs sage8 (kernel).

Writes `bench_throughput.json` (records, ratios measured in this run, card, versions, argv) and
`bench_throughput.png` into --out-dir. The library is `driftscope.run.throughput`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from driftscope import cli

EXAMPLES = """\
  python -m driftscope.bench                  # Llama-3-8B shape + embedded model (~4 min, H100)
  python -m driftscope.bench --models llama3-8b-shape --prefill 1024,8192 --repeats 5
  python -m driftscope.bench --models smollm2-135m --paths fp16,sage8,sage8-nosmooth --out-dir b
  python -m driftscope.bench --device cpu --smoke --out-dir /tmp/b   # tiny model, CPU: plumbing
"""

SMOKE = dict(models=("tiny-llama",), prefill=(64, 128), decode=(64,), decode_steps=2, warmup=1, repeats=1)


def build_parser() -> cli.Parser:
    from driftscope.run.throughput import DECODE_LENGTHS, MODELS, PREFILL_LENGTHS, ThroughputConfig

    d = ThroughputConfig()
    p = cli.parser("driftscope bench", "Measure prefill and decode tokens/s and peak GPU memory per attention "
                   "path (fp16 = transformers' SDPA, sage8 = SageAttention 1.0.6's kernel through driftscope), "
                   "on random weights of Llama-3-8B's shape and on the embedded model. Needs CUDA.", EXAMPLES)
    p.add_argument("--models", type=cli.comma_list(), default=None,
                   help=f"comma list of random-weight shapes (llama3-8b-shape, tiny-llama) or driftscope model names "
                        f"(default {','.join(MODELS)}; with --smoke tiny-llama)")
    p.add_argument("--paths", type=cli.comma_list(), default=d.paths,
                   help="comma list; the first is the baseline of the ratios (default fp16,sage8)")
    p.add_argument("--prefill", type=cli.comma_list(int), default=None,
                   help=f"prompt lengths (default {','.join(map(str, PREFILL_LENGTHS))})")
    p.add_argument("--decode", type=cli.comma_list(int), default=None,
                   help=f"KV-cache lengths for decode (default {','.join(map(str, DECODE_LENGTHS))})")
    p.add_argument("--decode-steps", type=int, default=None, help=f"timed decode steps (default {d.decode_steps})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed calls first (default {d.warmup})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls, median reported (default {d.repeats})")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N, or cpu with --smoke (default: cuda)")
    p.add_argument("--sage-impl", default=None, choices=("kernel", "emulate"),
                   help="kernel (default on CUDA) or emulate (default on the CPU)")
    p.add_argument("--dtype", default=d.dtype, choices=("float16", "bfloat16"), help="model dtype (default float16)")
    p.add_argument("--smoke", action="store_true", help="tiny model and lengths (a seconds-long plumbing check)")
    p.add_argument("--out-dir", default="experiments/results", metavar="DIR", help="where the JSON and PNG go")
    p.add_argument("--overwrite", action="store_true", help="replace a bench_throughput.json/.png already there")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from driftscope import environment
    from driftscope.errors import ConfigError, OutputExistsError
    from driftscope.run import benchkit as bt
    from driftscope.run.throughput import ThroughputConfig, plot_throughput, run_throughput

    cpu = args.device == "cpu"
    if cpu and not args.smoke:
        raise ConfigError("--device cpu is only for plumbing checks; add --smoke (tiny model and lengths)")
    if not cpu:
        if not args.device.startswith("cuda"):
            raise ConfigError(f"unknown --device {args.device!r}; expected cuda, cuda:N, or cpu with --smoke")
        bt.require_cuda("python -m driftscope.bench")
        environment.resolve_device(args.device)  # cuda:N exists
    given = {k: v for k, v in dict(models=args.models, paths=args.paths, prefill=args.prefill, decode=args.decode,
                                   decode_steps=args.decode_steps, warmup=args.warmup, repeats=args.repeats).items()
             if v is not None}
    base = dict(SMOKE) if args.smoke else {}
    config = ThroughputConfig(**{**base, **given, "device": args.device, "dtype": args.dtype,
                                 "sage_impl": args.sage_impl or ("emulate" if cpu else "kernel")})
    environment.check_sage_impl(config.sage_impl, args.device, [p for p in config.paths if p.startswith("sage")])
    full_argv = ["python", "-m", "driftscope.bench", *(sys.argv[1:] if argv is None else argv)]
    out_dir = Path(args.out_dir)
    json_path, png = out_dir / "bench_throughput.json", out_dir / "bench_throughput.png"
    environment.check_output_dir(out_dir, what=f"{json_path}")
    existing = [p.name for p in (json_path, png) if p.exists() and (p == json_path or not args.no_figure)]
    if existing and not args.overwrite:
        raise OutputExistsError(f"{out_dir}/ already holds {' and '.join(existing)}; pass --overwrite to replace "
                                f"them, or choose another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_throughput(config, argv=full_argv, checkpoint=lambda partial: bt.write_json(partial, json_path))
    path = bt.write_json(result, json_path)
    print("\n".join(["", f"card: {result['machine']['device_name']}", *result["summary"]]), flush=True)
    if not args.no_figure:
        import pandas as pd

        plot_throughput(pd.DataFrame(result["records"]), save_to=png, baseline=config.paths[0],
                        title=f"{' vs '.join(config.paths)} on {result['machine']['device_name']}")
        print(f"figure: {png}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("driftscope bench", main))
