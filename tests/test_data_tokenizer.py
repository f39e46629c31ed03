"""Tokenizers: round trips for every kind, and states that rebuild with no cache or network."""

import io
import json
import random

import pytest
import tiktoken.load
import torch

from data.tokenizer import (CHAR_SEPARATOR, TOKENIZERS, CharTokenizer, TiktokenTokenizer, build_tokenizer,
                            from_state)
from trainer.config import load_config
from common.errors import UserError

UNICODE = ("Hello, world! naïve café déjà vu — Ünïcödé ñ 日本語のテキスト 中文 한국어 "
           "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷 math ∑∫√ tabs\tand\nnewlines\r\n  <|endoftext|> spaces   ")


def random_unicode(rng: random.Random, n: int) -> str:
    """Any code point but surrogates, which UTF-8 cannot carry."""
    points = [rng.choice((rng.randrange(32, 0x7F), rng.randrange(0xA0, 0xD800), rng.randrange(0xE000, 0x110000)))
              for _ in range(n)]
    return "".join(map(chr, points))


def offline(*args, **kwargs):
    raise ConnectionError("no network in the tests")


def openai_or_skip(name):
    """The encoding from tiktoken's cache only: a cache miss skips instead of downloading."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiktoken.load, "read_file", offline)
        try:
            return TiktokenTokenizer.openai(name)
        except UserError:
            pytest.skip(f"{name} is not in TIKTOKEN_CACHE_DIR (the offline cache holds gpt2 and r50k_base)")


@pytest.fixture(scope="module")
def trained_bpe():
    rng = random.Random(0)
    docs = [UNICODE] * 3 + [" ".join(rng.choice(["the", "cat", "sat", "on", "mat", "日本", "café", "😀"])
                                     for _ in range(50)) for _ in range(40)]
    return TiktokenTokenizer.train(docs, 400, num_proc=1)


def test_char_round_trip_and_separator():
    tok = CharTokenizer.from_text("hello world", separator=CHAR_SEPARATOR)
    assert tok.vocab_size == len(set("hello world")) + 1 and tok.chars[tok.eot_id] == CHAR_SEPARATOR
    assert tok.decode(tok.encode("low" + CHAR_SEPARATOR + "red")) == "low" + CHAR_SEPARATOR + "red"
    again = from_state(json.loads(json.dumps(tok.state())))
    assert again.chars == tok.chars and again.eot_id == tok.eot_id
    assert CharTokenizer.from_text("abc").eot_id is None
    with pytest.raises(UserError, match="not in the char vocabulary"):
        tok.encode("xyz")


@pytest.mark.parametrize("name", ["gpt2", "r50k_base", "cl100k_base", "o200k_base"])
def test_openai_encodings_round_trip(name):
    tok = openai_or_skip(name)
    text = UNICODE + random_unicode(random.Random(1), 300)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text).tolist() == tok.encode(text)  # <|endoftext|> stays plain text
    assert tok.eot_id is not None and tok.vocab_size > tok.eot_id


def test_trained_bpe_round_trips_any_unicode(trained_bpe):
    tok = trained_bpe
    assert tok.vocab_size == 400 and tok.eot_id == 399
    assert len(tok.encode("the cat sat")) < len("the cat sat".encode())  # it learnt merges
    rng = random.Random(2)
    for text in [UNICODE, "", " ", "\n\n\n"] + [random_unicode(rng, rng.randrange(1, 200)) for _ in range(20)]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_bpe_state_rebuilds_without_corpus(trained_bpe):
    state = json.loads(json.dumps(trained_bpe.state()))
    again = from_state(state)
    assert again.encode(UNICODE) == trained_bpe.encode(UNICODE) and again.vocab_size == 400


def test_gpt2_state_needs_no_cache_or_network(tmp_path, monkeypatch):
    tok = openai_or_skip("gpt2")
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.state()}, buf)  # travels inside a checkpoint
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["tokenizer"]

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    again = from_state(state)
    assert again.encode(UNICODE) == tok.encode(UNICODE) and again.vocab_size == 50257


def test_vocabulary_download_failure_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(UserError, match="could not load the tiktoken vocabulary 'gpt2'.*TIKTOKEN_CACHE_DIR"):
        build_tokenizer("gpt2")


def test_unknown_tokenizer_lists_valid_ones():
    with pytest.raises(UserError, match="data.tokenizer='gpt3' is not one of: " + ", ".join(TOKENIZERS)):
        build_tokenizer("gpt3")
    with pytest.raises(UserError, match="data.tokenizer='gpt3' is not one of"):
        load_config(None, ["data.tokenizer=gpt3"])
    with pytest.raises(UserError, match="data.bpe_vocab_size=100 must be >= 257"):
        load_config(None, ["data.bpe_vocab_size=100"])
    with pytest.raises(UserError, match="data.sampling"):
        load_config(None, ["data.sampling=shuffled"])


def test_bpe_on_too_small_corpus_names_the_key():
    with pytest.raises(UserError, match="data.bpe_vocab_size=5000"):
        TiktokenTokenizer.train(["tiny corpus"], 5000, num_proc=1)
