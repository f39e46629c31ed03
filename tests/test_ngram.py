"""The n-gram family (model/ngram.py) and its counting run (trainer/count.py): Kneser-Ney against
numbers worked out by hand and against a reference written from the definition, distributions
that sum to 1, chunked counting, exact resume, generation, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import signal
import threading
from collections import Counter
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
import torch

import sample
import train
import trainer.count
import trainer.signals
from common.errors import UserError
from model.base import Recompute
from model.ngram import Ngram, NgramConfig
from tests.conftest import REPO
from tests.test_faults import fails, snapshot
from trainer.checkpoint import BEST, LATEST, load_checkpoint
from trainer.config import load_config


def counted(text: str, alphabet: str, order: int, **kw) -> Ngram:
    model = Ngram(NgramConfig(vocab_size=len(alphabet), block_size=16, ngram_order=order, **kw))
    model.count(np.array([alphabet.index(c) for c in text]), len(text))
    return model


def next_probs(model: Ngram, contexts: list[str], alphabet: str) -> torch.Tensor:
    """P(. | context) for each context (all of one length), in float64."""
    idx = torch.tensor([[alphabet.index(c) for c in ctx] for ctx in contexts])
    return model.log_probs(idx)[:, -1].double().exp()


# Kneser-Ney, by hand and from the definition ------------------------------------------------------


def test_kneser_ney_matches_a_hand_computed_example():
    # "abracadabra", order 3. Trigram counts: abr 2, bra 2, rac aca cad ada dab 1 each, so
    # D3 = n1 / (n1 + 2 n2) = 5 / (5 + 2*2) = 5/9. Bigram continuations (distinct left
    # neighbours): br ra ac ca ad da ab 1 each (the first "ab" has none), so D2 = 7/7 = 1.
    # Unigram continuations, from the distinct bigrams: a 3 (r_, c_, d_), b c d r 1 each; D1 = 1,
    # so P1(a) = (3 - 1)/7 + 1 * 5/7 * 1/5 = 3/7 and P1(b) = P1(c) = P1(d) = P1(r) = 1/7.
    # With D2 = 1 and every continuation 1, P2(w | x) = P1(w) for every seen x.
    abc = "abcdr"
    model = counted("abracadabra", abc, order=3)
    P1 = {"a": Fraction(3, 7), "b": Fraction(1, 7), "c": Fraction(1, 7), "d": Fraction(1, 7), "r": Fraction(1, 7)}
    D3 = Fraction(5, 9)
    # P(a | br): c(bra) = 2, c(br.) = 2, one follower type.
    expected = {("br", "a"): (2 - D3) / 2 + D3 * 1 / 2 * P1["a"],  # = 53/63
                ("br", "c"): D3 * 1 / 2 * P1["c"],
                ("ca", "d"): (1 - D3) / 1 + D3 * 1 / 1 * P1["d"],  # = 11/21
                ("rr", "a"): P1["a"],  # "rr" never seen: the bigram "r" then P1
                ("dd", "b"): P1["b"]}  # nor "dd" or "d" followed by "d": P2(b | d) = P1(b)
    # One token of context (a window's first position) is the bigram model: occurrence counts
    # for the bigrams (ab br ra 2, ac ca ad da 1: D = 4 / (4 + 2*3) = 2/5), continuations below.
    D2 = Fraction(2, 5)
    expected |= {("b", "r"): (2 - D2) / 2 + D2 * 1 / 2 * P1["r"],  # = 29/35
                 ("b", "a"): D2 * 1 / 2 * P1["a"],
                 ("a", "c"): (1 - D2) / 4 + D2 * 3 / 4 * P1["c"]}  # a: ab 2, ac 1, ad 1
    assert expected[("br", "a")] == Fraction(53, 63) and expected[("b", "r")] == Fraction(29, 35)
    for (context, token), p in expected.items():
        got = next_probs(model, [context], abc)[0, abc.index(token)].item()
        assert got == pytest.approx(float(p), rel=1e-6), (context, token)


def reference(text, alphabet, n: int, smoothing: str, k: float = 1.0):
    """P(w | context) straight from the definitions (model/ngram.py's docstring), with dicts; text
    and context are strings of letters of alphabet, or tuples of token ids with range(V)."""
    occurrences = {j: Counter(text[i:i + j] for i in range(len(text) - j + 1)) for j in range(1, n + 1)}
    continuations = {j: Counter(g[1:] for g in occurrences[j + 1]) for j in range(1, n)}

    def discount(counts):
        n1, n2 = sum(c == 1 for c in counts.values()), sum(c == 2 for c in counts.values())
        return n1 / (n1 + 2 * n2) if n1 else 0.5

    def kn(w, h, top):
        order = len(h) + 1
        counts = occurrences[order] if order == top else continuations[order]
        followers = {g[-1]: c for g, c in counts.items() if g[:-1] == h and c > 0}
        total, lower = sum(followers.values()), kn(w, h[1:], top) if order > 1 else 1 / len(alphabet)
        if not total:
            return lower
        D = discount(counts)
        return max(followers.get(w, 0) - D, 0) / total + D * len(followers) / total * lower

    def p(w, context):
        h = context[-(n - 1):] if n > 1 else ""
        if smoothing == "add_k":
            followers = {g[-1]: c for g, c in occurrences[len(h) + 1].items() if g[:-1] == h}
            return (followers.get(w, 0) + k) / (sum(followers.values()) + k * len(alphabet))
        return kn(w, h, top=len(h) + 1)

    return p


@pytest.mark.parametrize("smoothing", ["kneser_ney", "add_k"])
def test_every_context_gets_a_distribution_equal_to_the_definitions(smoothing):
    """Every context of every length up to n-1 over the vocabulary, seen or not (the vocabulary
    has a letter the text never uses): the model's distribution sums to 1 and equals the
    reference's, token for token."""
    rng = random.Random(0)
    alphabet, n = "abcde", 4
    text = "".join(rng.choice("abcd" if i % 7 else "ab") for i in range(300))
    model = counted(text, alphabet, n, smoothing=smoothing, add_k=0.5)
    ref = reference(text, alphabet, n, smoothing, k=0.5)
    for length in range(1, n):
        contexts = ["".join(c) for c in product(alphabet, repeat=length)]
        probs = next_probs(model, contexts, alphabet)
        assert torch.allclose(probs.sum(-1), torch.ones(len(contexts), dtype=torch.float64), atol=1e-6)
        expected = torch.tensor([[ref(w, ctx) for w in alphabet] for ctx in contexts], dtype=torch.float64)
        assert torch.allclose(probs, expected, rtol=1e-5, atol=1e-7), length


def test_a_gpt2_sized_vocabulary_at_order_8():
    """Keys of 8-grams over 50,304 tokens would need 125 bits as plain base-V numbers."""
    V, n = 50_304, 8
    rng = random.Random(0)
    tokens = tuple(rng.choice([3, 50_000, 50_255, 50_303]) for _ in range(400))
    model = Ngram(NgramConfig(vocab_size=V, block_size=16, ngram_order=n))
    model.count(np.array(tokens), len(tokens))
    contexts = [tokens[i:i + n - 1] for i in range(0, 300, 30)] + [(50_303,) * 7, (7,) * 7]  # two unseen
    probs = model.log_probs(torch.tensor(contexts))[:, -1].double().exp()
    assert torch.allclose(probs.sum(-1), torch.ones(len(contexts), dtype=torch.float64), atol=1e-6)
    ref = reference(tokens, range(V), n, "kneser_ney")
    for ctx, row in zip(contexts, probs):
        for w in (3, 7, 50_000, 50_255, 50_303):
            assert row[w].item() == pytest.approx(ref(w, ctx), rel=1e-5)


def test_counting_in_chunks_gives_the_tables_of_one_pass():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 7, size=2_000) * (rng.random(2_000) < 0.8)  # skewed, so k-grams repeat
    whole = Ngram(NgramConfig(vocab_size=7, block_size=16, ngram_order=5))
    whole.count(tokens, len(tokens))
    chunked = Ngram(NgramConfig(vocab_size=7, block_size=16, ngram_order=5))
    position = 0
    while position < len(tokens):  # chunks of random sizes, overlapping by n-1 tokens
        starts = min(int(rng.integers(1, 300)), len(tokens) - position)
        chunked.count(tokens[position:position + starts + 4], starts)
        position += starts
    for name, table in whole.state_dict().items():
        assert torch.equal(table, chunked.state_dict()[name]), name
    assert sum(whole.table(3)[1].tolist()) == len(tokens) - 2  # every trigram once


