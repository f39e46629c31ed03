"""Optimizers and the learning-rate schedule.

Parameter groups, each with its own base lr (`base_lr`; the schedule scales every group by the
same multiplier, so their ratios hold throughout training):
- AdamW, decayed: 2-D hidden weights (unless Muon takes them).
- AdamW, not decayed: biases and norm gains (decaying them only hurts, as in GPT-2/nanoGPT).
- AdamW embeddings (`embed_lr`) and an untied head (`head_lr`), decayed.
- Muon (`optimizer: muon`): the 2-D weights inside the blocks, orthogonalised updates.

`Optimizers` presents one or two torch optimizers as one: a single step/zero_grad/state_dict
for the training loop and the checkpoint.
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

    def step(self, scaler=None):
        for opt in self.optimizers:
            scaler.step(opt) if scaler is not None else opt.step()

    def unscale_(self, scaler):
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {str(i): opt.state_dict() for i, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict):
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(state[str(i)])


def build_optimizers(model: torch.nn.Module, cfg, device_type: str) -> Optimizers:
    embed = {id(model.wte.weight)} | ({id(model.wpe.weight)} if model.wpe is not None else set())
    head = set() if model.cfg.tie_weights else {id(model.lm_head.weight)}
    groups = {"decay": [], "no_decay": [], "embed": [], "head": [], "muon": []}
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        if id(p) in embed:
            groups["embed"].append(p)
        elif id(p) in head:
            groups["head"].append(p)
        elif p.dim() < 2:
            groups["no_decay"].append(p)
        elif cfg.optimizer == "muon" and name.startswith("blocks."):
            groups["muon"].append(p)
        else:
            groups["decay"].append(p)

    def group(params, lr, wd):
        return {"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd}

    adamw_groups = [g for g in (
        group(groups["decay"], cfg.lr, cfg.weight_decay),
        group(groups["no_decay"], cfg.lr, 0.0),
        group(groups["embed"], cfg.embed_lr or cfg.lr, cfg.weight_decay),
        group(groups["head"], cfg.head_lr or cfg.lr, cfg.weight_decay),
    ) if g["params"]]
    optimizers = [torch.optim.AdamW(adamw_groups, **_adamw_kwargs(cfg, device_type))]
    if groups["muon"]:
        # No decay on Muon's matrices: at Muon's lr, AdamW's decay would shrink them ~100x faster.
        optimizers.append(Muon([group(groups["muon"], cfg.muon_lr, 0.0)],
                               momentum=cfg.muon_momentum))
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
