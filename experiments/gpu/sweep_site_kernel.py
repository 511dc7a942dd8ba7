"""The fused site kernel's launch shape on the GPU: GPU time of the site kernel alone (CUDA-graph replays) for one
layer's sites (Llama-3-8B shapes at 8k tokens, as the capture makes them) for TILE x WARPS x PROGRAMS x
MAX_ITERS.

    python experiments/gpu/sweep_site_kernel.py --out $OUT/sweep_site_kernel.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from driftscope.measure import fused  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    T, dev = args.tokens, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def act(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float16)

    q = act(2, T, 32, 128).transpose(1, 2)  # [B, H, T, D] views of [B, T, H, D], as the attention hook sees them
    k = act(2, T, 8, 128).transpose(1, 2)
    v = act(2, T, 8, 128).transpose(1, 2)
    o = act(2, 32, T, 128)
    resid = act(2, T, 4096)
    logits = act(2, T, 128256)
    layer = [("q", q[1], q[0], dict(stats_of=("ref", "x"))), ("k", k[1], k[0], dict(stats_of=("ref", "x"))),
             ("v", v[1], v[0], dict(stats_of=("ref", "x"))),
             ("attn_out", o[1], o[0], dict(stats_of=("ref", "x"), positions=True, nonfinite=True)),
             ("resid", resid[1], resid[0], dict(stats_of=("ref", "x"), positions=True))]
    bytes_layer = sum(x.numel() * 2 * 2 for _, x, _, _ in layer)
    results = []
    for tile, warps, programs, max_iters in itertools.product((256, 512, 1024, 2048), (1, 2, 4), (512, 2048), (16, 64)):
        fused.TILE, fused.WARPS, fused.PROGRAMS, fused.MAX_ITERS = tile, warps, programs, max_iters
        row = {"tile": tile, "warps": warps, "programs": programs, "max_iters": max_iters}
        for name, x, r, kw in layer + [("logits", logits[1], logits[0], {})]:
            want = "x" in kw.get("stats_of", ()), "ref" in kw.get("stats_of", ())
            x, r = (x, r) if x.dim() == 3 else (x[None], r[None])
            launch = lambda: fused._triton_partials(x, r, *want, kw.get("positions", False))  # noqa: E731
            launch()  # compile
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()  # the kernel alone: 10 launches replayed without the host
            with torch.cuda.graph(graph):
                for _ in range(10):
                    launch()
            graph.replay()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(3):
                graph.replay()
            b.record()
            torch.cuda.synchronize()
            row[name] = a.elapsed_time(b) / 30
            del graph
        row["layer_ms"] = sum(row[n] for n, *_ in layer)
        row["layer_GBps"] = bytes_layer / row["layer_ms"] / 1e6
        row["logits_GBps"] = logits[0].numel() * 4 / row["logits"] / 1e6
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        results.append(row)
    best = min(results, key=lambda r: r["layer_ms"] * 32 + r["logits"])
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": T, "results": results,
                                          "best": best}, indent=1))
    print("best", best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
