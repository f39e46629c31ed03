#!/usr/bin/env bash
# GPU check of 2026-11-26 (second session), one H200: generation with CUDA graphs and compile, and
# the 124M MFU by attention kernel and micro-batch. Needs the GPT-2 BPE files in .tiktoken/ (copy
# them there); TIKTOKEN_CACHE_DIR is forced, since the device machine sets its own.
export TIKTOKEN_CACHE_DIR=$PWD/.tiktoken PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch;print(torch.__version__)"
echo "== cuda generation tests"; timeout 90 python -m pytest -q -p no:cacheprovider tests/test_generate.py -k "cuda or cached_logits" 2>&1 | tail -3
echo "== generate"; timeout 150 python bench/generate.py 2>&1 | grep -v -i warn
speed() { echo "== $*"; timeout 110 python bench/speed.py configs/gpt2-124m.yaml train.grad_accum=1 "$@" --iters 20 --warmup 10 --log-every 10 2>&1 | tail -1; }
for attn in auto cudnn flash; do speed train.batch_size=32 train.attention=$attn; done
for batch in 64 96 128; do speed train.batch_size=$batch; done
# Tried and dropped: TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 and TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 at
# batch 64 did not finish compiling within 150 s and 170 s.
