"""Tokenizers: one small interface for every kind, and a plain-data state that travels.

Every tokenizer has `name`, `vocab_size`, `eot_id` (None where the kind has no end-of-text
token), `special_tokens` (string -> id of every special token), `encode(text) -> list[int]`,
`encode_array(text) -> np.ndarray` (what prep uses: no Python int per token), `decode(ids) ->
str`, `decode_bytes(ids) -> bytes` (so a streaming sampler can emit whole UTF-8 characters even
when a character spans tokens), `token_bytes() -> np.ndarray` (how many UTF-8 bytes each id
decodes to, 0 for special tokens: what bits per byte divides by) and `state() -> dict` of
strings and ints. The state is stored in meta.json and in every checkpoint, and `from_state`
rebuilds the tokenizer from it alone, so sampling needs neither the corpus nor the network.

Kinds:
- `char`: the vocabulary is the sorted set of characters in the corpus, kept in the state. A
  multi-document corpus adds one separator character (`CHAR_SEPARATOR`, ASCII "end of text")
  between documents; it is then part of the vocabulary and is the tokenizer's `eot_id`.
- `gpt2`, `r50k_base`, `cl100k_base`, `o200k_base`: OpenAI's byte-level BPE encodings through
  tiktoken. tiktoken downloads a vocabulary once and caches it (offline it reads
  `TIKTOKEN_CACHE_DIR`); that is needed only to prepare data.
- `bpe`: the project's own byte-level BPE (`data/bpe.py`) trained on the corpus, run by
  tiktoken's Rust encoder so it encodes as fast as GPT-2's.

Both BPE families are a `TiktokenTokenizer`, and its state holds the full ranks (tiktoken's
ranks-file text, about 0.8 MB for gpt2, 3.6 MB for o200k_base), the split pattern and the
special tokens, not just a name: a checkpoint then rebuilds its tokenizer with no tiktoken cache
and no network, at a cost that is negligible next to the embedding matrix of such a vocabulary.

Chat tokens (`with_chat_tokens`; the strings are chat/template.py's `SPECIAL_TOKENS`) are special
tokens added after a tokenizer's vocabulary, in every family alike: after the characters of a
`char` vocabulary, after the merges and `<|endoftext|>` of the project's `bpe`, and after an
OpenAI encoding's last id, where they land in the rows that `padded_vocab` already pads the
model to (gpt2: 50257 -> 50304), so such a model needs no new rows. Adding them after the
vocabulary, rather than reserving ids in every tokenizer from the start, leaves every existing
tokenizer, prepared folder and checkpoint as it is; a base model meets them at fine-tuning,
where `init_from` grows its vocabulary. `encode` never produces a special id (special strings
in text are ordinary text), `decode` renders one as its string, and `state()` carries them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from common.errors import UserError

TIKTOKEN_ENCODINGS = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")
TOKENIZERS = ("char", *TIKTOKEN_ENCODINGS, "bpe")
EOT = "<|endoftext|>"
CHAR_SEPARATOR = "\x03"  # ASCII ETX, "end of text": joins documents at the character level


def check_tokenizer_name(name: str, key: str = "data.tokenizer"):
    if name not in TOKENIZERS:
        raise UserError(f"{key}={name!r} is not one of: {', '.join(TOKENIZERS)}")


class CharTokenizer:
    name = "char"

    def __init__(self, chars: str, separator: str | None = None, specials: tuple[str, ...] = ()):
        if separator is not None and separator not in chars:
            chars = "".join(sorted(set(chars) | {separator}))
        self.chars, self.separator, self.specials = chars, separator, tuple(specials)
        self.special_tokens = {t: len(chars) + i for i, t in enumerate(self.specials)}  # ids after the characters
        self.vocab_size = len(chars) + len(self.specials)
        self.eot_id = chars.index(separator) if separator is not None else None
        # Code-point lookup table: encoding a corpus is one numpy gather, not a Python loop.
        self._table = np.full(max(map(ord, chars), default=0) + 1, -1, dtype=np.int64)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str, separator: str | None = None) -> "CharTokenizer":
        return cls("".join(sorted(set(text))), separator)

    @classmethod
    def from_code_points(cls, present: np.ndarray, separator: str | None = None) -> "CharTokenizer":
        """From a boolean array indexed by code point (what prep's vocabulary pass collects)."""
        return cls("".join(map(chr, np.flatnonzero(present))), separator)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        if (ids < 0).any():
            missing = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise UserError(f"characters not in the char vocabulary: {''.join(missing)!r} "
                            f"(the vocabulary has {len(self.chars)} characters from the training corpus)")
        return ids

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else self.specials[i - n] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def token_bytes(self) -> np.ndarray:
        counts = [len(c.encode("utf-8", "surrogatepass")) for c in self.chars] + [0] * len(self.specials)
        return np.array(counts, dtype=np.int64)

    def state(self) -> dict:
        state = {"kind": "char", "chars": self.chars}
        if self.separator is not None:
            state["separator"] = self.separator
        if self.specials:
            state["special_tokens"] = list(self.specials)
        return state


class TiktokenTokenizer:
    """A byte-level BPE in tiktoken's format: an OpenAI encoding or one trained by `data/bpe.py`."""

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int],
                 eot: str = EOT):
        import tiktoken

        self.name, self.ranks, self.pattern, self.special_tokens = name, ranks, pattern, dict(special_tokens)
        self.eot = eot  # the special token that ends a document (an imported tokenizer may name it otherwise)
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.special_tokens.get(eot)

    @classmethod
    def openai(cls, name: str) -> "TiktokenTokenizer":
        """One of OpenAI's encodings, from tiktoken's cache or a one-time download."""
        from tiktoken_ext import openai_public

        try:
            params = openai_public.ENCODING_CONSTRUCTORS[name]()
        except Exception as e:  # network or cache failure surfaces as many exception types
            first_line = (str(e).splitlines() or [""])[0][:200]
            raise UserError(
                f"could not load the tiktoken vocabulary {name!r} ({type(e).__name__}: {first_line}); "
                f"tiktoken downloads it on first use. To pre-seed it, run TIKTOKEN_CACHE_DIR=DIR python -c "
                f"\"import tiktoken; tiktoken.get_encoding('{name}')\" on a machine with network, copy DIR "
                f"here and set TIKTOKEN_CACHE_DIR=DIR") from None
        return cls(name, params["mergeable_ranks"], params["pat_str"], params["special_tokens"])

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, num_proc: int | None = None,
              progress: bool = False) -> "TiktokenTokenizer":
        """The project's BPE learnt from `texts` (documents); `vocab_size` counts the EOT token."""
        from data.bpe import GPT4_SPLIT_PATTERN, train_bpe

        try:
            ranks = train_bpe(texts, vocab_size, GPT4_SPLIT_PATTERN, (EOT,), progress=progress, num_proc=num_proc)
        except ValueError as e:
            raise UserError(f"data.bpe_vocab_size={vocab_size}: {e}") from None
        return cls("bpe", ranks, GPT4_SPLIT_PATTERN, {EOT: len(ranks)})

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # Equivalent to encode_ordinary (no special tokens recognised), but tokens land in one
        # buffer without a Python int each, and the GIL is released while encoding.
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self) -> np.ndarray:
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for token, rank in self.ranks.items():  # special tokens stay 0: they are not text
            counts[rank] = len(token)
        return counts

    def state(self) -> dict:
        from data.bpe import ranks_to_text

        state = {"kind": "tiktoken", "name": self.name, "pattern": self.pattern,
                 "special_tokens": dict(self.special_tokens), "ranks": ranks_to_text(self.ranks)}
        if self.eot != EOT:
            state["eot"] = self.eot
        return state


