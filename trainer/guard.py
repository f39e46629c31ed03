"""Numerical faults: skip an update whose loss or gradient norm is non-finite (or, optionally, a
spike), count the skips, and stop the run when too many come in a row.

Design decisions:
- The decision is made on the device, as a bool tensor, with no host sync per step: reading a
  value every step would stall a GPU's queue (the host could no longer run ahead), and a guard
  that is always on must cost nothing. The counters live on the device too and are read at log
  intervals, where the loop syncs anyway; so a run of more than `max_bad_steps` skipped updates
  stops the run at the next log line, having changed nothing in the meantime.
- Skipping without a sync uses the mechanism torch's fused Adam/AdamW already have for
  GradScaler: a `found_inf` tensor makes the fused kernel leave parameters and moments
  untouched and undo its step count, so a skipped update leaves the optimizer state exactly as
  it was. Fused AdamW is the default on CUDA and CPU. Other optimizers (foreach AdamW, Muon) and
  fp16 with a GradScaler (whose step sets `found_inf` itself) take one host sync per step to
  decide: correct everywhere, free where it matters most. Zeroing the gradients instead would
  not be a skip: AdamW would still decay its moments, count a step and move the weights.
- With a GradScaler, non-finite gradients are its routine business (it skips the step and lowers
  the scale), so they are not counted as faults; a non-finite loss still is.
- The spike guard is llm.c's: mean and standard deviation of the loss and of the gradient norm
  over the last `spike_window` good steps; an update whose loss or norm is more than `spike_z`
  standard deviations above its mean is skipped. It starts once the window is full. Its state is
  part of the checkpoint, so resuming stays exact.
"""

from __future__ import annotations

import torch

from common.errors import UserError


class DivergedError(UserError):
    """Too many updates in a row were skipped: the run cannot make progress as configured."""


class StepGuard:
    def __init__(self, train_cfg, device: torch.device, scaler_enabled: bool):
        self.max_bad_steps, self.spike_z, self.window = train_cfg.max_bad_steps, train_cfg.spike_z, train_cfg.spike_window
        self.check_norm = not scaler_enabled

        def counter():
            return torch.zeros((), dtype=torch.int64, device=device)

        self.skipped, self.in_row, self.worst_in_row, self.n_good = counter(), counter(), counter(), counter()
        self.recent = torch.zeros(2, self.window if self.spike_z else 0, device=device)  # rows: loss, norm
        self.slots = torch.arange(self.recent.shape[1], device=device)

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """True (a device tensor) when this update must be skipped; updates the counters."""
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        finite = torch.isfinite(values)
        bad = ~finite[0] | (~finite[1] if self.check_norm else torch.zeros_like(finite[1]))
        if self.spike_z:
            mean, std = self.recent.mean(1), self.recent.std(1, correction=0)
            spike = (finite & (values - mean > self.spike_z * std)).any() & (self.n_good >= self.window)
            bad = bad | spike
            take = ~bad & finite.all() & (self.slots == self.n_good % self.window)  # the oldest value's slot
            self.recent = torch.where(take, values[:, None], self.recent)
        self.n_good += (~bad & finite.all()).long()
        self.skipped += bad.long()
        self.in_row = (self.in_row + 1) * bad.long()
        self.worst_in_row = torch.maximum(self.worst_in_row, self.in_row)
        return bad

    def read(self, it: int) -> int:
        """Skipped updates so far (a host sync: call at log intervals). Raises DivergedError when more
        than max_bad_steps came in a row since the last read."""
        skipped, worst = torch.stack([self.skipped, self.worst_in_row]).tolist()
        self.worst_in_row.copy_(self.in_row)
        if self.max_bad_steps and worst > self.max_bad_steps:
            raise DivergedError(f"stopped at iter {it}: {worst} updates in a row were skipped (non-finite loss "
                                f"or gradient norm{', or a spike' if self.spike_z else ''}; more than "
                                f"train.max_bad_steps={self.max_bad_steps}); the last good checkpoint is kept; "
                                f"try a lower optim.lr or a smaller train.grad_clip")
        return skipped

    def state_dict(self) -> dict:
        return {k: getattr(self, k).clone() for k in ("skipped", "in_row", "worst_in_row", "n_good", "recent")}

    def load_state_dict(self, state: dict):
        refill = state["recent"].shape != self.recent.shape  # spike settings changed: gather stats afresh
        for k, v in state.items():
            if not (refill and k in ("recent", "n_good")):
                setattr(self, k, v.to(self.skipped.device))


def guarded_step(optimizer, scaler, skip: torch.Tensor):
    """optimizer.step(), unless `skip` (a device bool): on device for fused AdamW, else one sync."""
    skip_on_host = None
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        if opt.defaults.get("fused") and not scaler.is_enabled():
            opt.found_inf = skip.float()  # read by the fused kernel: torch's GradScaler protocol
            opt.step()
            continue
        if skip_on_host is None:
            skip_on_host = bool(skip)
        if not skip_on_host:
            scaler.step(opt)
