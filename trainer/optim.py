"""Optimizers and the learning-rate schedule.

The model says what each parameter is (model/base.py `param_groups`: embed, head, matrix,
vector); this module turns those roles into optimizer groups, each with its own base lr
(`base_lr`; the schedule scales every group by the same multiplier, so their ratios hold
throughout training):
- matrix: hidden 2-D weights: Muon's orthogonalised updates (`optimizer: muon`), else AdamW, decayed.
- vector: biases, norm gains and other vectors: AdamW, not decayed (decaying them only hurts, as
  in GPT-2/nanoGPT).
- embed: token/position lookups (and a tied head): AdamW at `embed_lr`, decayed.
- head: an untied output head: AdamW at `head_lr`, decayed.
- adapter: LoRA's adapters (model/lora.py): AdamW at `lr`, not decayed (decay would pull a
  fine-tuned model back toward its base, which is what a smaller lr or rank is for), never Muon.
Frozen parameters (LoRA's base weights) are in no group.

`Optimizers` presents one or two torch optimizers as one to the training loop: the schedule's
multiplier, unscaling and zeroing (the step is `trainer/guard.py`'s, the state the distributed
checkpoint helpers').
"""

from __future__ import annotations

import math

import torch

from trainer.muon import Muon


def _adamw_kwargs(cfg, device_type: str) -> dict:
    kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.adamw_impl == "fused" or cfg.adamw_impl == "auto" and device_type in ("cuda", "cpu"):
        kw["fused"] = True  # one kernel for all parameters; torch supports it on CUDA and CPU
    else:
        kw["foreach"] = True
    return kw


class Optimizers:
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_multiplier(self, mult: float):
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * mult

    def unscale_(self, scaler):
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


def build_optimizers(model, cfg, device_type: str) -> Optimizers:
    roles = model.param_groups()
    muon = cfg.optimizer == "muon"

    def group(params, lr, wd):
        return {"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd}

    adamw_groups = [g for g in (
        group([] if muon else roles["matrix"], cfg.lr, cfg.weight_decay),
        group(roles["vector"], cfg.lr, 0.0),
        group(roles["embed"], cfg.embed_lr or cfg.lr, cfg.weight_decay),
        group(roles["head"], cfg.head_lr or cfg.lr, cfg.weight_decay),
        group(roles["adapter"], cfg.lr, 0.0),
    ) if g["params"]]
    optimizers = [torch.optim.AdamW(adamw_groups, **_adamw_kwargs(cfg, device_type))] if adamw_groups else []
    if muon and roles["matrix"]:
        # No decay on Muon's matrices: at Muon's lr, AdamW's decay would shrink them ~100x faster.
        optimizers.append(Muon([group(roles["matrix"], cfg.muon_lr, 0.0)], momentum=cfg.muon_momentum,
                               row_blocks=model.row_blocks()))
    return Optimizers(optimizers)


def lr_multiplier(it: int, cfg, max_iters: int) -> float:
    """Schedule as a multiplier of each group's base lr: linear warmup, then cosine / wsd /
    constant, never below min_lr/lr."""
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    end = cfg.decay_iters or max_iters
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = end - cfg.decay_fraction * end
        if it < decay_start:
            return 1.0
        progress = min(1.0, (it - decay_start) / max(end - decay_start, 1))
        return floor + (1.0 - progress) * (1.0 - floor)
    progress = min(1.0, (it - cfg.warmup_iters) / max(end - cfg.warmup_iters, 1))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)
