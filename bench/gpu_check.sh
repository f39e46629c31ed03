#!/usr/bin/env bash
# The session's GPU check (one H200, 2026-11-26): recipe sweeps, CUDA loader tests, the default run,
# 124M throughput/MFU, DDP/FSDP2 overhead, resume and fault guard on CUDA, generation. Needs
# TIKTOKEN_CACHE_DIR's files in .tiktoken/ (copy them there); writes sweep tables under $OUT (default /tmp).
OUT=${OUT:-/tmp}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.tiktoken} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch;print(torch.__version__)"
(python bench/sweep.py bench/sweeps/speedrun-candidates.yaml --parallel 13 > $OUT/race2.txt 2>&1; python bench/sweep.py bench/sweeps/classic-to-1.88.yaml --parallel 2 >> $OUT/race2.txt 2>&1) &
SW=$!
export OMP_NUM_THREADS=4
echo "== cuda tests"; timeout 60 python -m pytest -q -p no:cacheprovider tests/test_data_loader.py -k cuda 2>&1 | tail -2
wait $SW; cat $OUT/race2.txt
echo "== small.yaml on GPU"; timeout 60 python bench/small.py 2>&1 | tail -2
echo "== 124M classic, bf16, compile"; timeout 110 python bench/speed.py configs/gpt2-124m.yaml train.grad_accum=1 train.batch_size=32 --iters 20 --warmup 10 --log-every 10 2>&1 | tail -2
echo "== ddp/fsdp overhead"; timeout 90 python -m bench.ddp_overhead --iters 15 --warmup 3 2>&1 | tail -5
echo "== fault check"; timeout 50 python -m bench.fault_check --steps 20 2>&1 | tail -8
echo "== generate"; timeout 60 python bench/generate.py --tokens 500 2>&1 | tail -8
echo "== 124M modern, bf16, compile"; timeout 100 python bench/speed.py configs/modern-124m.yaml train.grad_accum=1 train.batch_size=32 --iters 20 --warmup 10 --log-every 10 2>&1 | tail -2
