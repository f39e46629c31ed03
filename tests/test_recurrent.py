"""The recurrent families, LSTM (model/lstm.py) and RWKV (model/rwkv.py), through the same
commands as GPT: train.py trains and resumes them bit for bit, also sharded (a one-process FSDP
run with activation checkpointing over their units); sample.py samples them with every option;
generation from the carried state is a full recompute; RWKV's parallel (chunked) form is its
recurrent form; both are causal; their FLOPs are a hand count; their parameter roles suit both
optimizers; a key of another family is refused by name.

Equality tests run tiny models in float64 with large random weights, so that a match is not
an accident of near-zero activations (RWKV starts with zero output projections)."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import UserError
from model import LSTMConfig, RWKVConfig, build_model
from model.recurrent import CarriedState, Recompute
from model.rwkv import LOG_DECAY_MIN, wkv_chunked, wkv_step
from tests.test_generate import sample_here
from trainer.checkpoint import load_checkpoint
from trainer.config import OptimConfig, load_config
from trainer.muon import Muon
from trainer.optim import build_optimizers
from trainrun import REPO, Forker, make_data, metrics

TINY = {
    "lstm": ["model.n_layer=2", "model.n_embd=16", "model.n_hidden=24", "model.tie_weights=true",
             "model.dropout=0.1"],  # tied with a projection; dropout, so the RNG state matters
    "rwkv": ["model.n_layer=2", "model.n_embd=32", "model.head_size=16", "model.mix_rank=4", "model.decay_rank=8",
             "model.chunk_size=8"],
}
RUN = ["model.block_size=32", "train.batch_size=4", "train.grad_accum=2", "train.max_iters=8", "train.eval_interval=4",
       "train.eval_batches=0", "train.log_interval=1", "train.threads=1", "train.device=cpu", "optim.warmup_iters=2",
       "optim.decay_iters=8", "optim.optimizer=adamw"]  # Muon under FSDP: tests/test_distributed.py


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_model(family: str, **kw):
    cfg = (LSTMConfig(vocab_size=11, block_size=16, n_layer=2, n_embd=8, n_hidden=12, tie_weights=True)
           if family == "lstm" else
           RWKVConfig(vocab_size=11, block_size=16, n_layer=2, n_embd=16, head_size=4, mix_rank=3, decay_rank=5,
                      chunk_size=8))
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


# Through train.py and sample.py ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def forker():
    return Forker()


@pytest.fixture(scope="module", params=["lstm", "rwkv"])
def runs(request, data, forker, tmp_path_factory):
    """A family's 8-step run three ways: straight; stopped at step 4 then resumed; under
    one-process FSDP with activation checkpointing."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    corpus, prepared = data

    def start(name, *overrides):
        return forker.start([str(REPO / f"configs/{family}.yaml"), f"data.input={corpus}",
                             f"data.prepared_dir={prepared}", *TINY[family], *RUN, f"out_dir={root / name}",
                             *overrides], root / f"{name}.log")

    def finish(proc, name):
        proc.join(120)
        assert proc.exitcode == 0, (root / f"{name}.log").read_text()

    procs = {"straight": start("straight"), "resumed": start("resumed", "train.max_iters=4"),
             "fsdp": start("fsdp", "train.parallel=fsdp", "train.activation_checkpointing=true")}
    for name, proc in procs.items():
        finish(proc, name)
    finish(start("resumed", "resume=true"), "resumed")
    return family, root


def test_trains_and_resumes_bit_for_bit(runs):
    family, root = runs
    straight = metrics(root / "straight")
    assert metrics(root / "resumed") == straight  # every step's train loss and both val losses
    assert "resuming" in (root / "resumed.log").read_text()
    ckpt = load_checkpoint(root / "straight" / "latest.pt", for_training=True)
    assert ckpt["config"]["model"]["arch"] == family and ckpt["iter"] == 8
    val = straight[1]
    assert val[8] < val[4] < math.log(ckpt["config"]["model"]["vocab_size"])  # it learns


def test_fsdp_with_activation_checkpointing_trains_the_same_model(runs):
    _, root = runs
    assert "parallel fsdp" in (root / "fsdp.log").read_text()
    plain = load_checkpoint(root / "straight" / "latest.pt")["model"]
    sharded = load_checkpoint(root / "fsdp" / "latest.pt")["model"]
    assert plain.keys() == sharded.keys()  # the wrappers leave no trace in the names
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_sample_with_every_option_is_reproducible_and_the_carried_state_is_the_recompute(runs):
    _, root = runs
    run = root / "straight"
    args = ("--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95",
            "--repetition-penalty", "1.2", "--num-samples", "2")  # 46 tokens: past the 32-token window
    code, out, err = sample_here(run, *args)
    assert code == 0, err
    assert "generated 80 tokens" in err
    separator = "-" * 40 + "\n"
    first, second = out.split(separator)[:2]
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1 and first != second
    assert sample_here(run, *args)[1] == out
    assert sample_here(run, *args, "--no-kv-cache")[1] == out
    assert sample_here(run, *args, "--seed", "7")[1] != out
    stop = first[len("ROMEO:") + 10:][:2]  # two characters the first continuation contains
    code, cut, _ = sample_here(run, *args, "--stop", stop)
    assert code == 0 and cut.split(separator)[0] == first[:first.index(stop, len("ROMEO:"))] + "\n"


