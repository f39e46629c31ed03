"""Batches from prepared token shards: memory-mapped, rank-aware, resumable, prefetched.

`TokenSplit` opens one split's shards (listed in meta.json) as read-only memmaps and presents
them as one token stream: a window may span two shards, since shard boundaries are arbitrary
cuts of the same stream. A corpus of any size costs no memory beyond the pages a batch touches.

Two samplers, picked by `data.sampling`:
- `RandomWindows` (random): nanoGPT's sampling, each row a window starting at a uniformly random
  position. Each optimizer step's global batch (world_size x grad_accum x batch_size windows,
  distinct within the step) comes from a generator seeded with (seed, step), and each rank takes
  its own rows. So the state is just a count: resuming continues the exact sequence instead of
  replaying the first batches (nanoGPT #467), eval or sampling cannot shift the stream, and N
  ranks with accumulation k train on exactly what one process with accumulation N*k does (a
  resume may change the world size).
- `EpochWindows` (epoch): the split cut into non-overlapping windows (inputs of block_size tokens
  each, every token an input once per epoch), visited in a fresh permutation each epoch, seeded
  by (seed, epoch); without replacement. The state is (epoch, position).

Distributed: rank r of W reads disjoint data: its own rows of each step's random global batch,
or, in epoch mode, every W-th window of the shared permutation (each rank's share has the same
length). Either way the state is the same on every rank, so a
checkpoint needs one copy of it.

The next batch is prepared in a background thread (memmap reads, int64 conversion, pinned
memory on CUDA) while the current step runs; the host-to-device copy is `non_blocking`. Batch
positions are drawn in the caller's thread in order, so prefetching never changes which batches
come out, and `state()` describes the batches handed out, not the one prepared ahead: a
checkpoint resumes at the first batch the model has not seen.

`eval_starts` cuts a split into non-overlapping windows (all of them, or a fixed sample) and
`eval_windows` reads a rank's share of them, for a loss over the whole split or an estimate.

Chat data (`data.format: chat`) is batched by data/packing.py instead: whole conversations
packed into rows, targets masked outside assistant turns; preference pairs (`data.format:
preference`) by data/preferences.py, one conversation per row, chosen rows then rejected.
`open_split` and `build_loader` pick the kind from the prepared folder, and
`packed_eval_batches` evaluates either, so the training loop is the same for all three.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

class TokenSplit:
    def __init__(self, prepared_dir: str | Path, split: str):
        prepared_dir = Path(prepared_dir)
        meta = json.loads((prepared_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.shards = [np.memmap(prepared_dir / s["file"], dtype=dtype, mode="r")
                       for s in meta["splits"][split] if s["tokens"] > 0]
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, across shard boundaries."""
        shard = int(np.searchsorted(self.ends, start, side="right"))
        offset = start - (int(self.ends[shard - 1]) if shard else 0)
        part = self.shards[shard][offset:offset + length]
        if len(part) == length:
            return part
        parts = [part]
        while sum(map(len, parts)) < length:
            shard += 1
            parts.append(self.shards[shard][:length - sum(map(len, parts))])
        return np.concatenate(parts)

    def rows(self, starts, length: int) -> np.ndarray:
        return np.stack([self.read(int(s), length) for s in starts]).astype(np.int64)


