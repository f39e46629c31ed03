"""The pre-flight memory estimate: the peak memory a training run will need on its device, from the
config and the model's shape alone (the model is built on the meta device: nothing allocated).

    peak = runtime + weights + optimizer state (+ DDP's buckets)
           + the largest of: the training peak, the optimizer step, an evaluation

- runtime: on CPU, this process's resident memory before the run builds anything (the torch
  libraries and thread pools, after one tiny step has loaded the kernels), measured; on CUDA 0:
  the context is outside both the allocator's count and the free memory it is compared with.
- weights: float32 master copies (autocast casts on the fly, and keeps bf16 copies of the matmul
  weights during a forward); FSDP keeps 1/world of them plus two gathered units (one in use, one
  prefetched). gradients: float32, one per trained parameter (under LoRA, the adapters'),
  sharded under FSDP. optimizer: AdamW keeps two float32 states per trained parameter, Muon one
  momentum per hidden matrix (AdamW on the rest).
- training peak, at the start of a backward: the activations saved for it (the model's
  `activation_bytes`: its layers, attention kernel, activation checkpointing), the loss's
  logits (`logits_bytes`), and gradients accumulated by earlier micro-steps. With
  `set_to_none` zeroing there are none after the last micro-step, so the optimizer step's peak
  is the gradients alone.
- evaluation: an eval micro-batch's logits and log-probabilities (no activations kept).
- CPU heap: glibc keeps freed blocks (trainer/runtime.py) and reuses them imperfectly; after a
  few steps a small model's peak RSS holds about twice its activations (the small and classic
  shapes of bench/memory_estimate.py). The logits of a large vocabulary, above glibc's 32 MB
  mmap threshold, are mapped and unmapped on their own and overlap that slack rather than
  adding to it (its GPT-2 124M shape peaks near activations + logits). So the CPU training
  peak counts max(activations, logits) on top of the activations: an empirical rule, fitted on
  those three shapes (bench/RESULTS.md), where the estimate is 0.91-0.99 of the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

GB = 1e9


@dataclass
class Footprint:
    """Estimated bytes, by what holds them; `peak` is the estimate."""
    runtime: int
    weights: int
    optimizer: int
    gradients: int
    buckets: int  # DDP's copy of the gradients
    activations: int  # saved for backward, one micro-batch
    logits: int  # the loss's vocabulary-wide tensors at their peak, one micro-batch
    evaluation: int  # an eval micro-batch's logits and log-probabilities
    heap: int  # CPU: the allocator's slack on top of the activations
    peak: int

    def describe(self) -> str:
        parts = [f"{f.name} {getattr(self, f.name) / GB:.2f}" for f in fields(self)
                 if f.name != "peak" and getattr(self, f.name)]
        return f"{self.peak / GB:.2f} GB ({', '.join(parts)})"


def element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def estimate_memory(cfg, model, micro_batch: int, grad_accum: int, device: torch.device, dtype: torch.dtype,
                    parallel: str = "none", world_size: int = 1, runtime: int = 0) -> Footprint:
    """The peak memory of one rank of the run `cfg` describes, `model` its (meta) model."""
    e = element_size(dtype)
    count = model.num_params()
    shard = world_size if parallel == "fsdp" else 1
    weights = 4 * count // shard + sum(b.numel() * b.element_size() for b in model.buffers())  # buffers: tables, counts
    eval_logits = micro_batch * model.cfg.block_size * model.cfg.vocab_size * (e + (4 if e != 4 else 0) + 4)
    if not model.trainable:  # a counted model: its tables and an evaluation
        return Footprint(runtime, weights, 0, 0, 0, 0, 0, eval_logits, 0, runtime + weights + eval_logits)

    roles = model.param_groups()  # trainable parameters only: under LoRA, the adapters
    trained = sum(p.numel() for group in roles.values() for p in group)
    muon = sum(p.numel() for p in roles["matrix"]) if cfg.optim.optimizer == "muon" else 0
    optimizer = (4 * muon + 8 * (trained - muon)) // shard
    gradients = 4 * trained // shard
    buckets = 4 * trained if parallel == "ddp" else 0  # DDP's gradient buckets: a flat copy of every gradient
    if parallel == "fsdp" and model.units():
        weights += 2 * e * max(sum(p.numel() for p in unit.parameters()) for unit in model.units())
    compiled = cfg.train.compile and device.type == "cuda"
    activations = model.activation_bytes(micro_batch, e, device.type, cfg.train.attention,
                                         cfg.train.activation_checkpointing)
    logits = model.logits_bytes(micro_batch, e, compiled)
    heap = max(activations - logits, 0) if device.type == "cpu" else 0
    autocast_copies = 2 * model.matmul_params() if e != 4 and not compiled else 0
    # FSDP keeps unsharded gradients between micro-steps that do not synchronise.
    accumulated = (4 * trained if parallel == "fsdp" else gradients) if grad_accum > 1 else 0
    training = accumulated + autocast_copies + activations + logits + heap
    peak = runtime + weights + optimizer + buckets + max(training, gradients, eval_logits)
    return Footprint(runtime, weights, optimizer, gradients, buckets, activations, logits, eval_logits, heap, peak)