def build_tokenizer(name: str, text: str | Iterable[str] | None = None, bpe_vocab_size: int = 4096,
                    num_proc: int | None = None):
    """A tokenizer by config name; `char` learns its vocabulary from `text`, `bpe` its merges from
    `text` (one string or an iterable of documents)."""
    check_tokenizer_name(name)
    if name in TIKTOKEN_ENCODINGS:
        return TiktokenTokenizer.openai(name)
    if text is None:
        raise ValueError(f"the {name} tokenizer needs the corpus text to learn its vocabulary")
    if name == "char":
        return CharTokenizer.from_text(text if isinstance(text, str) else "".join(text))
    return TiktokenTokenizer.train([text] if isinstance(text, str) else text, bpe_vocab_size, num_proc)


def with_chat_tokens(tokenizer):
    """The tokenizer with the chat template's special tokens after its vocabulary (the module
    docstring says where), or the tokenizer itself when it has them all."""
    from chat.template import SPECIAL_TOKENS

    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        return CharTokenizer(tokenizer.chars, tokenizer.separator, tokenizer.specials + tuple(missing))
    special = dict(tokenizer.special_tokens)
    special.update({t: tokenizer.vocab_size + i for i, t in enumerate(missing)})
    return TiktokenTokenizer(tokenizer.name, tokenizer.ranks, tokenizer.pattern, special)


def from_state(state: dict):
    """Rebuild a tokenizer from the plain-data state stored in meta.json and checkpoints."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char":
        return CharTokenizer(state["chars"], state.get("separator"), tuple(state.get("special_tokens", ())))
    if kind == "tiktoken" and "ranks" in state:
        from data.bpe import ranks_from_text

        return TiktokenTokenizer(state["name"], ranks_from_text(state["ranks"]), state["pattern"],
                                 state["special_tokens"], state.get("eot", EOT))
    if kind == "tiktoken":  # a name only, as the first format stored: needs tiktoken's cache
        return TiktokenTokenizer.openai(state["name"])
    raise UserError(f"unknown tokenizer state {str(state)[:200]}")
