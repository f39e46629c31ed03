"""The continuous-batching engine (model/engine.py) and GPT's rows decoder (model/kv_rows.py):
rows that join and leave at any step compute exactly what each would alone; the engine gives
the tokens `generate` gives (greedy and seeded), whatever else shares the batch; rows join at
the next step and leave without stalling the others; stop conditions; a failing row fails
only its request; the bounds.

Models are tiny, in float64 with large random weights (as in test_generate.py), so logits are
far apart and greedy comparisons cannot flip on rounding."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from model.engine import Busy, Engine, Request, SeparateRows
from model.generate import Sampling, generate
from model.kv_cache import KVDecoder

BLOCK = 16
VOCAB = 50


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_model(**overrides) -> GPT:
    cfg = GPTConfig(**{**dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32), **overrides})
    torch.manual_seed(0)
    model = GPT(cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


class Letters:
    """A tokenizer for ids 0..49: one byte each."""

    vocab_size, eot_id = VOCAB, None

    def decode_bytes(self, ids):
        return bytes(48 + i for i in ids)  # '0', '1', ... printable ASCII


def collect(events):
    out = {}
    for e in events:
        c = out.setdefault(e.index, {"text": "", "finish": None, "tokens": 0, "error": None})
        c["text"] += e.text
        c["tokens"] = max(c["tokens"], e.tokens)
        c["finish"] = c["finish"] or e.finish
        c["error"] = c["error"] or e.error
    return out


def run_engine(engine, submissions, steps=200):
    """Submit requests at given steps ({step: [Request]}), step the engine; the events per request."""
    events = []
    for step in range(steps):
        for r in submissions.get(step, []):
            log = []
            engine.submit(r, log.append)
            events.append(log)
        if not engine.running and not engine.waiting and step > max(submissions):
            break
        with torch.inference_mode():
            engine.step()
    return [collect(e) for e in events]


def text_of(ids):
    return "".join(chr(48 + i) for i in ids)


@pytest.mark.parametrize("arch", [{}, dict(pos="rope", n_kv_head=2)], ids=["learned", "rope-gqa"])
def test_rows_joining_and_leaving_compute_what_each_computes_alone(arch):
    model = tiny_model(**arch)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (70,), generator=g) for _ in range(4)]
    length = {0: 3, 1: 10}  # the rows held and their sequences' lengths
    joins = {5: (2, 1), 7: (3, 20)}  # step -> (row, prompt length); 20 > BLOCK: a long prompt
    rows, alone = model.rows_decoder(4), {}
    with torch.no_grad():
        for step in range(45):  # well past the window: learned positions restart, rotary ones roll
            if step in joins:
                length[joins[step][0]] = joins[step][1]
            if step == 15:  # row 1 leaves; the last row's cache moves into its place
                rows.drop(1)
                del length[1]
            batch = {i: seqs[i][:n] for i, n in length.items()}
            logits = rows.next_logits(batch)
            for k, (i, s) in enumerate(batch.items()):
                expected = alone.setdefault(i, KVDecoder(model)).next_logits(s[None])[0]
                torch.testing.assert_close(logits[k], expected, rtol=0, atol=1e-10)
            for i in length:  # row 3 once grows by 3 tokens (forced tokens, e.g. a tool's output)
                length[i] += 3 if (i, step) == (3, 20) else 1


def test_engine_gives_the_tokens_of_generate_whatever_shares_the_batch():
    model = tiny_model(pos="rope")
    prompt, n = [5, 9, 2, 7], 40  # runs past the window
    greedy = [t.item() for t in generate(model, torch.tensor([prompt]), n, Sampling(temperature=0))]
    sampled = Sampling(temperature=1.0, top_p=0.9)
    seeded = [t.item() for t in generate(model, torch.tensor([prompt]), n, sampled,
                                         torch.Generator().manual_seed(123))]
    others = [Request([1, 2, 3], 10, Sampling(temperature=1.0), n=2, seed=5), Request([4] * 20, 30, sampled)]
    engine = Engine(model, Letters(), capacity=6)
    alone_greedy, alone_seeded, crowded_greedy, _, crowded_seeded, _ = run_engine(engine, {
        0: [Request(prompt, n, Sampling(temperature=0))],
        1: [Request(prompt, n, sampled, seed=123)],
        50: [Request(prompt, n, Sampling(temperature=0)), others[0]],
        52: [Request(prompt, n, sampled, seed=123), others[1]],
    })
    assert alone_greedy[0]["text"] == crowded_greedy[0]["text"] == text_of(greedy)
    assert alone_seeded[0]["text"] == crowded_seeded[0]["text"] == text_of(seeded)
    assert alone_greedy[0]["finish"] == "length" and alone_greedy[0]["tokens"] == n


def test_default_rows_decoder_serves_any_family_the_same_tokens():
    model = tiny_model()
    batched = run_engine(Engine(model, Letters(), capacity=4), {0: [Request([3, 1], 25, Sampling(0.0), n=2)],
                                                                 4: [Request([8], 25, Sampling(0.8), seed=3)]})
    model.rows_decoder = lambda capacity: SeparateRows(model)  # what a family without its own gets
    separate = run_engine(Engine(model, Letters(), capacity=4), {0: [Request([3, 1], 25, Sampling(0.0), n=2)],
                                                                  4: [Request([8], 25, Sampling(0.8), seed=3)]})
    assert batched == separate


def test_rows_join_at_the_next_step_and_leave_without_stalling_others():
    engine = Engine(tiny_model(), Letters(), capacity=4)
    long, short = [], []
    engine.submit(Request([1, 2], 30, Sampling(0.0)), long.append)
    with torch.inference_mode():
        for _ in range(3):
            engine.step()
        engine.submit(Request([3], 2, Sampling(0.0)), short.append)
        engine.step()
        assert (len(long), len(short)) == (4, 1)  # the newcomer's first token came with the 4th step
        engine.step()
        assert short[-1].finish == "length" and len(engine.decoder.rows) == 1  # it left; its row is freed
        engine.step()
    assert len(long) == 6 and long[-1].finish is None


def test_stop_token_and_stop_string_finish_with_stop():
    model = tiny_model()
    free = run_engine(Engine(model, Letters()), {0: [Request([4, 4], 20, Sampling(0.0))]})[0][0]["text"]
    token, cut = ord(free[5]) - 48, free[8:10]
    by_token, by_string = run_engine(Engine(model, Letters()), {0: [Request([4, 4], 20, Sampling(0.0),
                                                                            stop_ids=(token,)),
                                                                    Request([4, 4], 20, Sampling(0.0), stop=(cut,))]})
    assert by_token[0]["finish"] == "stop" and by_token[0]["text"] == free[:free.index(free[5])]
    assert by_string[0]["finish"] == "stop" and by_string[0]["text"] == free[:free.index(cut)]


class Poisoned:
    """A rows decoder that fails on any row containing token 49, as a bug in one row would."""

    def __init__(self, inner):
        self.inner = inner

    def next_logits(self, rows):
        if any(bool((seq == 49).any()) for seq in rows.values()):
            raise RuntimeError("poisoned row")
        return self.inner.next_logits(rows)

    def drop(self, row_id):
        self.inner.drop(row_id)


def test_a_failing_row_fails_only_its_request(capsys):
    model = tiny_model()
    engine = Engine(model, Letters(), capacity=4)
    engine.decoder = Poisoned(engine.decoder)
    healthy, poisoned, later = run_engine(engine, {0: [Request([1, 2], 20, Sampling(0.0))],
                                                   3: [Request([49], 20, Sampling(0.0)), Request([5], 10, Sampling(0.0))]})
    assert poisoned[0]["error"] and "RuntimeError" in poisoned[0]["error"]
    assert healthy[0]["finish"] == "length" and healthy[0]["tokens"] == 20 and not healthy[0]["error"]
    assert later[0]["finish"] == "length" and not later[0]["error"]
    assert "poisoned row" in capsys.readouterr().err  # the traceback goes to the server's log


def test_bounds_queue_capacity_and_cancel():
    engine = Engine(tiny_model(), Letters(), capacity=2, queue_limit=2)
    with pytest.raises(ValueError, match="n=3"):
        engine.submit(Request([1], 5, n=3), print)
    jobs = [engine.submit(Request([1], 50), lambda e: None) for _ in range(2)]
    with pytest.raises(Busy):
        engine.submit(Request([1], 5), print)
    with torch.inference_mode():
        engine.step()  # admits both (one row each)
        assert len(engine.decoder.rows) == 2 and not engine.waiting
        jobs[0].cancel()
        engine.step()
    assert len(engine.decoder.rows) == 1 and engine.running == [jobs[1]]