def test_the_decoder_equals_a_full_recompute():
    model = counted("abracadabra cadabra abra", "abcdr ", order=4)
    model.cfg.block_size = 8
    seq = torch.tensor([[0, 1, 4, 0, 2, 5, 5, 3, 0, 1, 4, 0, 3], [5, 5, 5, 0, 0, 0, 1, 2, 3, 4, 0, 1, 4]])
    cached, recompute = model.decoder(use_cache=True), Recompute(model)
    for t in range(1, seq.shape[1] + 1):
        assert torch.allclose(cached.next_logits(seq[:, :t]), recompute.next_logits(seq[:, :t]), atol=1e-6)


# Through train.py and sample.py --------------------------------------------------------------------


def ngram_args(corpus, root, out, *overrides):
    return [str(REPO / "configs/ngram.yaml"), f"data.input={corpus}", f"data.prepared_dir={root / 'prepared'}",
            f"out_dir={out}", "model.ngram_order=4", "model.block_size=64", "train.device=cpu", *overrides]


@pytest.fixture(scope="module")
def ngram_run(tiny_corpus, tmp_path_factory):
    """An uninterrupted count (in one chunk), with step settings that do not apply; (args, out, stdout)."""
    root = tmp_path_factory.mktemp("ngram")
    out = root / "run"
    args = lambda out, *extra: ngram_args(tiny_corpus, root, out, *extra)  # noqa: E731
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(args(out, "train.max_iters=7", "optim.lr=0.5"))
    return args, out, stdout.getvalue().splitlines()


