#!/bin/bash
# The CUDA paths of data parallelism on one GPU, in a minute or two plus compile time:
# DDP/FSDP2 wrapping overhead (bench/ddp_overhead.py), a one-process FSDP2 run with activation
# checkpointing, a torchrun DDP run (NCCL), resuming the FSDP2 checkpoint in a plain process,
# and sampling from it. Run from the repository root: bash bench/dist_gpu_check.sh
set -u
export OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { tr '\r' '\n' | grep -v "it/s" | tail -"$1"; }
T="model.n_layer=2 model.n_head=2 model.n_embd=64 model.block_size=64 train.batch_size=8 train.max_iters=20
   train.eval_interval=10 train.eval_batches=2 train.log_interval=5 optim.decay_iters=40 data.prepared_dir=/tmp/dist-check/prep"
echo "== overhead, eager"; timeout 120 python -m bench.ddp_overhead --iters 30 --warmup 5 2>&1 | tail -5
echo "== fsdp, one process, activation checkpointing"
timeout 120 python train.py configs/small.yaml $T out_dir=/tmp/dist-check/f1 overwrite=true train.parallel=fsdp \
    train.activation_checkpointing=true 2>&1 | quiet 4
echo "== ddp under torchrun (NCCL)"
timeout 120 python -m torch.distributed.run --standalone --nproc_per_node=1 train.py configs/small.yaml $T \
    out_dir=/tmp/dist-check/d1 overwrite=true train.parallel=ddp train.tokens_per_step=1024 2>&1 | quiet 3
echo "== resume the fsdp checkpoint in a plain process"
timeout 90 python train.py configs/small.yaml $T out_dir=/tmp/dist-check/f1 train.activation_checkpointing=true \
    train.max_iters=30 resume=true 2>&1 | quiet 3
echo "== sample from it"; timeout 60 python sample.py --ckpt /tmp/dist-check/f1 --max-new-tokens 40 2>&1 | tail -3
echo "== overhead, compiled"; timeout 150 python -m bench.ddp_overhead --iters 30 --warmup 5 --compile 2>&1 | tail -5
