#!/usr/bin/env bash
# GPU session 1 (H100): CUDA tests, emulator/interpreter fidelity against the compiled kernel, and the
# committed capture of the embedded model. Writes everything under $OUT.
. experiments/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_paths.py tests/test_capture.py 2>&1 | tail -15 | tee $OUT/pytest_cuda.log
python3 experiments/gpu_fidelity.py --out $OUT/gpu_fidelity.json 2>&1 | tail -25
python3 -m driftscope.capture --device cuda --paths fp16,fp32,sage8,sage8-nosmooth --mode both \
  --lengths 2048 --prompts 4 --decode 32 --no-figures --quiet --out $OUT/smollm2-135m-h100-2048.h5 2>&1 | tail -45
ls -la $OUT
