#!/usr/bin/env bash
# GPU check of 2026-11-26 (third session), part two: the fused loss's CUDA tests (compiled, bf16)
# with the other CUDA-only tests, and the modern 124M config's speed with it. Needs .tiktoken/.
export TIKTOKEN_CACHE_DIR=$PWD/.tiktoken PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== CUDA tests"; timeout 150 python -m pytest -q -p no:cacheprovider tests/test_loss.py tests/test_generate.py tests/test_data_loader.py -k "cuda" 2>&1 | tail -3
echo "== modern-124m"; timeout 150 python bench/speed.py configs/modern-124m.yaml train.grad_accum=1 train.batch_size=32 --iters 20 --warmup 10 --log-every 10 2>&1 | tail -1