def to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.int64))
    if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the running step
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Windows:
    """Shared machinery: subclasses say where each batch's windows start (`_draw`) and what
    their position is (`_position`, `_set_position`); this class reads, prefetches and moves."""

    kind = ""

    def __init__(self, data: TokenSplit, batch_size: int, block_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, prefetch: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.data, self.batch_size, self.block_size, self.seed = data, batch_size, block_size, seed
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self._pin = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader") if prefetch else None
        self._ahead = None  # (the batch prepared ahead, or its future; the position after it)
        self._handed = None  # the position after the last batch handed out, while one is ahead

    def _draw(self) -> np.ndarray:
        raise NotImplementedError

    def _position(self) -> dict:
        raise NotImplementedError

    def _set_position(self, position: dict):
        raise NotImplementedError

    def _prepare(self):
        starts = self._draw()
        batch = self._pool.submit(self._host_batch, starts) if self._pool else self._host_batch(starts)
        return batch, self._position()

    def _host_batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.data.rows(starts, self.block_size + 1)
        x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in (rows[:, :-1], rows[:, 1:]))
        return (x.pin_memory(), y.pin_memory()) if self._pin else (x, y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is None:
            self._ahead = self._prepare()
        batch, self._handed = self._ahead
        # Draw the next batch now, so that its reads overlap the step this one feeds.
        self._ahead = self._prepare() if self._pool else None
        x, y = batch.result() if self._pool else batch
        return x.to(self.device, non_blocking=self._pin), y.to(self.device, non_blocking=self._pin)

    def state(self) -> dict:
        position = self._handed if self._ahead is not None else self._position()
        return {"sampling": self.kind, **position}

    def load_state(self, state: dict):
        sampling = state.get("sampling", self.kind)
        if sampling != self.kind:
            raise UserError(f"the checkpoint's loader state is for data.sampling={sampling}, not {self.kind}")
        self._set_position(state)
        self._ahead = None  # drop the batch prepared from the old position


class RandomWindows(_Windows):
    kind = "random"

    def __init__(self, *args, grad_accum: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_accum = grad_accum
        self.num_starts = self.data.num_tokens - self.block_size  # a window needs T + 1 tokens
        if self.num_starts <= 0:
            raise UserError(f"the split has {self.data.num_tokens:,} tokens, too few for one window of "
                            f"{self.block_size + 1} tokens; use a smaller model.block_size or more text")
        self.batches = 0  # micro-batches handed out by this rank

    def _draw(self) -> np.ndarray:
        # The whole optimizer step's batch (world_size x grad_accum x batch_size distinct windows)
        # comes from a generator seeded by (seed, step); this rank takes its own rows.
        step, micro = divmod(self.batches, self.grad_accum)
        self.batches += 1
        W, A, B = self.world_size, self.grad_accum, self.batch_size
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        starts = rng.choice(self.num_starts, size=W * A * B, replace=W * A * B > self.num_starts)
        return starts.reshape(W, A, B)[self.rank, micro]

    def _position(self) -> dict:
        return {"batches": self.batches, "grad_accum": self.grad_accum}

    def _set_position(self, position: dict):
        if "batches" not in position:
            raise UserError("the checkpoint's loader state is from an older format; it cannot be resumed exactly")
        # Steps are what carries over when grad_accum changes with the world size.
        steps, micro = divmod(int(position["batches"]), int(position.get("grad_accum", self.grad_accum)))
        self.batches = steps * self.grad_accum + micro


class EpochWindows(_Windows):
    kind = "epoch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_windows = (self.data.num_tokens - 1) // self.block_size
        self.per_rank = self.num_windows // self.world_size  # equal shares: ranks step in lockstep
        if self.per_rank == 0:
            raise UserError(f"the split has {self.data.num_tokens:,} tokens, too few for one window of "
                            f"{self.block_size + 1} tokens per rank ({self.world_size} ranks); use a smaller "
                            f"model.block_size or more text")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = None, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            # uint32 indices when they fit: 40 MB per 10M windows, shuffled in place.
            order = np.arange(self.num_windows, dtype=np.uint32 if self.num_windows < 2**32 else np.int64)
            np.random.Generator(np.random.PCG64([self.seed, epoch])).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def _draw(self) -> np.ndarray:
        starts = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            if self.pos == self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
            starts[i] = int(self._order_for(self.epoch)[self.pos * self.world_size + self.rank]) * self.block_size
            self.pos += 1
        return starts

    def _position(self) -> dict:
        return {"epoch": self.epoch, "position": self.pos}

    def _set_position(self, position: dict):
        self.epoch, self.pos = int(position["epoch"]), int(position["position"])


SAMPLERS = {"random": RandomWindows, "epoch": EpochWindows}


def open_split(prepared_dir: str | Path, split: str, block_size: int):
    """A prepared split: a TokenSplit, or a ConversationSplit for chat data; refused (one line)
    when it cannot fill one batch row."""
    meta = json.loads((Path(prepared_dir) / "meta.json").read_text())
    if meta.get("format") == "preference":
        from data.preferences import PreferenceSplit

        data = PreferenceSplit(prepared_dir, split, block_size)
        if not len(data.usable):
            raise UserError(f"the {split} split holds no preference pair; use more pairs or another data.val_fraction")
        return data
    if meta.get("format") == "chat":
        from data.packing import ConversationSplit

        data = ConversationSplit(prepared_dir, split)
        if not data.num_conversations:
            raise UserError(f"the {split} split holds no conversation; use more conversations or another "
                            f"data.val_fraction")
        return data
    data = TokenSplit(prepared_dir, split)
    if data.num_tokens <= block_size:
        raise UserError(f"the {split} split has {data.num_tokens} tokens, fewer than one context "
                        f"window (model.block_size={block_size}) plus one")
    return data


def build_loader(sampling: str, data: TokenSplit, batch_size: int, block_size: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, grad_accum: int = 1, warn=None):
    from data.packing import ConversationSplit, PackedConversations
    from data.preferences import PreferenceBatches, PreferenceSplit

    if isinstance(data, PreferenceSplit):
        return PreferenceBatches(data, batch_size, seed, device, rank, world_size, grad_accum)
    if isinstance(data, ConversationSplit):
        return PackedConversations(data, batch_size, block_size, seed, device, rank, world_size, grad_accum, warn)
    # Prefetch on CUDA only: on CPU a batch costs microseconds to read, and a second thread only
    # contends with torch's own (it cost a fifth of a small model's step on 2 cores).
    prefetch = torch.device(device).type == "cuda"
    if sampling == "random":
        return RandomWindows(data, batch_size, block_size, seed, device, rank, world_size, prefetch,
                             grad_accum=grad_accum)
    if sampling == "epoch":
        return EpochWindows(data, batch_size, block_size, seed, device, rank, world_size, prefetch)
    raise UserError(f"data.sampling={sampling!r} is not one of: {', '.join(SAMPLERS)}")


def eval_starts(data: TokenSplit, block_size: int, max_windows: int = 0, seed: int = 0) -> np.ndarray:
    """Where the windows an evaluation covers start: the split cut into non-overlapping windows of
    block_size inputs, all of them when max_windows is 0 or at least their number, else a fixed
    random sample of max_windows of them (seeded: the same windows at every call, so successive
    estimates are comparable, and drawn from the same windows the whole split is cut into, so an
    estimate has no bias against it), in order."""
    count = (data.num_tokens - 1) // block_size
    if max_windows and max_windows < count:
        rng = np.random.Generator(np.random.PCG64(seed))
        return np.sort(rng.choice(count, size=max_windows, replace=False)).astype(np.int64) * block_size
    return np.arange(count, dtype=np.int64) * block_size


def eval_windows(data: TokenSplit, starts: np.ndarray, batch_size: int, block_size: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, ignore: int = -1):
    """Yield (x, y) batches of this rank's share of the windows at `starts` (every world_size-th),
    so N ranks read and evaluate a window each once between them. Every rank yields the same
    number of batches (FSDP's forward is a collective: the ranks' forwards must pair up): a rank
    whose share runs out first gets batches whose targets are all `ignore`, which count nothing."""
    mine = starts[rank::world_size]
    batches = -(-len(starts[0::world_size]) // batch_size)  # rank 0 has the largest share
    for i in range(batches):
        chunk = mine[i * batch_size:(i + 1) * batch_size]
        rows = data.rows(chunk if len(chunk) else starts[:1], block_size + 1)
        if not len(chunk):  # nothing left for this rank: any window, counting nothing
            rows[:, 1:] = ignore
        yield to_device(rows[:, :-1], device), to_device(rows[:, 1:], device)


def packed_eval_batches(data, batch_size: int, block_size: int, device: torch.device, max_batches: int = 0):
    """Yield (x, y) over a conversation or preference split: every batch in order when
    max_batches is 0, else max_batches batches from a fixed order (the same each call). Every
    rank packs the same batches; the caller shares them out (trainer/dist.py `shard_batches`)."""
    from data.packing import conversation_batches
    from data.preferences import PreferenceSplit, preference_batches

    if isinstance(data, PreferenceSplit):
        return preference_batches(data, batch_size, device, max_batches)
    return conversation_batches(data, batch_size, block_size, device, max_batches)
