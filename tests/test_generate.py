"""Generation: the KV cache computes exactly what a full forward pass computes, for every
architecture option and past the context window; sampling is reproducible; generation stops
where it should; sample.py works end to end (streaming, batches, the REPL, bad prompts).

Models are tiny, in float64 and with large random weights, so logits are far apart and a
greedy comparison cannot flip on a rounding tie."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.generate import Sampling, TextStream, generate, penalise_repetition, sample_next
from model.kv_cache import KVCache, KVDecoder
from model.layers import attention_mask
from sample import main as sample_main
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16

ARCHS = {
    "gpt2": {},
    "rope": dict(pos="rope"),
    "rmsnorm-swiglu": dict(norm="rmsnorm", mlp="swiglu", bias=False),
    "relu2-qknorm-rope": dict(mlp="relu2", qk_norm=True, pos="rope"),
    "gqa2": dict(n_kv_head=2),
    "mqa-rope": dict(n_kv_head=1, pos="rope"),
    "untied-softcap": dict(tie_weights=False, logit_softcap=3.0),
    "modern": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=2, tie_weights=False,
                   logit_softcap=5.0, bias=False),
}


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_model(seed=0, **overrides) -> GPT:
    cfg = GPTConfig(**{**dict(vocab_size=50, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32), **overrides})
    torch.manual_seed(seed)
    model = GPT(cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def run(model, prompt, steps, sampling, seed=None, use_cache=True, eot_id=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.stack(list(generate(model, prompt, steps, sampling, gen, eot_id=eot_id, use_cache=use_cache)), 1)


@pytest.mark.parametrize("decode", ["dynamic", "static", "trace"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_match_full_forward_every_step(arch, decode):
    # "static" is the fixed-shape step that CUDA graphs replay: every cache slot plus a mask;
    # "trace" replays that step from a TorchScript trace (sample.py's CPU default).
    model = tiny_model(**ARCHS[arch])
    tokens = torch.randint(0, 50, (2, 4 * BLOCK), generator=torch.Generator().manual_seed(1))
    cached, full = KVDecoder(model, use_cache=True, decode=decode, max_len=tokens.shape[1]), \
        KVDecoder(model, use_cache=False)
    with torch.no_grad():
        for n in range(5, tokens.shape[1] + 1):  # prompt of 5, then well past the window
            torch.testing.assert_close(cached.next_logits(tokens[:, :n]), full.next_logits(tokens[:, :n]),
                                       rtol=0, atol=1e-10, msg=f"step with {n} tokens")
    if decode == "trace":
        assert cached.step.replay is not None  # the steps really ran from the trace


def test_traced_steps_give_the_eager_steps_logits_bit_for_bit_in_float32():
    model = tiny_model(**ARCHS["modern"]).float()
    tokens = torch.randint(0, 50, (1, 3 * BLOCK), generator=torch.Generator().manual_seed(7))
    traced, eager = (KVDecoder(model, decode=d, max_len=tokens.shape[1]) for d in ("trace", "static"))
    with torch.no_grad():
        for n in range(5, tokens.shape[1] + 1):
            assert torch.equal(traced.next_logits(tokens[:, :n]), eager.next_logits(tokens[:, :n])), n
    assert traced.step.replay is not None


class HostReadingGPT(GPT):
    """A model whose step reads its position on the host: a trace would freeze that number."""

    def forward(self, idx, targets=None, kv_caches=None, start_pos=0):
        return super().forward(idx, targets, kv_caches, int(start_pos))


def test_a_step_that_reads_the_host_is_not_traced_but_still_right(capsys):
    base = tiny_model()
    model = HostReadingGPT(base.cfg).double().eval()
    model.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 50, (1, 3 * BLOCK), generator=torch.Generator().manual_seed(6))
    traced, eager = KVDecoder(model, decode="trace"), KVDecoder(base)
    with torch.no_grad():
        for n in range(5, tokens.shape[1] + 1):
            torch.testing.assert_close(traced.next_logits(tokens[:, :n]), eager.next_logits(tokens[:, :n]),
                                       rtol=0, atol=1e-10, msg=f"step with {n} tokens")
    assert traced.step.replay is None
    assert "TorchScript trace failed (RuntimeError: the step reads a tensor on the host (test_generate.py:" \
        in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_and_without_cache_identical_past_the_window(arch):
    model = tiny_model(**ARCHS[arch])
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    greedy = Sampling(temperature=0, repetition_penalty=1.5)
    with_cache = run(model, prompt, 3 * BLOCK, greedy)
    assert with_cache.shape == (2, 3 * BLOCK)
    assert torch.equal(with_cache, run(model, prompt, 3 * BLOCK, greedy, use_cache=False))
    # Random model weights make greedy repeat itself; seeded sampling visits more tokens.
    sampled = run(model, prompt, 3 * BLOCK, Sampling(), seed=0)
    assert len(set(sampled[0].tolist())) > 10
    assert torch.equal(sampled, run(model, prompt, 3 * BLOCK, Sampling(), seed=0, use_cache=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_cuda_graph_decoding_gives_the_eager_tokens(arch):
    model = tiny_model(**ARCHS[arch]).cuda()
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2)).cuda()
    greedy = Sampling(temperature=0, repetition_penalty=1.5)
    graphed = torch.stack(list(generate(model, prompt, 3 * BLOCK, greedy, decode="graph")), 1)
    assert torch.equal(graphed, torch.stack(list(generate(model, prompt, 3 * BLOCK, greedy)), 1))
    # float32 and bf16 autocast (sample.py's default on a GPU): the replayed step's logits are the
    # eager step's at every position, past the window too.
    model.float()
    tokens = torch.randint(0, 50, (3, 3 * BLOCK), generator=torch.Generator().manual_seed(5)).cuda()
    for autocast, tol in ((False, 1e-5), (True, 3e-2)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            graphed, dynamic = KVDecoder(model, decode="graph"), KVDecoder(model)
            for n in range(5, tokens.shape[1] + 1):
                a, b = graphed.next_logits(tokens[:, :n]).float(), dynamic.next_logits(tokens[:, :n]).float()
                assert (a - b).abs().max() <= tol * b.abs().max(), (autocast, n)
        assert graphed.step.replay is not None  # it really replayed a graph


def test_gqa_caches_only_the_kv_heads():
    model = tiny_model(n_kv_head=1)
    context = KVDecoder(model)
    context.next_logits(torch.zeros(3, 4, dtype=torch.long))
    assert context.caches[0].k.shape == (3, 1, BLOCK, 32 // 4)


def test_rope_rolling_cache_is_a_sliding_window():
    # One layer: the next token sees exactly the last block_size tokens, and rotary scores depend
    # only on offsets, so the rolled cache at positions far past the window must agree with a
    # fresh forward pass of the last block_size tokens placed at positions 0..block_size-1
    # (up to the float32 rotary tables; a wrong window would be off by whole units).
    model = tiny_model(pos="rope", n_layer=1)
    tokens = torch.randint(0, 50, (1, 5 * BLOCK), generator=torch.Generator().manual_seed(3))
    context = KVDecoder(model)
    with torch.no_grad():
        for n in range(BLOCK, tokens.shape[1] + 1, 7):
            torch.testing.assert_close(context.next_logits(tokens[:, :n]), model(tokens[:, n - BLOCK:n])[0][:, -1],
                                       rtol=0, atol=1e-6)


def test_rope_slow_path_equals_whole_history_forward():
    model = tiny_model(pos="rope")
    tokens = torch.randint(0, 50, (1, 6 * BLOCK), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(KVDecoder(model, use_cache=False).next_logits(tokens), model(tokens)[0][:, -1],
                                   rtol=0, atol=1e-10)


def test_attention_mask_is_causal_over_cache_and_slides_past_window():
    assert attention_mask(1, 9, 4, "cpu") is None and attention_mask(4, 4, 4, "cpu") is None
    expected = torch.tensor([[1, 1, 1, 0, 0],    # query at position 2 of keys 0..4, window 4
                             [0, 1, 1, 1, 0],    # position 3: keys 0..3 minus key 0 (4 back)
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(attention_mask(3, 5, 3, "cpu"), expected)


def test_kv_cache_ring_keeps_latest_window_in_order_for_prefill():
    cache = KVCache(window=4)
    k = torch.arange(6.0).view(1, 1, 6, 1)
    cache.update(k[:, :, :3], k[:, :, :3])
    cache.update(k[:, :, 3:4], k[:, :, 3:4])
    cache.update(k[:, :, 4:5], k[:, :, 4:5])  # wraps: position 4 overwrites position 0
    k_all, _, mask = cache.update(k[:, :, 5:], k[:, :, 5:])
    assert mask is None
    assert sorted(k_all.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]  # one new query: its window, any order
    keys, _, _ = cache.update(torch.tensor([[[[6.0], [7.0]]]]), torch.tensor([[[[6.0], [7.0]]]]))
    assert keys.flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # cached in order, then new


def test_same_seed_same_tokens_and_different_seed_differs():
    model = tiny_model(pos="rope")
    prompt = torch.zeros(4, 3, dtype=torch.long)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.1)
    a, b, c = run(model, prompt, 30, s, seed=7), run(model, prompt, 30, s, seed=7), run(model, prompt, 30, s, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows of one batch are distinct samples


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    ctx = torch.zeros(1, 1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    draws = lambda s: {sample_next(logits, ctx, s, gen).item() for _ in range(200)}  # noqa: E731
    assert draws(Sampling(temperature=0)) == {0}
    assert draws(Sampling(top_k=2)) == {0, 1}
    assert draws(Sampling(top_p=0.5)) == {0}  # p(0) = 0.64 already reaches 0.5
    assert draws(Sampling(temperature=0, vocab_limit=0 + 1)) == {0}
    assert draws(Sampling(temperature=0, repetition_penalty=10.0)) == {1}  # token 0 is in the context


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = penalise_repetition(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_eot_finishes_each_row_on_its_own():
    model = tiny_model()
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(5))
    greedy = Sampling(temperature=0, repetition_penalty=1.5)
    free = run(model, prompt, 20, greedy)
    eot = free[0, 3].item()  # the token row 0 emits fourth becomes end-of-text
    stopped = run(model, prompt, 20, greedy, eot_id=eot)
    first = {row: (free[row] == eot).nonzero()[0].item() if (free[row] == eot).any() else None for row in (0, 1)}
    for row in (0, 1):
        end = first[row]
        if end is None:
            assert torch.equal(stopped[row], free[row, :stopped.shape[1]])
        else:
            assert torch.equal(stopped[row, :end + 1], free[row, :end + 1])
            assert (stopped[row, end + 1:] == -1).all()
    if all(v is not None for v in first.values()):  # everything finished: the loop stopped early
        assert stopped.shape[1] == max(first.values()) + 1


def test_caller_marks_rows_finished():
    model = tiny_model()
    finished = torch.tensor([False, False, False])
    out = []
    for step in generate(model, torch.zeros(3, 2, dtype=torch.long), 10, Sampling(temperature=0), finished=finished):
        out.append(step)
        finished[len(out) - 1] = True  # row i stops after step i
    out = torch.stack(out, 1)
    assert out.shape == (3, 3)
    assert out[0, 1:].tolist() == [-1, -1] and out[1, 2].item() == -1 and out[2, 2].item() >= 0


class Bytes:
    """A tokenizer whose tokens are raw byte strings, to split characters across tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode_bytes(self, ids):
        return b"".join(self.pieces[i] for i in ids)


