"""Batches from prepared token arrays: memory-mapped, rank-aware, resumable.

`TokenSplit` opens one split's shards (listed in meta.json) as read-only memmaps, so a corpus
of any size costs no memory beyond the pages a batch touches.

`RandomWindows` draws nanoGPT-style random windows: each row of a batch starts at a uniformly
random position among all windows that fit inside one shard. Its randomness comes from its own
numpy generator seeded from (seed, rank), never from the global RNGs, so:
- each rank of a distributed run draws a different stream,
- evaluation and sampling cannot shift the training stream,
- `state()` is the generator's state (plain ints), and `load_state()` continues the exact
  sequence after a resume instead of replaying the first batches again (nanoGPT #467).

`eval_windows` walks a split in order, in non-overlapping windows, for a loss over the whole
split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class TokenSplit:
    def __init__(self, prepared_dir: str | Path, split: str):
        prepared_dir = Path(prepared_dir)
        meta = json.loads((prepared_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.shards = [np.memmap(prepared_dir / s["file"], dtype=dtype, mode="r")
                       for s in meta["splits"][split] if s["tokens"] > 0]
        self.num_tokens = sum(len(s) for s in self.shards)


def to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.int64))
    if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the running step
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class RandomWindows:
    def __init__(self, data: TokenSplit, batch_size: int, block_size: int, seed: int,
                 device: torch.device, rank: int = 0):
        self.data, self.batch_size, self.block_size, self.device = data, batch_size, block_size, device
        # A window needs block_size + 1 tokens (inputs and the next-token targets).
        self.starts_per_shard = np.array([max(len(s) - block_size, 0) for s in data.shards])
        self.cum_starts = np.cumsum(self.starts_per_shard)
        if not len(self.cum_starts) or self.cum_starts[-1] == 0:
            raise ValueError(f"no shard holds {block_size + 1} tokens")
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.rng.integers(0, self.cum_starts[-1], size=self.batch_size)
        shard_ids = np.searchsorted(self.cum_starts, flat, side="right")
        offsets = flat - np.concatenate(([0], self.cum_starts[:-1]))[shard_ids]
        T = self.block_size
        rows = np.stack([self.data.shards[s][o:o + T + 1] for s, o in zip(shard_ids, offsets)])
        return to_device(rows[:, :-1], self.device), to_device(rows[:, 1:], self.device)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state(self, state: dict):
        self.rng.bit_generator.state = state["rng"]


def eval_windows(data: TokenSplit, batch_size: int, block_size: int, device: torch.device,
                 max_batches: int = 0, seed: int = 0):
    """Yield (x, y) over the split: every full non-overlapping window in order when max_batches is
    0, else max_batches batches of random windows from a fixed seed (the same windows each call,
    so successive estimates are comparable)."""
    if max_batches:
        sampler = RandomWindows(data, batch_size, block_size, seed, device)
        for _ in range(max_batches):
            yield sampler.next_batch()
        return
    T = block_size
    for shard in data.shards:
        n = (len(shard) - 1) // T
        for i in range(0, n, batch_size):
            rows = np.stack([shard[j * T:(j + 1) * T + 1] for j in range(i, min(i + batch_size, n))])
            yield to_device(rows[:, :-1], device), to_device(rows[:, 1:], device)