# The recurrent state --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["lstm", "rwkv"])
def test_generation_from_the_carried_state_equals_a_full_recompute(family):
    """A 5-token prefill, then 40 tokens one at a time, past the 16-token block_size."""
    model = tiny_model(family)
    tokens = torch.randint(0, 11, (2, 45), generator=torch.Generator().manual_seed(1))
    carried, recompute = CarriedState(model), Recompute(model)
    with torch.no_grad():
        for n in range(5, 46):
            torch.testing.assert_close(carried.next_logits(tokens[:, :n]), recompute.next_logits(tokens[:, :n]),
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 5, 8, 16])
def test_rwkv_parallel_form_equals_recurrent_form(chunk):
    """The chunked WKV over 40 tokens (several chunks, the last one padded) against the RNN fed
    one token at a time from the start."""
    model = tiny_model("rwkv", chunk_size=chunk)
    tokens = torch.randint(0, 11, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        parallel = model(tokens)[0]
        state, steps = None, []
        for t in range(40):
            logits, state = model.step(tokens[:, t:t + 1], state)
            steps.append(logits[:, 0])
    torch.testing.assert_close(parallel, torch.stack(steps, dim=1), rtol=1e-10, atol=1e-10)


def test_chunked_wkv_stays_accurate_in_float32_at_the_decay_bound():
    """Channels at the strongest decay allowed next to channels that barely decay, with an
    incoming state: float32 chunks of 16 against the float64 recurrence, gradients finite."""
    g = torch.Generator().manual_seed(3)
    B, H, T, K = 2, 2, 48, 8
    r, k, v = (torch.randn(B, H, T, K, generator=g, dtype=torch.float64) for _ in range(3))
    logw = torch.where(torch.arange(K) % 2 == 0, LOG_DECAY_MIN, -1e-3).to(torch.float64).expand(B, H, T, K)
    u = torch.randn(H, K, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, K, K, generator=g, dtype=torch.float64)
    want, s = [], state
    for t in range(T):
        y, s = wkv_step(r[:, :, t], k[:, :, t], v[:, :, t], logw[:, :, t], u, s)
        want.append(y)
    inputs = [t.float().requires_grad_() for t in (r, k, v, logw, u, state)]
    y, final = wkv_chunked(*inputs, chunk=16)
    torch.testing.assert_close(y.double(), torch.stack(want, dim=2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), s, rtol=1e-4, atol=1e-4)
    (y.sum() + final.sum()).backward()
    assert all(t.grad.isfinite().all() for t in inputs)


@pytest.mark.parametrize("family", ["lstm", "rwkv"])
def test_a_later_token_never_changes_earlier_logits(family):
    model = tiny_model(family)
    tokens = torch.randint(0, 11, (1, 40), generator=torch.Generator().manual_seed(4))
    changed = tokens.clone()
    changed[0, 20] = (tokens[0, 20] + 1) % 11
    with torch.no_grad():
        a, b = model(tokens)[0], model(changed)[0]
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


# Config, FLOPs, optimizer roles ----------------------------------------------------------------------


@pytest.mark.parametrize("family, key, owners", [
    ("lstm", "model.pos=rope", "gpt"), ("lstm", "model.chunk_size=8", "rwkv"),
    ("rwkv", "model.n_hidden=64", "lstm"), ("rwkv", "model.dropout=0.1", "lstm, gpt"),
])
def test_an_option_of_another_family_is_refused_by_name(family, key, owners):
    name = key.split("=")[0]
    with pytest.raises(UserError, match=rf"^command line: {name} does not apply to model.arch={family} "
                                        rf"\(it is an option of {owners}\)$"):
        load_config(f"configs/{family}.yaml", [key])


def test_flops_per_token_is_the_hand_count():
    # LSTM, vocab 10, embedding 4, hidden 6, 2 layers, tied head (so a 6 -> 4 projection): the
    # gates' matrices 4*6 x (4 + 6) and 4*6 x (6 + 6), the projection 4 x 6, the head 10 x 4.
    lstm = build_model(LSTMConfig(vocab_size=10, n_layer=2, n_embd=4, n_hidden=6, tie_weights=True))
    assert lstm.flops_per_token() == 6 * (24 * 10 + 24 * 12 + 4 * 6 + 10 * 4)
    # RWKV, vocab 10, width 8, one layer, heads of 4, ChannelMix 16 wide, LoRA ranks 2 and 3:
    # TimeMix's r, k, v, gate, output 8 x 8, mix LoRA 8 -> 5*2 and 5 x (2 -> 8), decay LoRA
    # 8 -> 3 -> 8; ChannelMix's key 8 -> 16, value 16 -> 8, receptance 8 x 8; the head 10 x 8;
    # plus the WKV: 15 x width x head size per layer.
    rwkv = build_model(RWKVConfig(vocab_size=10, n_layer=1, n_embd=8, head_size=4, ffn_hidden=16, mix_rank=2,
                                  decay_rank=3))
    weights = 5 * 64 + 8 * 10 + 5 * 16 + 24 + 24 + 128 + 128 + 64 + 80
    assert rwkv.flops_per_token() == 6 * weights + 15 * 8 * 4


@pytest.mark.parametrize("family", ["lstm", "rwkv"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_parameter_roles_suit_both_optimizers(family, optimizer):
    model = tiny_model(family).float().train()
    roles = model.param_groups()
    lookup, head = model.embedding_params()[0], model.head_params()[0]
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(roles["matrix"]) == ids(p for p in model.parameters() if p.dim() == 2) - ids([lookup, head])
    assert ids(roles["vector"]) == ids(p for p in model.parameters() if p.dim() == 1)
    opts = build_optimizers(model, OptimConfig(optimizer=optimizer), "cpu")
    muon = [g for opt in opts.optimizers if isinstance(opt, Muon) for g in opt.param_groups]
    assert ids(p for g in muon for p in g["params"]) == (ids(roles["matrix"]) if optimizer == "muon" else set())
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, 11, (2, 17))
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    for opt in opts.optimizers:
        opt.step()
    assert all(p.isfinite().all() for p in model.parameters())
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) == len(before)
