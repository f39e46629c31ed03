"""Random training windows drawn one optimizer step at a time for all ranks together, each rank
taking its own rows: the data side of data parallelism.

Design decisions:
- One generator, seeded from the run's seed alone, is shared by every rank. Each optimizer step
  draws the whole global batch (micro_batch × grad_accum × world_size window starts, distinct
  within the step), and rank r keeps rows [r*grad_accum*micro_batch, (r+1)*grad_accum*micro_batch),
  in micro-step order. So within a step the ranks read disjoint windows (different starts),
  where independent per-rank streams (nanoGPT) may hand two ranks the same window (nanoGPT #531).
- The global batch of a step depends only on the seed, the step and tokens per step, not on how
  they are split: N ranks with accumulation k read exactly what one process with accumulation
  N*k reads, which is what makes a 2-process run equal a 1-process run, and a resume on another
  world size continue the same data.
- Each rank reads from disk only its own rows; drawing the global starts costs a few integers.
- `state()` is the shared generator's state (plain ints), equal on all ranks, valid between
  optimizer steps (where checkpoints are taken): any world size can continue from it.
"""

from __future__ import annotations

import numpy as np
import torch

from data.loader import TokenSplit, to_device


class GlobalRandomWindows:
    def __init__(self, data: TokenSplit, batch_size: int, block_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        self.data, self.batch_size, self.block_size, self.device = data, batch_size, block_size, device
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        # A window needs block_size + 1 tokens (inputs and the next-token targets).
        self.cum_starts = np.cumsum([max(len(s) - block_size, 0) for s in data.shards])
        if not len(self.cum_starts) or self.cum_starts[-1] == 0:
            raise ValueError(f"no shard holds {block_size + 1} tokens")
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.pending: list[np.ndarray] = []  # this rank's micro-batches (window starts) left in the step

    def step_starts(self) -> np.ndarray:
        """The next step's global batch: (world_size, grad_accum, batch_size) flat window starts."""
        n, k = int(self.cum_starts[-1]), self.world_size * self.grad_accum * self.batch_size
        # Distinct starts whenever the split has enough windows; a tiny split repeats some.
        flat = self.rng.choice(n, size=k, replace=k > n)
        return flat.reshape(self.world_size, self.grad_accum, self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pending:
            self.pending = list(self.step_starts()[self.rank])
        flat = self.pending.pop(0)
        shard_ids = np.searchsorted(self.cum_starts, flat, side="right")
        offsets = flat - np.concatenate(([0], self.cum_starts[:-1]))[shard_ids]
        T = self.block_size
        rows = np.stack([self.data.shards[s][o:o + T + 1] for s, o in zip(shard_ids, offsets)])
        return to_device(rows[:, :-1], self.device), to_device(rows[:, 1:], self.device)

    def state(self) -> dict:
        if self.pending:
            raise RuntimeError("loader state is defined between optimizer steps only")
        return {"rng": self.rng.bit_generator.state}

    def load_state(self, state: dict):
        self.rng.bit_generator.state = state["rng"]
        self.pending = []