def test_train_counts_evaluates_and_saves_like_any_run(ngram_run):
    _, out, printed = ngram_run
    assert [line for line in printed if "ignoring" in line] == [
        "model.arch=ngram is counted in one pass over the train split, with no optimizer: ignoring optim.lr, "
        "train.max_iters"]
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["iter"] == 1 and row["train_time_s"] == row["elapsed_s"] > 0
    assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2))  # ASCII text, a char per byte
    assert 1.0 < row["val_loss"] < 3.0  # well below uniform over the vocabulary (ln 65 = 4.2)
    best, latest = load_checkpoint(out / BEST, for_training=True), load_checkpoint(out / LATEST, for_training=True)
    assert best["iter"] == 1 and best["best_val_loss"] == row["val_loss"] and "optimizer" not in best
    assert sorted(best["model"]) == sorted(f"{t}_{k}" for t in ("keys", "counts") for k in range(1, 5))
    assert best["tokens_per_step"] == best["loader"]["position"] == int(best["model"]["counts_1"].sum())
    assert all(torch.equal(best["model"][k], latest["model"][k]) for k in best["model"])


def test_an_interrupted_count_resumes_to_the_same_counts(ngram_run, monkeypatch, tmp_path):
    args, reference, _ = ngram_run
    out = tmp_path / "run"
    monkeypatch.setattr(trainer.count, "CHUNK_TOKENS", 5_000)  # the excerpt's train split: 11 chunks
    train.main(args(out, "train.max_time=0.001s"))  # stops after the first chunk
    first = load_checkpoint(out / LATEST, for_training=True)
    assert first["iter"] == 0 and first["loader"]["position"] == 5_000 and not (out / BEST).exists()

    chunks, received = [], threading.Event()
    counting, receiving = Ngram.count, trainer.signals.StopRequest._received

    def count_then_sigterm(self, tokens, starts):  # a scheduler's SIGTERM during the third chunk
        counting(self, tokens, starts)
        chunks.append(starts)
        if len(chunks) == 3:
            signal.raise_signal(signal.SIGTERM)
            assert received.wait(10)  # the watcher thread registers it; the loop looks after this chunk

    def received_and_noted(self, sig):
        receiving(self, sig)
        received.set()

    monkeypatch.setattr(Ngram, "count", count_then_sigterm)
    monkeypatch.setattr(trainer.signals.StopRequest, "_received", received_and_noted)
    train.main(args(out, "resume=true"))
    assert load_checkpoint(out / LATEST, for_training=True)["loader"]["position"] == 4 * 5_000
    monkeypatch.setattr(Ngram, "count", counting)
    train.main(args(out, "resume=true"))

    got, want = load_checkpoint(out / BEST), load_checkpoint(reference / BEST)
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    assert (out / "metrics.jsonl").read_text().split('"elapsed_s"')[0] == \
        (reference / "metrics.jsonl").read_text().split('"elapsed_s"')[0]  # the same val loss and bpb


