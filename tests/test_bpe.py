import os
import random
from collections import Counter

import pytest
import regex

from data import bpe
from data.bpe import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    load_tiktoken_bpe,
    make_encoding,
    save_tiktoken_bpe,
    train_bpe,
)

WORDS = ("the quick brown fox jumps over lazy dog and then she said that it's a "
         "lovely day in the neighbourhood but we'll never know what they've done "
         "with 12 apples, 345 pears & 6789 plums; naïve café déjà vu").split()


SYLLABLES = "ka lo mi ne ru sta tre quo pli an ed ing ous ver ther ment al".split()


def make_docs(n_docs: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # Made-up words widen the vocabulary enough to leave hundreds of merges to learn.
    words = list(WORDS) + ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(400)]
    weights = [1 / rank for rank in range(1, len(words) + 1)]  # Zipf, like natural text
    docs = []
    for _ in range(n_docs):
        lines = [" ".join(rng.choices(words, weights=weights, k=rng.randint(3, 15)))
                 for _ in range(rng.randint(1, 6))]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs()


@pytest.fixture(scope="module")
def ranks(docs) -> dict[bytes, int]:
    return train_bpe(docs, 600)


def naive_bpe(texts: list[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    """Textbook BPE: recount every pair over the whole corpus before each merge."""
    words = [list(w.encode("utf-8")) for t in texts for w in regex.findall(pattern, t)]
    vocab = [bytes([b]) for b in range(256)]
    ranks = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < n_ranks:
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        a, b = min(pairs, key=lambda p: (-pairs[p], vocab[p[0]], vocab[p[1]]))
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        ranks[vocab[new_id]] = new_id
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return ranks


def test_vocab_size_is_exact(ranks):
    assert len(ranks) == 600 - 1
    assert sorted(ranks.values()) == list(range(599))
    assert all(ranks[bytes([b])] == b for b in range(256))
    enc = make_encoding("test", ranks)
    assert enc.n_vocab == 600
    assert enc.eot_token == 599


@pytest.mark.parametrize("pattern", [GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN])
def test_matches_naive_reference(docs, pattern):
    toy = docs[:40]
    assert train_bpe(toy, 256 + 80 + 1, pattern=pattern) == naive_bpe(toy, 256 + 80, pattern)


def test_round_trip_including_unseen_bytes(ranks):
    enc = make_encoding("test", ranks)
    text = ("the quick brown fox 🦙🔥 日本語のテキスト Ünïcödé\u200b zero\x00byte\ttab\r\n"
            "  spaces   and <|endoftext|> as plain text, ﷽, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff")
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(ids) == text.encode("utf-8")
    # Bytes never seen in training still encode, as single-byte tokens.
    assert enc.encode_ordinary("🦙") == list("🦙".encode("utf-8"))


def test_merges_compress_training_text(docs, ranks):
    enc = make_encoding("test", ranks)
    text = "\n\n".join(docs)
    assert len(enc.encode_ordinary(text)) < 0.5 * len(text.encode("utf-8"))


def test_deterministic_across_runs_order_and_processes(docs, ranks, monkeypatch):
    assert train_bpe(docs, 600) == ranks
    assert train_bpe(list(reversed(docs)), 600, num_proc=1) == ranks
    # Small batches force the multiprocessing path on this small corpus.
    monkeypatch.setattr(bpe, "_BATCH_CHARS", 2000)
    assert train_bpe(iter(docs), 600, num_proc=2) == ranks


def test_save_load_round_trip(tmp_path, ranks):
    path = tmp_path / "tok.tiktoken"
    save_tiktoken_bpe(ranks, path)
    assert load_tiktoken_bpe(path) == ranks
    # Overwriting in place must be seen on the next load (no stale cache).
    smaller = {t: r for t, r in ranks.items() if r < 300}
    save_tiktoken_bpe(smaller, str(path))
    assert load_tiktoken_bpe(path) == smaller
    assert os.listdir(tmp_path) == ["tok.tiktoken"]


def test_special_token(docs):
    ranks = train_bpe(["<|endoftext|>".join(docs)], 400, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert len(ranks) == 398
    # Text was split around the special token, so no merge learned from it.
    assert not any(b"<|" in token or b"|>" in token for token in ranks)
    enc = make_encoding("test", ranks, special_tokens=["<|endoftext|>", "<|pad|>"])
    ids = enc.encode("fox<|endoftext|>dog<|pad|>", allowed_special="all")
    assert ids[-1] == 399 and 398 in ids
    assert enc.decode(ids) == "fox<|endoftext|>dog<|pad|>"
    assert 398 not in enc.encode_ordinary("fox<|endoftext|>dog")


def test_bad_sizes_raise(docs):
    with pytest.raises(ValueError, match="no room"):
        train_bpe(docs, 256)
    with pytest.raises(ValueError, match="corpus too small"):
        train_bpe(["ab ab"], 300)
