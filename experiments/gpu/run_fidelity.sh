#!/usr/bin/env bash
# GPU session (H100): the fidelity grid against the compiled kernel. The interpreter's outputs were computed on
# the CPU with triton 3.9 (`python experiments/gpu_fidelity.py --save-interpret .fid/interpret_outputs.npz`) and
# carried here, since the GPU machine's triton 3.6 interpreter fails on these kernels; inputs are checked by hash.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
set +e
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_paths.py 2>&1 | tail -8 | tee $OUT/pytest_cuda_paths.log
python3 experiments/gpu_fidelity.py --interpret-from .fid/interpret_outputs.npz --out $OUT/gpu_fidelity.json 2>&1 | tail -40
