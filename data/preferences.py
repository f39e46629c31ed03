"""Preference data for DPO: pairs of replies to one prompt, the chosen one and the rejected one.

    {"prompt": [messages...] | "text", "chosen": "...", "rejected": "...", "task": "addition"}

one pair per JSONL line (`data.format: preference`; `python -m chat.tasks preference` writes
some). A text prompt is one user message; a message list is a conversation so far, ending with
a user message (chat/template.py's rules). `task` is optional, as in chat data.

Prep (data/prepare.py, through data/conversations.py's `encode_conversations`) renders each
pair as two chat conversations, prompt + chosen then prompt + rejected, one after the other in
the same split (the split is a hash of the whole line), so pair i of a split is conversations
2i and 2i + 1 of data/packing.py's `ConversationSplit`. meta.json says `"format": "preference"`.

Batches: a micro-batch of B pairs is (x, y) with 2B rows, the B chosen conversations first and
then the B rejected ones in the same order, one conversation per row (never packed: DPO needs
each sequence's log-probability on its own), right-padded to the longest row, each cut to
block_size + 1 tokens. Targets are IGNORE except on the completion: the final assistant reply
and its `<|assistant_end|>` (the template's mask after the last `<|assistant_start|>`), so the
prompt, earlier assistant turns of a multi-turn prompt and padding never count.

Design decisions:
- Every line is checked before prep writes anything, as for chat data; a pair whose chosen or
  rejected reply has no completion token within the window is skipped with a warning.
- Pairs are visited without replacement, in a fresh permutation of the usable pairs per epoch
  seeded by (seed, epoch). Each optimizer step takes world_size x grad_accum x batch_size
  consecutive pairs of that stream and rank r its own micro-batches, as data/loader.py's
  RandomWindows does, so the state is one count and a resume continues the exact sequence.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from chat.template import ConversationError, check_messages
from common.errors import UserError
from data.conversations import ChatCorpus
from data.loader import to_device
from data.packing import ConversationSplit
from data.sources import Utf8Errors, read_jsonl
from model.base import IGNORE

FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: Path, utf8: Utf8Errors | None = None, progress=lambda n: None) -> Iterator[tuple[dict, str]]:
    """(record with `prompt` as messages, "file:line") of every line, each checked; a bad line
    raises UserError naming its file and line."""
    for lineno, record in read_jsonl(Path(path), utf8 or Utf8Errors(), progress):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: a preference line is a JSON object with {', '.join(FIELDS)}, "
                            f"not a {type(record).__name__}")
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise UserError(f"{where}: no '{missing[0]}' field (a preference line has {', '.join(FIELDS)})")
        for f in ("chosen", "rejected"):
            if not isinstance(record[f], str):
                raise UserError(f"{where}: '{f}' must be a string, got {type(record[f]).__name__}")
            if not record[f].strip():
                raise UserError(f"{where}: '{f}' is empty")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        try:
            check_messages(prompt, for_generation=True)
            if prompt[-1]["role"] != "user":
                raise ConversationError("the prompt must end with a user message")
        except ConversationError as e:
            raise UserError(f"{where}: prompt: {e}") from None
        if not isinstance(record.get("task", ""), str):
            raise UserError(f"{where}: 'task' must be a string")
        yield {**record, "prompt": prompt}, where


class PreferenceCorpus(ChatCorpus):
    """Preference pairs of JSONL sources as chat conversations: chosen, then rejected."""

    def conversations(self, progress=lambda n: None) -> Iterator[tuple[list, str, str]]:
        from data.prepare import content_split

        self.utf8.by_source.clear()
        for src in self.sources:
            for record, where in read_pairs(src.path, self.utf8, progress):
                line = {f: record[f] for f in FIELDS}
                digest = hashlib.sha256(json.dumps(line, sort_keys=True).encode("utf-8", "surrogatepass")).digest()
                split = content_split(digest, self.val_fraction)
                for f in ("chosen", "rejected"):
                    yield [*record["prompt"], {"role": "assistant", "content": record[f]}], split, where


class PreferenceSplit:
    """One split of prepared preference data: pairs as (x, y) rows."""

    def __init__(self, prepared_dir: str | Path, split: str, block_size: int, warn=None):
        meta = json.loads((Path(prepared_dir) / "meta.json").read_text())
        self.conversations = ConversationSplit(prepared_dir, split)
        self.assistant_start = meta["assistant_start_id"]
        self.row_len = block_size + 1
        self.num_pairs = self.conversations.num_conversations // 2
        self.num_tokens = self.conversations.num_tokens
        self._rows = [self._row(c) for c in range(2 * self.num_pairs)]
        usable = [all(self._rows[2 * p + k][1].any() for k in (0, 1)) for p in range(self.num_pairs)]
        self.usable = np.flatnonzero(usable)
        if self.num_pairs and not len(self.usable):
            raise UserError(f"the {split} split has no preference pair whose replies both start within "
                            f"model.block_size={block_size} tokens; use shorter prompts or a larger block_size")
        if warn and len(self.usable) < self.num_pairs:
            warn(f"{self.num_pairs - len(self.usable)} of {self.num_pairs} {split} preference pairs have a reply "
                 f"beyond model.block_size={block_size} tokens and are skipped")

    def _row(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation c's tokens (at most row_len) and its completion mask over them."""
        data = self.conversations
        shard, start = data.shard[c], data.start[c]
        n = min(int(data.length[c]), self.row_len)
        tokens = np.asarray(data.tokens[shard][start:start + n], dtype=np.int64)
        mask = np.asarray(data.masks[shard][start:start + n], dtype=bool).copy()
        opened = np.flatnonzero(tokens == self.assistant_start)
        mask[:opened[-1] + 1 if len(opened) else n] = False  # the last reply only (and none if cut off)
        return tokens, mask

    def batch(self, pairs, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of 2 x len(pairs) rows: the chosen conversations, then the rejected ones."""
        rows = [self._rows[2 * p] for p in pairs] + [self._rows[2 * p + 1] for p in pairs]
        width = max(len(t) for t, _ in rows)
        tokens = np.zeros((len(rows), width), dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
        for r, (t, m) in enumerate(rows):
            tokens[r, :len(t)] = t
            targets[r, :len(t)] = np.where(m, t, IGNORE)
        device = torch.device(device)
        return to_device(tokens[:, :-1], device), to_device(targets[:, 1:], device)


class PreferenceBatches:
    """The training loader for preference pairs (data/loader.py's interface)."""

    kind = "preference"

    def __init__(self, data: PreferenceSplit, batch_size: int, seed: int, device, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1):
        if not len(data.usable):
            raise UserError("the train split holds no preference pair; use more pairs or another data.val_fraction")
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, torch.device(device)
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.batches = 0  # micro-batches handed out by this rank
        self._epoch, self._order = None, None

    def _pair(self, k: int) -> int:
        """The k-th pair of the stream: epochs of fresh permutations of the usable pairs."""
        epoch, i = divmod(k, len(self.data.usable))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.data.usable)
        return int(self._order[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = divmod(self.batches, self.grad_accum)
        first = ((step * self.world_size + self.rank) * self.grad_accum + micro) * self.batch_size
        self.batches += 1
        return self.data.batch([self._pair(k) for k in range(first, first + self.batch_size)], self.device)

    def state(self) -> dict:
        return {"sampling": self.kind, "batches": self.batches, "grad_accum": self.grad_accum}

    def load_state(self, state: dict):
        if state.get("sampling") != self.kind:
            raise UserError(f"the checkpoint's loader state is for data.sampling={state.get('sampling')}, "
                            f"not preference pairs")
        steps, micro = divmod(int(state["batches"]), int(state.get("grad_accum", self.grad_accum)))
        self.batches = steps * self.grad_accum + micro


def preference_batches(data: PreferenceSplit, batch_size: int, device, max_batches: int = 0):
    """Yield (x, y) for evaluation: every usable pair once, in order, or the first max_batches
    batches of them (the same each call)."""
    pairs = data.usable
    for i, start in enumerate(range(0, len(pairs), batch_size)):
        if max_batches and i == max_batches:
            return
        yield data.batch(pairs[start:start + batch_size], device)
