"""What sampling changes in the smoothing-K statistics (driftscope.measure.smoothing) on a long real prompt.

Beyond 2,048 tokens smoothing_stats reads 32 evenly spaced 64-token K blocks (key_sample) and, for the scores, the
query rows that the score budget allows (score_rows: 64 rows against 2,048 keys). This runs the embedded model on
the CPU (fp32: bf16 matmuls are slow there) over one corpus prompt of --tokens, keeps every layer's post-RoPE q, k
(cast to fp16, what the kernel gets on the GPU), and per layer calls
  sampled    smoothing_stats(q, k), as the tap does (defaults)
  keys_only  all K tokens, the sampled number of query rows: sampled vs keys_only is the key sampling's part
  full       all K tokens and --ref-rows evenly spaced query rows, score budget lifted: the reference
All T query rows would take ~9 x T^2 x 4 bytes per score matrix (2.4 GB at 8,192 tokens, ~4 of them live);
--ref-rows 3072 keeps the reference under ~4 GB. channel_bias always uses all of K (all three agree).
Rows: one per (layer, metric, variant): mean over KV heads of each call, and |sampled - full| / |full| of those
means (rel_diff) and the worst KV head's (rel_diff_max_head). Summary: max and median rel_diff per metric and
variant; wall seconds of each call per layer.

    python experiments/smoothing_sample_error.py                                  # 8,192 tokens, ~25 min on 2 cores
    python experiments/smoothing_sample_error.py --tokens 4096 --out /tmp/sse.json
"""
from __future__ import annotations

import argparse
import functools
import resource
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from driftscope import corpus  # noqa: E402
from driftscope.errors import CorpusError  # noqa: E402
from driftscope.measure import smoothing  # noqa: E402
from driftscope.run import benchkit as bt  # noqa: E402
from model_fidelity import capture_qkv  # noqa: E402  (a sibling script)

METRICS = ("channel_bias", "k_quant_err", "qk_quant_err")


