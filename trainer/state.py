"""The training state: everything a checkpoint holds, assembled and restored in one place.

`state_dict()` is the checkpoint, a flat dict that `torch.load(weights_only=True)` reads:
    model       full, unsharded weights on CPU, uncompiled parameter names
    optimizer   full optimizer state keyed by parameter name (absent for counted models)
    scaler, guard, loader, rng
                the gradient scaler, the fault guard's counters, the loader's position and the
                Python/NumPy/torch/CUDA generators: what makes a resume exact
    config      the resolved config (a dict); tokenizer: its plain-data state
    iter, best_val_loss, tokens_per_step
Tools that only read weights use `model`, `config`, `tokenizer` and `iter` (trainer/checkpoint.py
`load_model`). The parts are optional where a family has none: a counted model (the n-gram) has
no optimizer, scaler or guard.

Under FSDP `state_dict()` is a collective (every rank gathers its shards); only rank 0's copy is
complete, and only rank 0 writes it.
"""

from __future__ import annotations

import math
from pathlib import Path

from common.errors import UserError
from trainer.dist import full_state, load_full_state
from trainer.runtime import rng_state, set_rng_state


class TrainingState:
    def __init__(self, cfg, tokenizer, model, optimizer=None, scaler=None, loader=None, guard=None,
                 tokens_per_step: int = 0):
        self.cfg, self.tokenizer, self.model = cfg, tokenizer, model
        self.optimizer, self.scaler, self.loader, self.guard = optimizer, scaler, loader, guard
        self.tokens_per_step = tokens_per_step
        self.iter, self.best_val_loss = 0, math.inf

    def state_dict(self) -> dict:
        if self.optimizer is not None:
            model_state, optim_state = full_state(self.model, self.optimizer)
        else:
            model_state, optim_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, None
        state = dict(model=model_state, config=self.cfg.to_dict(), tokenizer=self.tokenizer.state(),
                     iter=self.iter, best_val_loss=self.best_val_loss, rng=rng_state(),
                     tokens_per_step=self.tokens_per_step)
        if optim_state is not None:
            state["optimizer"] = optim_state
        for name in ("scaler", "guard"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name).state_dict()
        if self.loader is not None:
            state["loader"] = self.loader.state()
        return state

    def load_state_dict(self, ckpt: dict, path: str | Path):
        """Restore a checkpoint (every rank; each keeps its shard under FSDP)."""
        wanted = [name for name in ("optimizer", "scaler", "guard", "loader") if getattr(self, name) is not None]
        missing = [name for name in wanted if name not in ckpt]
        if missing:
            raise UserError(f"{path}: cannot resume from it: it has no {', '.join(missing)} state "
                            f"(a checkpoint of another model family, or of a converted model)")
        if self.optimizer is not None:
            load_full_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"], path)
        else:
            from trainer.checkpoint import load_model_state
            load_model_state(self.model, ckpt, path)
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.guard is not None:
            self.guard.load_state_dict(ckpt["guard"])
        if self.loader is not None:
            self.loader.load_state(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        self.iter, self.best_val_loss = ckpt["iter"], ckpt["best_val_loss"]
