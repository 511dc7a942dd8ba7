#!/usr/bin/env bash
# Every GPU benchmark of DESIGN §8, in sequence, into one folder (default $OUT, else experiments/results).
#
#   bash experiments/gpu_bench.sh [DIR] [PART ...]      PART: throughput overhead storage wrapper (default: all)
#
# Expected on one H100: throughput ~4 min, overhead ~2-3 min, storage ~1 min, wrapper ~1 min; all four in
# one call come close to a 10-minute limit, so split them over two calls:
#   bash experiments/gpu_bench.sh "$OUT" throughput
#   bash experiments/gpu_bench.sh "$OUT" overhead storage wrapper
# Writes bench_throughput.{json,png}, bench_capture_overhead.{json,png}, bench_storage.{json,png},
# bench_wrapper.json and gpu_bench.log (8 files at most). A part that fails or times out is logged and the next
# one runs. If sageattention is not importable and .whl/ holds the wheels (see ../shared/GPU.md), they are
# installed into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
DIR="${1:-${OUT:-experiments/results}}"
shift || true
PARTS="${*:-throughput overhead storage wrapper}"
mkdir -p "$DIR"
LOG="$DIR/gpu_bench.log"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import sageattention" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# driftscope itself: installed, or this checkout (driftscope/__init__.py finds hooks/ beside it)
export PYTHONUNBUFFERED=1

run() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, sys.version.split()[0])"
} | tee -a "$LOG"

for part in $PARTS; do
  case "$part" in
    throughput) run throughput 420 "$PY" -m driftscope.bench --out-dir "$DIR" ;;
    overhead)   run overhead 300 "$PY" experiments/bench_capture_overhead.py --out-dir "$DIR" ;;
    storage)    run storage 180 "$PY" experiments/bench_storage.py --out-dir "$DIR" ;;
    wrapper)    run wrapper 150 "$PY" experiments/bench_wrapper.py --out-dir "$DIR" ;;
    *) echo "unknown part $part (expected throughput, overhead, storage, wrapper)" | tee -a "$LOG" ;;
  esac
done
ls -la "$DIR" | tee -a "$LOG"
