import json

import numpy as np
import pytest

from data.loader import RandomWindows, TokenSplit, eval_starts, eval_windows
from data.prepare import prepare
from data.tokenizer import CharTokenizer, build_tokenizer, from_state
from common.errors import UserError


def gpt2_or_skip():
    try:
        return build_tokenizer("gpt2")
    except UserError as e:
        pytest.skip(f"GPT-2 vocabulary not loadable offline: {e}")


def test_char_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))
    assert from_state(tok.state()).encode(text) == tok.encode(text)


def test_char_unknown_character_is_a_user_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match="not in the char vocabulary"):
        tok.encode("abz")


def test_gpt2_round_trip():
    tok = gpt2_or_skip()
    text = "Hello world, thou art 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — ünïcödé!"
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50257 and tok.eot_id == 50256


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_prep_output_equals_tokenizer_on_source(tokenizer, tiny_corpus, tmp_path):
    if tokenizer == "gpt2":
        gpt2_or_skip()
    out = prepare([str(tiny_corpus)], tokenizer, tmp_path / "prep", val_fraction=0.1, log=lambda *_: None)
    meta = json.loads((out / "meta.json").read_text())
    text = tiny_corpus.read_text()
    tok = from_state(meta["tokenizer"])
    cut = len(text) - int(len(text) * 0.1)  # the last tenth of the (ASCII) bytes is val
    stored = {split: np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"])
                                     for s in meta["splits"][split]]).tolist() for split in ("train", "val")}
    assert stored["train"] == tok.encode(text[:cut]) and stored["val"] == tok.encode(text[cut:])
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size


def test_prep_reruns_only_when_stale(tiny_corpus, tmp_path):
    messages = []
    src = tmp_path / "corpus.txt"
    src.write_text(tiny_corpus.read_text())
    prepare([str(src)], "char", tmp_path / "prep", log=messages.append)
    prepare([str(src)], "char", tmp_path / "prep", log=messages.append)
    assert len([m for m in messages if m.startswith("preparing")]) == 1
    src.write_text(src.read_text() + "\nA new line appended.\n")
    prepare([str(src)], "char", tmp_path / "prep", log=messages.append)
    assert any("stale" in m for m in messages)


def test_random_windows_are_next_token_pairs_and_resumable(tiny_corpus, tmp_path):
    out = prepare([str(tiny_corpus)], "char", tmp_path / "prep", log=lambda *_: None)
    import torch

    split = TokenSplit(out, "train")
    loader = RandomWindows(split, batch_size=4, block_size=16, seed=3, device=torch.device("cpu"))
    x, y = loader.next_batch()
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    state = loader.state()
    after = [loader.next_batch() for _ in range(3)]
    resumed = RandomWindows(split, batch_size=4, block_size=16, seed=3, device=torch.device("cpu"))
    resumed.load_state(state)
    for (ax, ay), (bx, by) in zip(after, (resumed.next_batch() for _ in range(3))):
        assert torch.equal(ax, bx) and torch.equal(ay, by)


def test_eval_windows_cover_the_whole_split(tiny_corpus, tmp_path):
    import torch

    out = prepare([str(tiny_corpus)], "char", tmp_path / "prep", log=lambda *_: None)
    split = TokenSplit(out, "val")
    seen = sum(y.numel() for _, y in eval_windows(split, eval_starts(split, 16), 5, 16, torch.device("cpu")))
    assert seen == (split.num_tokens - 1) // 16 * 16
