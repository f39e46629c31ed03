#!/usr/bin/env bash
# GPU check of 2026-11-26 (third session), one H200: the 124M MFU with the fused head + loss
# (model/loss.py) against the code before it, alternating, then as configs/gpt2-124m.yaml runs it.
# Needs the GPT-2 BPE files in .tiktoken/ and the previous commit exported to .baseline/
# (git archive 5353803 | tar -x -C .baseline).
export TIKTOKEN_CACHE_DIR=$PWD/.tiktoken PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch;print(torch.__version__)"
here=$PWD
speed() { local dir=$1; shift; echo "== $dir $*"; (cd $dir && timeout 150 python bench/speed.py configs/gpt2-124m.yaml "$@" 2>&1 | tail -1); }
one=(train.grad_accum=1 --iters 40 --warmup 10 --log-every 10)
speed .baseline "${one[@]}"; speed $here "${one[@]}"; speed $here "${one[@]}"; speed .baseline "${one[@]}"
speed $here --iters 12 --warmup 4 --log-every 2   # as configured: micro-batch 64 x grad_accum 8
