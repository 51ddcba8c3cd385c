#!/usr/bin/env bash
# On the lent GPU machine, from the repository root: build the package against the machine's
# own torch (no downloads), then run the benchmark. Results: stdout and $OUT/gpu_bench.json.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3
python3 -c "import torch, slug_fast._C; print('built slug_fast._C against torch', torch.__version__)"
python3 bench/gpu/bench_gpu.py "$@"
