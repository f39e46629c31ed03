"""Batches of chat data: whole conversations packed into context windows.

A row of a batch is block_size + 1 tokens (inputs and next-token targets, as for text) filled
with whole conversations, one after another, in a shuffled order; when the next conversation
does not fit, the row is padded and the conversation starts the next row. A conversation longer
than the row is cut to its first block_size + 1 tokens: its tail is never trained on, and never
shows up at the start of another row where its context (the user's question) would be missing.
Targets are IGNORE wherever the mask shard (data/conversations.py) says 0 (system, user and
tool text, bos and assistant-start tokens) and on padding, so the loss only ever sees assistant
text and end tokens. Conversations in a row attend to the ones before them, as documents in a
text window do; each starts with `<|bos|>`, which is all that marks the boundary.

Design decisions:
- Rows are packed greedily in order, not best-fit: the padding this wastes is less than one
  conversation per row, and an epoch's rows are then a function of its permutation alone, so a
  position in the stream is two numbers (epoch, row).
- Conversations are visited without replacement, in a fresh permutation each epoch seeded by
  (seed, epoch), as `data.sampling: epoch` does for text (`data.sampling` is for text only).
- Distributed and accumulated: an optimizer step takes world_size x grad_accum x batch_size
  rows from the one stream, which every rank packs whole (cheap: index arithmetic), and rank r
  takes its rows as RandomWindows does (data/loader.py), so N ranks with accumulation k train on
  what one process with accumulation N*k does, and the state (the position at the start of the
  step, and the micro-batches handed out) is the same on every rank.
- A conversation with no trained target within its first block_size + 1 tokens (a user turn
  longer than the window) is skipped, and counted in a warning: a row of nothing but ignored
  targets would make a micro-batch's mean loss 0/0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from data.loader import to_device
from model.base import IGNORE


class ConversationSplit:
    """One split of prepared chat data: token and mask shards, memory-mapped, and where each
    conversation starts (found by scanning for `<|bos|>`; shards hold whole conversations)."""

    def __init__(self, prepared_dir: str | Path, split: str):
        prepared_dir = Path(prepared_dir)
        meta = json.loads((prepared_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.bos_id = meta["bos_id"]
        shards = [s for s in meta["splits"][split] if s["tokens"] > 0]
        self.tokens = [np.memmap(prepared_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        self.masks = [np.memmap(prepared_dir / s["mask"], dtype=np.uint8, mode="r") for s in shards]
        shard, start, length = [], [], []
        for i, tokens in enumerate(self.tokens):
            starts = np.flatnonzero(np.asarray(tokens) == self.bos_id)
            shard.append(np.full(len(starts), i))
            start.append(starts)
            length.append(np.diff(np.append(starts, len(tokens))))
        self.shard, self.start, self.length = (np.concatenate(a).astype(np.int64) if a else np.zeros(0, np.int64)
                                               for a in (shard, start, length))
        self.num_conversations = len(self.start)
        self.num_tokens = sum(len(t) for t in self.tokens)

    def trainable(self, row_len: int) -> np.ndarray:
        """Which conversations have a trained target within their first row_len tokens."""
        ok = np.zeros(self.num_conversations, dtype=bool)
        for i, mask in enumerate(self.masks):
            mine = np.flatnonzero(self.shard == i)
            counts = np.concatenate([[0], np.cumsum(mask, dtype=np.uint32)])  # a shard is < 2^32 tokens
            start, end = self.start[mine], self.start[mine] + np.minimum(self.length[mine], row_len)
            ok[mine] = counts[end] - counts[start + 1] > 0  # targets are positions 1.. of the row
        return ok

    def pack(self, rows: list[list[int]], row_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) arrays (len(rows), row_len) of rows of conversation indices."""
        tokens = np.full((len(rows), row_len), self.bos_id, dtype=np.int64)
        mask = np.zeros((len(rows), row_len), dtype=bool)
        for r, row in enumerate(rows):
            at = 0
            for c in row:
                s, n = self.start[c], min(self.length[c], row_len - at)
                tokens[r, at:at + n] = self.tokens[self.shard[c]][s:s + n]
                mask[r, at:at + n] = self.masks[self.shard[c]][s:s + n]
                at += n
        return tokens, mask


