#!/usr/bin/env bash
# GPU session (H100): CUDA tests and the committed captures of the embedded model with the compiled kernel.
# Writes everything under $OUT. Needs the embedded model's wheel halves (../shared/GPU.md).
. experiments/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_capture.py 2>&1 | tail -5 | tee $OUT/pytest_cuda_capture.log
python3 -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage8-nosmooth --mode both \
  --lengths 2048 --prompts 4 --decode 32 --no-figures --quiet --out $OUT/smollm2-135m-h100-2048.h5 2>&1 | tail -36
python3 -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage8-nosmooth --mode both \
  --lengths 8184 --prompts 2 --decode 8 --no-figures --quiet --out $OUT/smollm2-135m-h100-8184.h5 2>&1 | tail -3
ls -la $OUT
