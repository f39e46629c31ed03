"""Data parallelism under torchrun: process group, model wrapping, batch arithmetic, and
checkpoint state that does not depend on the world size.

Design decisions:
- One code path for 1..N processes. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
  MASTER_PORT; without them a run is one process, and `parallel: ddp|fsdp` then gets a
  one-process group (in-memory store), so the wrapped model can be measured on one GPU
  (bench/ddp_overhead.py) and a config runs unchanged with or without torchrun.
- NCCL on CUDA (each process on cuda:LOCAL_RANK), gloo on CPU. Every collective has a timeout
  (`train.dist_timeout_s`): a rank that stops answering ends the job with an error, never a
  hang. A rank that dies is noticed sooner: torchrun stops the others (SIGTERM) and reports the
  first failure; the survivors cannot agree with it (below), say so and exit without saving.
- Decisions that depend on a rank's own clock or signals (stop on a signal, stop at
  `train.max_time`, a time-based checkpoint) are agreed every step by a one-float-per-flag
  all-reduce on a CPU (gloo) group, so it never waits on the GPU's queue; on CPU that group is
  the default one. A signalled job thus saves the same step on every rank, within the grace
  that torchrun (`--shutdown-timeout`, 30 s by default) or the scheduler allows.
- `parallel: ddp` wraps the model in DistributedDataParallel. `parallel: fsdp` applies FSDP2's
  `fully_shard` to each block, then to the root (torchtitan's layout), sharding parameters,
  gradients and optimizer state; on GPU its policy computes in the run's low-precision dtype
  and reduces gradients in fp32. Activation checkpointing, when asked for, wraps each block.
  The blocks are whatever the model family names as its units (model/base.py).
- Gradient accumulation communicates once per optimizer step: DDP's `no_sync`, FSDP2's
  `set_requires_gradient_sync(False)` on the other micro-steps (FSDP2 then keeps unsharded
  gradients until the last micro-step: memory traded for communication).
- Checkpoints hold full, unsharded CPU tensors keyed by parameter name, for model and
  optimizer alike (`get_*_state_dict(full_state_dict=True, cpu_offload=True)`), in every mode.
  So any checkpoint resumes under any `parallel` mode and world size, and `sample.py` loads it
  in one process. The price is one full copy in rank 0's host memory while saving; a model
  beyond that needs torch.distributed.checkpoint's sharded files instead.
- Only rank 0 talks and writes: the other ranks' stdout goes to /dev/null (stderr stays, so
  their errors are seen), and they keep no metrics file and write no checkpoint.
- Muon under FSDP gathers each matrix's update for Newton-Schulz, which needs whole matrices,
  and keeps this rank's rows of the result (trainer/muon.py): the same update as under DDP.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.checkpoint import LATEST, load_checkpoint
from common.errors import UserError
from trainer.rundir import claim_out_dir


@dataclass(frozen=True)
class Dist:
    parallel: str = "none"  # none | ddp | fsdp
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control: object = None  # the CPU process group for agreements (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"


@dataclass(frozen=True)
class BatchPlan:
    """Tokens per optimizer step = micro_batch × block_size × grad_accum × world_size."""
    micro_batch: int  # sequences per rank per micro-step
    block_size: int
    grad_accum: int
    world_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.block_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        def n(count, noun):
            return f"{count} {noun}{'s' if count != 1 else ''}"
        return (f"{n(self.micro_batch, 'sequence')} × {self.block_size} tokens × "
                f"{n(self.grad_accum, 'micro-step')} × {n(self.world_size, 'rank')} = "
                f"{self.tokens_per_step:,} tokens/step")


def plan_batches(train_cfg, block_size: int, world_size: int) -> BatchPlan:
    """Derive gradient accumulation from `train.tokens_per_step` (when set) and the world size;
    a total that the micro-batches cannot make up exactly is an error, never rounded."""
    if not train_cfg.tokens_per_step:
        return BatchPlan(train_cfg.batch_size, block_size, train_cfg.grad_accum, world_size)
    per_micro_step = train_cfg.batch_size * block_size * world_size
    accum, rest = divmod(train_cfg.tokens_per_step, per_micro_step)
    if rest or not accum:
        near = max(round(train_cfg.tokens_per_step / per_micro_step), 1) * per_micro_step
        raise UserError(f"train.tokens_per_step={train_cfg.tokens_per_step} is not a multiple of train.batch_size × "
                        f"model.block_size × world size = {train_cfg.batch_size} × {block_size} × {world_size} = "
                        f"{per_micro_step}; the nearest that is: {near}")
    return BatchPlan(train_cfg.batch_size, block_size, accum, world_size)


def init_distributed(train_cfg, rt) -> Dist:
    """Join the process group that torchrun describes (or make a one-process one); point
    `rt.device` at this process's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if train_cfg.parallel == "none":
        if world > 1:
            raise UserError(f"launched as {world} processes but train.parallel=none; "
                            f"set train.parallel=ddp or train.parallel=fsdp")
        return Dist()
    if rt.device.type not in ("cuda", "cpu"):
        raise UserError(f"train.parallel={train_cfg.parallel} runs on cuda (NCCL) or cpu (gloo), not {rt.device.type}")
    if train_cfg.parallel == "fsdp" and rt.dtype == torch.float16:
        raise UserError("train.parallel=fsdp does not support float16 (it would need a sharded gradient scaler); "
                        "use train.dtype=bfloat16 or float32")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=train_cfg.dist_timeout_s)
    cuda = rt.device.type == "cuda"
    if cuda:
        rt.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(rt.device)
    # device_id binds NCCL to this process's GPU at once (no guessing it from the rank later).
    group = dict(backend="nccl" if cuda else "gloo", timeout=timeout, device_id=rt.device if cuda else None)
    if "RANK" in os.environ:
        dist.init_process_group(**group)
    else:
        dist.init_process_group(**group, store=dist.HashStore(), rank=0, world_size=1)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    control = dist.new_group(backend="gloo", timeout=timeout) if cuda else None  # None: the default (gloo) group
    return Dist(train_cfg.parallel, rank, local_rank, world, control)