def prompt(text: corpus.Corpus, tokenizer, tokens: int) -> tuple[torch.Tensor, str]:
    """One prompt of `tokens` from a single document, else a window of the concatenated corpus."""
    try:
        ids, source = corpus.prompts(text, tokenizer, tokens, 1)[0]
    except CorpusError as e:
        bt.log(f"no single document of {tokens} tokens ({e}); using the concatenated corpus")
        ids, source = corpus.windows(text, tokenizer, tokens, 1)[0], "concatenated corpus@0"
    return torch.from_numpy(ids), source


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs().clamp_min(1e-300)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ref-rows", type=int, default=3072, help="query rows of the full reference (capped at T)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="model dtype of the forward")
    ap.add_argument("--stats-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                    help="dtype of the q, k handed to smoothing_stats (default: the kernel's on the GPU)")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/smoothing_sample_error.json"))
    args = ap.parse_args(argv)
    from driftscope.models import load_model

    model, tokenizer, info = load_model(args.model, dtype=args.dtype, device="cpu")
    ids_T, source = prompt(corpus.load_corpus(), tokenizer, args.tokens)
    qk, forward_s = timed(lambda: capture_qkv(model, ids_T, None))
    bt.log(f"prefill of {len(ids_T)} tokens ({source}): {forward_s:.1f} s, {len(qk)} layers")
    del model

    lifted = functools.partial(smoothing.score_rows, budget=1 << 62)  # rows = `rows`, whatever the keys
    rows, timings, sizes = [], [], {}
    for layer, (q, k, _v, scale) in sorted(qk.items()):
        q_HxTxD, k_HxTxD = (x[0].to(getattr(torch, args.stats_dtype)) for x in (q, k))
        T = q_HxTxD.shape[1]
        sampled, t_s = timed(lambda: smoothing.smoothing_stats(q_HxTxD, k_HxTxD, scale=scale))
        r_s = int(sampled[("qk_rows", None)][0])
        with mock.patch.object(smoothing, "score_rows", lifted):
            keys_only, t_k = timed(lambda: smoothing.smoothing_stats(q_HxTxD, k_HxTxD, rows=r_s, scale=scale,
                                                                     key_blocks=10**9))
            full, t_f = timed(lambda: smoothing.smoothing_stats(q_HxTxD, k_HxTxD, rows=min(T, args.ref_rows),
                                                                scale=scale, key_blocks=10**9))
        sizes = {name: {"k_tokens": int(s[("k_tokens", None)][0]), "qk_rows": int(s[("qk_rows", None)][0])}
                 for name, s in (("sampled", sampled), ("keys_only", keys_only), ("full", full))}
        timings.append({"layer": layer, "sampled_s": t_s, "keys_only_s": t_k, "full_s": t_f})
        for key, ref in full.items():
            if key[0] not in METRICS:
                continue
            s, ko = sampled[key], keys_only[key]
            rows.append({"layer": layer, "metric": key[0], "variant": key[1], "full": ref.mean().item(),
                         "sampled": s.mean().item(), "keys_only": ko.mean().item(),
                         "rel_diff": rel(s.mean(), ref.mean()).item(),
                         "rel_diff_keys_only": rel(ko.mean(), ref.mean()).item(),
                         "rel_diff_max_head": rel(s, ref).max().item()})
        worst = max(r["rel_diff"] for r in rows if r["layer"] == layer)
        bt.log(f"layer {layer:2d}: worst rel diff {100 * worst:.2f}%; sampled {t_s:.2f} s, full {t_f:.1f} s")

    summary = {}
    for metric in METRICS:
        for variant in sorted({r["variant"] for r in rows if r["metric"] == metric}, key=str):
            mine = [r for r in rows if r["metric"] == metric and r["variant"] == variant]
            worst = max(mine, key=lambda r: r["rel_diff"])
            name = f"{metric}/{variant}" if variant else metric
            summary[name] = {
                "max_rel_diff": worst["rel_diff"], "worst_layer": worst["layer"],
                "median_rel_diff": statistics.median(r["rel_diff"] for r in mine),
                "max_rel_diff_max_head": max(r["rel_diff_max_head"] for r in mine),
                "max_rel_diff_keys_only": max(r["rel_diff_keys_only"] for r in mine),
                "median_rel_diff_keys_only": statistics.median(r["rel_diff_keys_only"] for r in mine)}
            bt.log(f"{name:<28} max {100 * worst['rel_diff']:.2f}% (layer {worst['layer']}), "
                   f"median {100 * summary[name]['median_rel_diff']:.2f}%")
    for name in ("sampled_s", "keys_only_s", "full_s"):
        summary[f"{name[:-2]}_seconds"] = {"median_per_layer": statistics.median(t[name] for t in timings),
                                           "total": sum(t[name] for t in timings)}
    result = {"benchmark": "smoothing_sample_error",
              "argv": ["python", "experiments/smoothing_sample_error.py", *(argv or sys.argv[1:])],
              "method": __doc__.split("\n\n")[0] + "\n" + __doc__.split("\n\n")[1].strip(),
              "machine": bt.machine("cpu"), "versions": bt.versions(), "model": info.as_dict(),
              "tokens": len(ids_T), "prompt_source": source, "forward_dtype": args.dtype, "stats_dtype": args.stats_dtype,
              "sample_sizes": sizes, "key_blocks": smoothing.KEY_BLOCKS, "score_budget": smoothing.SCORE_BUDGET,
              "ref_rows_note": f"reference on {sizes['full']['qk_rows']} of {len(ids_T)} query rows (all keys): "
                               "all rows would need ~4 fp32 score matrices of 9 x T x T live",
              "forward_seconds": forward_s,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "summary": summary, "timings": timings, "rows": rows}
    bt.log(f"-> {bt.write_json(result, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(bt.run_script(main, "smoothing_sample_error.py"))
