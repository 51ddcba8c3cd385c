#!/usr/bin/env bash
# The lent GPU's one run, from the repository root, with that machine's own torch and Triton.
# Nothing is built: the benchmark needs only the Triton kernels, imported from this source tree
# (slug_fast declares its operators itself where the C++ extension is absent). Each stage runs
# under its own timeout, logs to $OUT/run.log and appends its rows to $OUT/gpu_bench.jsonl as
# they exist; a failed correctness check stops the run before any timing. Expected to take about
# 3 minutes on an H200 (not yet measured); the stage limits add up to 350 s
# (tripled in the smoke mode, whose interpreter is slow on a busy machine).
#   bash bench/gpu/run.sh            # every stage
#   bash bench/gpu/run.sh memory     # and then the gradient stores' memory on CUDA (4 minutes more)
#   SMOKE=1 bash bench/gpu/run.sh    # toy sizes on CPU tensors under Triton's interpreter (CI)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/bench/gpu/out}"
mkdir -p "$OUT"
log="$OUT/run.log"
bench=(python3 bench/gpu/bench_gpu.py)
[ "${SMOKE:-0}" = 1 ] && bench+=(--smoke)

stage() {  # stage NAME SECONDS COMMAND...: the command under a timeout, its output in the log
  local name=$1 limit=$2
  shift 2
  [ "${SMOKE:-0}" = 1 ] && limit=$((3 * limit))
  echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$log"
  return "$rc"
}

failed=0
stage versions 30 "${bench[@]}" --stage versions || exit 1
stage check 60 "${bench[@]}" --stage check || exit 1
stage bandwidth 30 "${bench[@]}" --stage bandwidth || failed=1
if [ "${SMOKE:-0}" = 1 ]; then
  stage sets 100 "${bench[@]}" --stage set || failed=1
else
  for set in ViT-B-32 ViT-H-14 LLaVA-1.5-7B; do
    stage "set $set" 50 "${bench[@]}" --stage set --sets "$set" || failed=1
  done
fi
stage big 45 "${bench[@]}" --stage big || failed=1
stage host 20 "${bench[@]}" --stage host || failed=1
stage table 15 "${bench[@]}" --stage table
if [ "${1:-}" = memory ]; then
  stage memory 240 python3 bench/bench_memory.py --family hf --device cuda --models ViT-L-14,ViT-H-14 \
    --dtypes bf16 --modes full,chunked4,offload,budget0.5+ckpt --images 16 --jsonl "$OUT/memory.jsonl" || failed=1
fi
exit "$failed"
