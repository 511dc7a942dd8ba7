#!/usr/bin/env bash
# 2-GPU machine: `--device-map balanced` (accelerate) spreads the embedded model's layers over both GPUs and the
# capture, with the compiled kernel on each layer's own GPU, still works.
. experiments/gpu/setup.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee $OUT/gpus.txt
python3 -m driftscope.capture --device cuda --device-map balanced --paths fp16,fp16,sage8 --mode both \
  --lengths 1024 --prompts 1 --decode 4 --no-figures --quiet --out $OUT/smollm2-135m-2xh100-device-map.h5 2>&1 | tail -4
python3 - <<'PY' | tee $OUT/device_map_check.txt
import driftscope as ds, os
run = ds.open_run(os.environ["OUT"] + "/smollm2-135m-2xh100-device-map.h5")
df = run.metrics()
print("device_map:", run.environment.get("device_map"), "sage_impl:", run.environment["sage_impl"])
null = df[(df["path"] == "fp16") & df["metric"].isin(["rel_l2", "max_abs"])]
print("null drift rows:", len(null), "all exactly zero:", bool((null["value"] == 0).all()))
sage = df[(df["path"] == "sage8") & (df["site"] == "attn_out") & (df["metric"] == "rel_l2") & (df["head"] == -1)]
print("sage8 attn_out rel-L2 per layer (isolated prefill):",
      sage[(sage["mode"] == "isolated") & (sage["phase"] == "prefill")].sort_values("layer")["value"].round(4).tolist())
PY
