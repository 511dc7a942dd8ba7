#!/usr/bin/env bash
# H100: the CUDA capture test (null drift with the compiled kernel in place), then the capture-overhead benchmark.
. experiments/gpu/setup.sh
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_capture.py 2>&1 | grep -v "Converting\|^driftscope: converting" | tail -40 | tee $OUT/gpu_pytest_capture.log
bash experiments/gpu_bench.sh "$OUT" overhead 2>&1 | grep -v "^\[" | tail -20