def batch_tensors(tokens: np.ndarray, mask: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from packed rows: y is IGNORE where the mask is 0 (context and padding)."""
    targets, device = np.where(mask[:, 1:], tokens[:, 1:], IGNORE), torch.device(device)
    return to_device(np.ascontiguousarray(tokens[:, :-1]), device), to_device(targets, device)


def pack_rows(order: np.ndarray, lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Conversations in `order` cut greedily into rows of at most row_len tokens; a conversation
    longer than a row gets one of its own (and is truncated when packed)."""
    rows, row, used = [], [], 0
    for c in order.tolist():
        n = min(int(lengths[c]), row_len)
        if row and used + n > row_len:
            rows.append(row)
            row, used = [], 0
        row.append(c)
        used += n
    return rows + [row] if row else rows


class Packer:
    """The endless stream of rows for training: each epoch a fresh permutation of the usable
    conversations, seeded by (seed, epoch), packed by `pack_rows`."""

    def __init__(self, usable: np.ndarray, lengths: np.ndarray, row_len: int, seed: int):
        self.usable, self.lengths, self.row_len, self.seed = usable, lengths, row_len, seed
        self.epoch, self.row = 0, 0
        self._rows_epoch, self._rows = None, None

    def _rows_for(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            order = self.usable.copy()
            np.random.Generator(np.random.PCG64([self.seed, epoch])).shuffle(order)
            self._rows_epoch, self._rows = epoch, pack_rows(order, self.lengths, self.row_len)
        return self._rows

    def next_row(self) -> list[int]:
        if self.row == len(self._rows_for(self.epoch)):
            self.epoch, self.row = self.epoch + 1, 0
        self.row += 1
        return self._rows_for(self.epoch)[self.row - 1]

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def seek(self, position: dict):
        self.epoch, self.row = int(position["epoch"]), int(position["row"])


def usable_conversations(data: ConversationSplit, block_size: int, split: str, warn=None) -> np.ndarray:
    ok = data.trainable(block_size + 1)
    if not ok.any():
        raise UserError(f"the {split} split has no conversation with an assistant token within the first "
                        f"{block_size + 1} tokens (model.block_size={block_size}); use shorter conversations "
                        f"or a larger block_size")
    if warn and not ok.all():
        warn(f"{(~ok).sum()} of {len(ok)} {split} conversations have no assistant token within model.block_size="
             f"{block_size} tokens and are skipped")
    return np.flatnonzero(ok)


class PackedConversations:
    """The training loader for chat data: the same interface as data/loader.py's samplers
    (`next_batch`, `state`, `load_state`)."""

    kind = "conversations"

    def __init__(self, data: ConversationSplit, batch_size: int, block_size: int, seed: int, device,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, warn=None):
        self.data, self.batch_size, self.row_len, self.device = data, batch_size, block_size + 1, torch.device(device)
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.packer = Packer(usable_conversations(data, block_size, "train", warn), data.length, self.row_len, seed)
        self.batches = 0  # micro-batches handed out by this rank
        self._step_start = self.packer.position  # the stream's position at the start of the current step
        self._step_rows = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        micro = self.batches % self.grad_accum
        if micro == 0 or self._step_rows is None:
            if micro == 0:
                self._step_start = self.packer.position
            self.packer.seek(self._step_start)
            per_step = self.world_size * self.grad_accum * self.batch_size
            self._step_rows = [self.packer.next_row() for _ in range(per_step)]
        first = (self.rank * self.grad_accum + micro) * self.batch_size
        self.batches += 1
        return batch_tensors(*self.data.pack(self._step_rows[first:first + self.batch_size], self.row_len),
                             self.device)

    def state(self) -> dict:
        at_step_boundary = self.batches % self.grad_accum == 0 and self._step_rows is not None
        position = self.packer.position if at_step_boundary else self._step_start
        return {"sampling": self.kind, "batches": self.batches, "grad_accum": self.grad_accum, **position}

    def load_state(self, state: dict):
        if state.get("sampling") != self.kind:
            raise UserError(f"the checkpoint's loader state is for data.sampling={state.get('sampling')}, "
                            f"not chat conversations")
        steps, micro = divmod(int(state["batches"]), int(state.get("grad_accum", self.grad_accum)))
        self.batches = steps * self.grad_accum + micro
        self._step_start, self._step_rows = {"epoch": state["epoch"], "row": state["row"]}, None
        self.packer.seek(self._step_start)


def conversation_batches(data: ConversationSplit, batch_size: int, block_size: int, device, max_batches: int = 0):
    """Yield (x, y) for evaluation: every usable conversation once, in order, when max_batches is
    0; else max_batches batches from a fixed shuffled order (the same each call)."""
    usable = usable_conversations(data, block_size, "val")
    if max_batches:
        packer = Packer(usable, data.length, block_size + 1, seed=0)
        batches = ([packer.next_row() for _ in range(batch_size)] for _ in range(max_batches))
    else:
        every = pack_rows(usable, data.length, block_size + 1)
        batches = (every[i:i + batch_size] for i in range(0, len(every), batch_size))
    for rows in batches:
        yield batch_tensors(*data.pack(rows, block_size + 1), device)
