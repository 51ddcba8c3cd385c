#!/usr/bin/env bash
# On the lent GPU machine, from the repository root: build the package against the machine's
# own torch (no downloads), then run the benchmarks, each writing its rows as they finish:
#   1. bench_gpu.py: kernels (stdout and $OUT/gpu_bench.json);
#   2. bench_memory.py on CUDA: the gradient stores' torch.cuda.max_memory_allocated above the
#      loaded model, on transformers CLIPModels shaped like open_clip ViT-L-14 and ViT-H-14 in
#      bf16 (the machine has transformers, not open_clip) ($OUT/memory.jsonl).
# `run.sh memory` runs stage 2 only, `run.sh kernels` stage 1 only.
set -euo pipefail
export PYTHONUNBUFFERED=1
stage=${1:-all}
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3
python3 -c "import torch, slug_fast._C; print('built slug_fast._C against torch', torch.__version__)"
if [ "$stage" = all ] || [ "$stage" = kernels ]; then
  python3 bench/gpu/bench_gpu.py
fi
if [ "$stage" = all ] || [ "$stage" = memory ]; then
  python3 bench/bench_memory.py --family hf --device cuda --models ViT-L-14,ViT-H-14 --dtypes bf16 \
    --modes full,chunked4,offload,budget0.5+ckpt --images 16 --jsonl "${OUT:-.}/memory.jsonl"
fi
