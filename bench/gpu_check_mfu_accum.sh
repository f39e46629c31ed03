#!/usr/bin/env bash
# GPU check of 2026-11-26 (third session): the 124M MFU as configs/gpt2-124m.yaml runs it, with
# gradient accumulation (the optimizer step, gradient clipping and zero_grad amortised over the
# micro-batches), against one micro-batch per step. Needs the GPT-2 BPE files in .tiktoken/.
export TIKTOKEN_CACHE_DIR=$PWD/.tiktoken PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch;print(torch.__version__)"
speed() { echo "== $*"; timeout 150 python bench/speed.py configs/gpt2-124m.yaml "$@" 2>&1 | tail -1; }
speed --iters 12 --warmup 4 --log-every 2                                  # as configured: 64 x accum 8
speed train.grad_accum=1 --iters 40 --warmup 10 --log-every 10             # 64 x accum 1 (last session: 44.5%)
speed train.batch_size=32 train.grad_accum=16 --iters 8 --warmup 4 --log-every 2
