"""Tokenizers: one small interface for every kind, and a plain-data state that travels.

Every tokenizer has `name`, `vocab_size`, `eot_id` (None where the kind has no end-of-text
token), `encode(text) -> list[int]`, `decode(ids) -> str`, `decode_bytes(ids) -> bytes` (so a
streaming sampler can emit whole UTF-8 characters even when a character spans tokens) and
`state() -> dict` of strings and ints. The state is stored in meta.json and in every checkpoint,
and `from_state` rebuilds the tokenizer from it alone, so sampling never needs the corpus.

Kinds:
- `char`: the vocabulary is the sorted set of characters in the corpus, kept in the state.
- `gpt2`: OpenAI's GPT-2 BPE through tiktoken. tiktoken downloads its vocabulary once and
  caches it; offline it reads `TIKTOKEN_CACHE_DIR`.
"""

from __future__ import annotations

import numpy as np

from trainer.errors import UserError

TOKENIZERS = ("char", "gpt2")


class CharTokenizer:
    name = "char"
    eot_id = None

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        # Code-point lookup table: encoding a corpus is one numpy gather, not a Python loop.
        self._table = np.full(max(map(ord, chars), default=0) + 1, -1, dtype=np.int64)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        if (ids < 0).any():
            missing = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise UserError(f"characters not in the char vocabulary: {''.join(missing)!r} "
                            f"(the vocabulary has {self.vocab_size} characters from the training corpus)")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class TiktokenTokenizer:
    def __init__(self, name: str):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # network or cache failure surfaces as many exception types
            raise UserError(
                f"could not load the tiktoken vocabulary {name!r} ({type(e).__name__}: {e}); it is "
                f"downloaded once on first use, so connect once or point TIKTOKEN_CACHE_DIR at a "
                f"folder that holds tiktoken's cached files") from None
        self.name = name
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def state(self) -> dict:
        return {"kind": "tiktoken", "name": self.name}


def build_tokenizer(name: str, text: str | None = None):
    """A tokenizer by config name; `char` learns its vocabulary from `text`."""
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer needs the corpus text to build its vocabulary")
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return TiktokenTokenizer(name)
    raise UserError(f"data.tokenizer={name!r} is not one of: {', '.join(TOKENIZERS)}")


def from_state(state: dict):
    """Rebuild a tokenizer from the plain-data state stored in meta.json and checkpoints."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(state["name"])
    raise UserError(f"unknown tokenizer state {state!r}")
