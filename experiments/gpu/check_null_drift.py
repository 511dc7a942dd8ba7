"""Null drift on the GPU without the embedded model: random weights of a small Llama, lockstep fp16, fp16, sage8
(compiled), prefill and decode, every statistic: the duplicate fp16 row must show exactly cosine 1 and 0 drift.

    python experiments/gpu/check_null_drift.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from driftscope import paths  # noqa: E402
from driftscope.measure.records import Context, Records  # noqa: E402
from driftscope.run import benchkit as bt  # noqa: E402
from driftscope.run.tap import Tap, run_prompt  # noqa: E402

DRIFT = ("cosine", "rel_l2", "rel_l1", "rmse", "max_abs")
model = bt.random_model("tiny-llama", torch.float16, "cuda")
pf = [paths.get_path(p, "kernel", device="cuda") for p in ("fp16", "fp16", "sage8")]
for mode in ("propagated", "isolated"):
    rec = Records(context=Context(prompt=0, length=300, mode=mode))
    run_prompt(model, torch.randint(1000, (300,), device="cuda"), Tap(pf, mode, rec, with_stats=True), 3)
    c = rec.columns()
    null = np.isin(c["metric"], DRIFT) & (c["path"] == "fp16")
    bad = null & ~np.where(c["metric"] == "cosine", c["value"] == 1.0, c["value"] == 0.0)
    sage = (c["path"] == "sage8") & (c["metric"] == "rel_l2") & (c["site"] == "attn_out") & (c["head_index"] == -1)
    nf = c["value"][c["metric"] == "nonfinite"]
    print(f"{mode}: {null.sum()} null-drift rows, {bad.sum()} not exact; sites {sorted(set(c['site'][null]))}, "
          f"phases {sorted(set(c['phase'][null]))}; sage8 attn_out rel_l2 {c['value'][sage].min():.3g}.."
          f"{c['value'][sage].max():.3g}; nonfinite rows {nf.size} (sum {nf.sum()})")
    assert null.sum() > 0 and bad.sum() == 0 and (c["value"][sage] > 1e-4).all() and nf.sum() == 0
print("ok")
