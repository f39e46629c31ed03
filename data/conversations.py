"""Chat data: conversations in JSONL -> token shards with a mask shard beside each.

    python -m data.prepare --input FILE.jsonl ... --format chat --tokenizer NAME | --tokenizer-from RUN_DIR

One conversation per line, as the ecosystem writes them (OpenAI's chat format):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "task": "addition"}
The optional `task` names how `evaluate.py` extracts the answer (chat/tasks.py); other keys are
ignored. `data/prepare.py` calls in here when `data.format` is `chat`.

Output, beside the text format's (see data/prepare.py):
    train_000000.bin       the rendered conversations (chat/template.py), one after another
    train_000000.mask.bin  uint8, as long as its token shard: 1 where that token is a trained
                           target (assistant text and its end token), 0 elsewhere
    meta.json              `"format": "chat"`, `bos_id`, each shard's mask file, and the
                           numbers of conversations and trained targets per split

Design decisions:
- Every line is checked before anything is written (a first, cheap pass that parses JSON only),
  so a bad line stops prep with its file and line and leaves the folder as it was: a long prep
  never dies at line 90,000 after clearing the previous one.
- A shard holds whole conversations, and each starts with `<|bos|>` (an id no text encodes to),
  so the loader finds them by scanning for it: no index file to keep consistent.
  Truncation to the context window happens when batches are packed (data/packing.py), so one
  prepared folder serves models of any block_size.
- The split is by conversation and deterministic, as for records: the sha256 of the line's
  messages decides, so adding files never moves a conversation between train and val.
- The tokenizer is named (`char` and `bpe` learn from the messages' text) or given (a base
  model's, with `init_from` or `--tokenizer-from`), and gains the chat tokens here when it
  lacks them (data/tokenizer.py `with_chat_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chat.template import ChatTemplate, ConversationError, check_messages
from common.errors import UserError
from data.sources import Source, Utf8Errors, read_jsonl


def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def read_conversations(path: Path, utf8: Utf8Errors | None = None, progress=lambda n: None) -> Iterator[tuple[dict, str]]:
    """(record, "file:line") of every line of a chat JSONL file, each checked: a JSON object
    whose `messages` make a training conversation (chat/template.py) and whose optional `task`
    is a string. A bad line raises UserError naming its file and line."""
    for lineno, record in read_jsonl(Path(path), utf8 or Utf8Errors(), progress):
        where = _where(path, lineno)
        if not isinstance(record, dict) or "messages" not in record:
            found = f"keys: {', '.join(list(record)[:8])}" if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{where}: no 'messages' field ({found})")
        try:
            check_messages(record["messages"])
        except ConversationError as e:
            raise UserError(f"{where}: {e}") from None
        if not isinstance(record.get("task", ""), str):
            raise UserError(f"{where}: 'task' must be a string")
        yield record, where


class ChatCorpus:
    """The conversations of some JSONL sources, re-readable for each pass. Also what
    data/prepare.py's tokenizer training reads (`pieces`: every message's text)."""

    by_position = False  # as data/prepare.py's Corpus: documents, never one text split by position

    def __init__(self, sources: list[Source], val_fraction: float):
        not_jsonl = [s.name for s in sources if s.kind != "jsonl"]
        if not_jsonl:
            raise UserError(f"data.format=chat reads conversations from .jsonl files; {not_jsonl[0]} is not one")
        self.sources, self.val_fraction = sources, val_fraction
        self.total_bytes = sum(s.size for s in sources)
        self.utf8 = Utf8Errors()

    def conversations(self, progress=lambda n: None) -> Iterator[tuple[list, str, str]]:
        """(messages, split, "file:line") of every conversation, each checked."""
        from data.prepare import content_split

        self.utf8.by_source.clear()
        for src in self.sources:
            for record, where in read_conversations(src.path, self.utf8, progress):
                messages = record["messages"]
                digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8", "surrogatepass")).digest()
                yield messages, content_split(digest, self.val_fraction), where

    def check(self):
        """Read every line once, so a bad one stops prep before anything is written."""
        for _ in self.conversations():
            pass

    def pieces(self, progress=lambda n: None) -> Iterator[tuple[str, str, bool]]:
        for messages, split, _ in self.conversations(progress):
            for m in messages:
                yield m["content"], split, True
                if m.get("tool_call"):
                    yield m["tool_call"], split, True

    def progress_bar(self, desc: str):
        return tqdm(total=self.total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    dynamic_ncols=True, disable=None, leave=False)


def encode_conversations(corpus: ChatCorpus, tok, out_dir: Path, shard_tokens: int, log) -> dict:
    """Render every conversation into token and mask shards; returns meta.json's contents."""
    from data.prepare import FORMAT_VERSION, ShardWriter, token_dtype

    template = ChatTemplate(tok)
    dtype = token_dtype(tok.vocab_size)
    writers = {split: (ShardWriter(out_dir, split, dtype, shard_tokens),
                       ShardWriter(out_dir, split, np.dtype(np.uint8), shard_tokens, suffix=".mask.bin"))
               for split in ("train", "val")}
    tokens, conversations, trained = Counter(), Counter(), Counter()
    t0 = time.perf_counter()
    try:
        with corpus.progress_bar("rendering conversations") as bar:
            for messages, split, where in corpus.conversations(bar.update):
                try:
                    ids, mask = template.render(messages)
                except UserError as e:  # a char vocabulary that lacks some character
                    raise UserError(f"{where}: {e}") from None
                ids_w, mask_w = writers[split]
                ids_w.write_whole(np.array(ids, dtype=dtype))
                mask_w.write_whole(np.array(mask, dtype=np.uint8))
                tokens[split] += len(ids)
                trained[split] += sum(mask)
                conversations[split] += 1
        splits = {split: [{**s, "mask": m["file"]} for s, m in zip(ids_w.finish(), mask_w.finish())]
                  for split, (ids_w, mask_w) in writers.items()}
    except BaseException:
        for pair in writers.values():
            for w in pair:
                w.abort()
        raise
    total = sum(conversations.values())
    if total == 0:
        raise UserError("data.input: no conversation in " + ", ".join(s.name for s in corpus.sources))
    if not conversations["val"] or not conversations["train"]:
        empty = "val" if not conversations["val"] else "train"
        log(f"warning: the {empty} split is empty: no conversation of {total} fell in it with "
            f"val_fraction={corpus.val_fraction}; use more conversations or another val_fraction")
    seconds = time.perf_counter() - t0
    log(f"prepared {total:,} conversations (train {conversations['train']:,}, val {conversations['val']:,}): "
        f"{sum(tokens.values()):,} tokens, {sum(trained.values()):,} of them trained targets; vocabulary "
        f"{tok.vocab_size}, {dtype.name}; {seconds:.1f}s")
    return {
        "format_version": FORMAT_VERSION,
        "format": "chat",
        "tokenizer": tok.state(),
        "vocab_size": tok.vocab_size,
        "eot_id": None,
        "bos_id": template.bos_id,
        "document_separator": None,
        "dtype": dtype.name,
        "splits": splits,
        "tokens": dict(train=tokens["train"], val=tokens["val"]),
        "trained_tokens": dict(train=trained["train"], val=trained["val"]),
        "documents": dict(train=conversations["train"], val=conversations["val"]),
        "split_by": "document",
        "invalid_utf8": dict(corpus.utf8.by_source),
    }
