#!/usr/bin/env bash
# GPU session (H100): logits, perplexity and generations of the embedded model, fp16 SDPA vs the compiled sage8.
. experiments/gpu/setup.sh
python3 -m driftscope.evaluate --device cuda --quant-attention 8bit --contexts 512,2048,8192 --windows 20 \
  --generate 8,64 --quiet --out $OUT/smollm2-135m-h100-evaluate.h5 2>&1 | tail -60