def test_a_finished_count_another_familys_config_or_init_from_is_refused_untouched(ngram_run, capsys):
    args, out, _ = ngram_run
    before = snapshot(out)
    fails(capsys, train.main, args(out, "train.max_iters=7", "optim.lr=0.5", "resume=true"), "cannot resume",
          "its count is complete")
    gpt = [str(REPO / "configs/small.yaml"), f"out_dir={out}", "resume=true", "train.device=cpu"]
    fails(capsys, train.main, gpt, "cannot resume", "model.arch: 'ngram' -> 'gpt'")
    assert snapshot(out) == before
    fails(capsys, train.main, args(out.parent / "other", f"init_from={out}"), "init_from=", "is counted, not trained")



def test_sample_with_every_option_is_reproducible(ngram_run, capsys, one_thread):
    _, out, _ = ngram_run
    argv = ["--ckpt", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "150", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.95", "--repetition-penalty", "1.1", "--stop", r"\n\n",
            "--num-samples", "3", "--seed", "7", "--device", "cpu"]
    texts = []
    for extra in ([], [], ["--no-kv-cache"]):
        sample.main(argv + extra)
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2]  # the same seed, and the decoder equals a recompute
    samples = texts[0].split("-" * 40 + "\n")[:-1]
    assert len(samples) == 3 and len(set(samples)) == 3
    for s in samples:
        assert s.startswith("ROMEO:") and "\n\n" not in s.rstrip("\n")
    sample.main(argv[:4] + ["--temperature", "0", "--max-new-tokens", "30", "--device", "cpu"])
    greedy = capsys.readouterr().out
    assert len(greedy) > len("ROMEO:") + 10 and greedy != texts[0]


# Bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.ngram_order=9"], "model.ngram_order=9 must be in [1, 8]"),
    (["model.ngram_order=0"], "model.ngram_order=0 must be in [1, 8]"),
    (["model.pos=rope"], "model.pos does not apply to model.arch=ngram (it is an option of gpt)"),
    (["model.smoothing=witten_bell"], "model.smoothing='witten_bell' is not one of: kneser_ney, add_k"),
    (["model.add_k=0"], "model.add_k=0.0 must be > 0"),
    (["model.block_size=3"], "model.block_size=3 is shorter than the context of model.ngram_order=6"),
])
def test_bad_ngram_config(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(str(REPO / "configs/ngram.yaml"), overrides)
    assert message in str(e.value)