def shutdown(d: Dist):
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def open_out_dir(cfg, d: Dist) -> dict | None:
    """Rank 0 claims out_dir (which may delete an old run); then the other ranks read the
    checkpoint to resume from (multi-node: out_dir must be on a shared filesystem)."""
    ckpt = claim_out_dir(cfg) if d.is_main else None
    barrier(d)
    if not d.is_main and cfg.resume:
        ckpt = load_checkpoint(Path(cfg.out_dir) / LATEST)
    return ckpt


def seed_rank_streams(d: Dist, seed: int, step: int):
    """Give each rank its own dropout stream once the weights are initialised (identically, as
    FSDP needs) or restored. One process keeps the stream it has (restored exactly on resume);
    with several, the stream after a resume is a function of (seed, rank, step)."""
    if d.world_size > 1:
        torch.manual_seed(hash((seed, d.rank, step)) % 2**63)


class NullLog:
    """The metrics log of ranks other than 0."""

    def write(self, **fields):
        pass

    def close(self):
        pass


def main_first(d: Dist, fn, *args, **kwargs):
    """Run fn on rank 0, then on the other ranks (fn writes shared files, e.g. data prep)."""
    if d.is_main:
        result = fn(*args, **kwargs)
    barrier(d)
    if not d.is_main:
        result = fn(*args, **kwargs)
    return result


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def wrap_model(model: torch.nn.Module, d: Dist, train_cfg, rt) -> torch.nn.Module:
    """The module the training step calls. FSDP shards `model` in place (it is the root), so
    the optimizer must be built from `model` after this call."""
    units = model.units()  # the repeated blocks (model/base.py); None: the model is one unit
    if train_cfg.activation_checkpointing and units is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, unit in enumerate(units):
            units[i] = checkpoint_wrapper(unit)
    if d.parallel == "ddp":
        # The only buffers (rotary tables) are computed identically everywhere: no per-forward
        # broadcast of them (the keyword was renamed in torch 2.13).
        no_buffer_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                       **{no_buffer_sync: False})
    if d.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
              if rt.dtype != torch.float32 else MixedPrecisionPolicy())
        for unit in units or ():
            fully_shard(unit, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def grad_sync(wrapped: torch.nn.Module, last_micro_step: bool):
    """Context for one micro-step's backward: gradients are reduced only on the last one."""
    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if last_micro_step else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def all_reduce_sum(d: Dist, *tensors: torch.Tensor):
    if d.enabled:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def shard_batches(batches, d: Dist):
    """This rank's share (every world_size-th) of an iterable of batches, as (batch, weight).
    Ranks that get fewer batches repeat one with weight 0, so every rank runs the same number of
    forwards: FSDP's all-gathers need all of them."""
    mine, seen, first = 0, 0, None
    for i, batch in enumerate(batches):
        first = batch if first is None else first
        seen += 1
        if i % d.world_size == d.rank:
            mine += 1
            yield batch, 1.0
    for _ in range(-(-seen // d.world_size) - mine):
        yield first, 0.0


def full_state(model: torch.nn.Module, optimizers) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU, keyed by parameter name. A collective under
    FSDP (every rank must call it); only rank 0's copy is complete. One process assembles the
    same dicts itself: torch.distributed.checkpoint's helpers cost most of a second to import,
    a fair share of a short run's wall time."""
    if not dist.is_initialized():
        return _one_process_state(model, optimizers)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizers.optimizers, options=opts))


def _one_process_state(model: torch.nn.Module, optimizers) -> tuple[dict, dict]:
    """What `get_model_state_dict` and `get_optimizer_state_dict` return for an unwrapped model:
    the optimizers' states and groups with parameter names (a tied parameter's first name) for
    their positions, all optimizers' groups in one list."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(p, name)
    state, groups = {}, []
    for opt in optimizers.optimizers:
        saved = opt.state_dict()
        fqns = [names[p] for group in opt.param_groups for p in group["params"]]
        state.update({fqns[i]: s for i, s in saved["state"].items()})
        groups += [{**group, "params": [fqns[i] for i in group["params"]]} for group in saved["param_groups"]]
    model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return model_state, {"state": state, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizers, model_state: dict, optim_state: dict, path):
    """Load a full checkpoint into a model of any parallel mode: each rank keeps its shard.
    Weights that do not fit the architecture are refused in one line."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, model_state, options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: weights do not fit the model's architecture ({detail[:200]})") from None
    set_optimizer_state_dict(model, optimizers.optimizers, optim_state, options=opts)


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as the full local tensor; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def agree(d: Dist, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every rank when true on any: one small all-reduce on the CPU group, at a
    point every rank reaches. A rank that cannot agree (another has died, or hangs past
    `train.dist_timeout_s`) exits without saving, saying why, instead of waiting for it."""
    if not d.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags])
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    except RuntimeError as e:  # gloo's and torch.distributed's errors (DistError is one)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SystemExit(f"rank {d.rank}: stopped without saving: the other ranks did not answer ({reason}); "
                         f"another process of the job failed or was stopped (torchrun's report names it)") from None
    return tuple(bool(v) for v in t.tolist())
