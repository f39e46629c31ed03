#!/usr/bin/env bash
# Issue 18's GPU items in one call of about 9 minutes on one H100/H200 (prepared 2026-12-02 on a
# CPU machine; not yet run): the CUDA tests, configs/gpt2-124m.yaml's MFU as configured and at two
# micro-batches, configs/shakespeare-gpu.yaml's whole run (nanoGPT's baby GPT: val <= 1.47, with
# its time), and generation (KV cache, CUDA graph, compile). Every figure goes to bench/RESULTS.md
# with the card and the date. Needs the GPT-2 BPE files in .tiktoken/ (copy them there);
# TIKTOKEN_CACHE_DIR is forced, since the device machine sets its own.
export TIKTOKEN_CACHE_DIR=$PWD/.tiktoken PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch; print(torch.__version__)"
echo "== CUDA tests"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_loss.py tests/test_data_loader.py \
    -k "cuda or graph" 2>&1 | tail -3
speed() { echo "== 124M: $*"; timeout 100 python bench/speed.py configs/gpt2-124m.yaml train.grad_accum=1 "$@" \
    --iters 20 --warmup 10 --log-every 10 2>&1 | tail -1; }
speed train.batch_size=32
speed train.batch_size=64
echo "== shakespeare-gpu, the whole command"
/usr/bin/time -f "%e s wall" timeout 330 python train.py configs/shakespeare-gpu.yaml out_dir=$OUT/shakespeare-gpu \
    overwrite=true 2>&1 | grep -E "^iter [0-9]+: train|^done|s wall" | tail -6
echo "== generation"
timeout 120 python bench/generate.py --tokens 1000 2>&1 | grep -v -i warn