def stream(pieces, stop):
    tokenizer = Bytes(pieces)
    s = TextStream(tokenizer, stop)
    out = []
    for i in range(len(pieces)):
        out.append(s.feed(i))
        if s.done:
            break
    out.append(s.close())
    return out, s


def test_stop_string_cuts_text_and_streaming_never_takes_back():
    out, s = stream([b"Hello", b" wor", b"ld\n", b"\nmore"], ("\n\n",))
    assert s.done and s.text == "Hello world" and "".join(out) == "Hello world"
    assert out[2] == "ld"  # the newline is held back: it may start the stop string
    out, s = stream([b"a\n", b"b\n", b"c"], ("\n\n",))
    assert not s.done and s.text == "a\nb\nc" and out == ["a", "\nb", "\nc", ""]


def test_stop_string_earliest_of_several_and_within_one_token():
    out, s = stream([b"one. two! three"], ("!", "."))
    assert s.text == "one" and s.done


def test_multibyte_characters_split_across_tokens():
    out, s = stream([b"caf", b"\xc3", b"\xa9!"], ())
    assert out == ["caf", "", "\u00e9!", ""] and s.text == "caf\u00e9!"


# ---------------------------------------------------------------------------------------------
# sample.py end to end, on a checkpoint trained here


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "corpus.txt"
    corpus.write_text((REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    subprocess.run([sys.executable, "train.py", "configs/classic-cpu.yaml", "model.n_layer=1", "model.n_embd=32",
                    "model.n_head=2", "model.block_size=32", "train.max_iters=20", "train.eval_interval=20",
                    "train.device=cpu", f"data.input={corpus}", f"data.prepared_dir={tmp / 'prepared'}",
                    f"out_dir={tmp / 'run'}"], cwd=REPO, check=True, capture_output=True, text=True)
    return tmp / "run"


def sample(ckpt, *args, stdin=None):
    """sample.py in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "sample.py", "--ckpt", str(ckpt), "--device", "cpu", *args],
                          cwd=REPO, capture_output=True, text=True, input=stdin, timeout=300)


def sample_here(ckpt, *args, stdin=""):
    """sample.main in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sample_main(["--ckpt", str(ckpt), "--device", "cpu", *args])
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def test_sample_generates_requested_tokens_with_summary(ckpt):
    r = sample(ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) == len("ROMEO:") + 40 + 1  # char level: 1 token, 1 char
    assert re.search(r"^generated 40 tokens in [\d.]+ s \([\d.]+ tokens/s\)$", r.stderr, re.M)
    assert "failed" not in r.stderr  # the CPU's steps ran from their trace
    # 40 tokens after a 6-character prompt run past the 32-token window.
    slow = sample_here(ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0", "--no-kv-cache")
    assert slow[1] == r.stdout


def test_sample_same_seed_same_text_and_batch(ckpt):
    args = ("--prompt", "A", "--max-new-tokens", "30", "--num-samples", "3", "--temperature", "1.5")
    code, out, err = sample_here(ckpt, *args)
    assert code == 0, err
    assert sample_here(ckpt, *args)[1] == out
    assert sample_here(ckpt, *args, "--no-capture")[1] == out  # the traced steps draw the eager steps' tokens
    samples = out.split("-" * 40 + "\n")
    assert len(samples) == 4 and samples[-1] == "" and len(set(samples[:3])) == 3
    assert all(len(s) == 1 + 30 + 1 for s in samples[:3])
    assert "generated 90 tokens" in err
    assert sample_here(ckpt, *args, "--seed", "2")[1] != out


def test_sample_stop_string(ckpt):
    args = ("--prompt", "A", "--max-new-tokens", "60", "--temperature", "1.5")
    full = sample_here(ckpt, *args)[1]
    stop = full[8:10]  # two characters that the continuation contains
    code, cut, _ = sample_here(ckpt, *args, "--stop", stop)
    assert code == 0
    assert cut == full[:full.index(stop)] + "\n"


def test_interactive_over_a_pipe_answers_each_line(ckpt):
    common = ("--max-new-tokens", "20", "--temperature", "1.0")
    r = sample(ckpt, "--interactive", *common, stdin="ROMEO:\nJULIET:\n")
    assert r.returncode == 0, r.stderr
    answers = [sample_here(ckpt, "--prompt", p, *common)[1][len(p):] for p in ("ROMEO:", "JULIET:")]
    assert r.stdout == "".join(answers)  # continuation only, reseeded per prompt
    assert r.stderr.count("generated 20 tokens") == 2


def test_unknown_characters_one_line_error(ckpt):
    r = sample(ckpt, "--prompt", "caf\u00e9 \U0001F600")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: characters not in the char vocabulary")
    assert "Traceback" not in r.stderr
    code, out, err = sample_here(ckpt, "--interactive", "--max-new-tokens", "5", stdin="\U0001F600\nROMEO:\n")
    assert code == 2 and len(out) == 5 + 1  # the good prompt is still answered
    assert "error: characters not in the char vocabulary" in err and "Traceback" not in err
