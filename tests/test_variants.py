"""Every architecture option combination builds and trains; each variant's checkpoint samples."""

import itertools

import pytest
import torch

from model import GPT
from trainer.checkpoint import save_checkpoint
from model import GPTConfig
from trainer.config import Config

OPTIONS = dict(pos=["learned", "rope"], norm=["layernorm", "rmsnorm"], mlp=["gelu", "swiglu", "relu2"],
               qk_norm=[False, True], n_kv_head=[0, 2, 1], bias=[True, False], tie_weights=[True, False],
               logit_softcap=[0.0, 10.0])
ALL = [dict(zip(OPTIONS, values)) for values in itertools.product(*OPTIONS.values())]


def pairwise_cover():
    """A subset of ALL in which every pair of option values appears together at least once."""
    keys = list(OPTIONS)
    needed = {((a, va), (b, vb)) for a, b in itertools.combinations(keys, 2) for va in OPTIONS[a] for vb in OPTIONS[b]}
    chosen = []
    while needed:
        best = max(ALL, key=lambda c: sum(((a, c[a]), (b, c[b])) in needed for a, b in itertools.combinations(keys, 2)))
        chosen.append(best)
        needed -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(keys, 2)}
    return chosen


def tiny(**options) -> GPTConfig:
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32, **options)
    cfg.validate()
    return cfg


def test_every_combination_runs_forward_and_backward():
    x = torch.randint(0, 40, (2, 16))
    for options in ALL:
        torch.manual_seed(0)
        model = GPT(tiny(**options))
        logits, loss = model(x, x)
        loss.backward()
        assert logits.shape == (2, 16, 40) and torch.isfinite(loss), options
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), options


@pytest.mark.parametrize("options", pairwise_cover(), ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_pairwise_combinations_overfit_a_batch(options):
    torch.manual_seed(0)
    model = GPT(tiny(**options))
    x = torch.randint(0, 40, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, (options, loss.item())


@pytest.mark.parametrize("options", pairwise_cover()[:6], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_variant_checkpoints_load_in_sample(options, tmp_path):
    import sample
    from model.generate import Sampling, generate

    cfg = Config()
    cfg.model = tiny(**options)
    model = GPT(cfg.model)
    state = {"kind": "char", "chars": "".join(chr(ord("a") + i) for i in range(26)) + " .,:;!?\n'ABCDEFGHIJKLM"[:14]}
    save_checkpoint(dict(model=model.state_dict(), config=cfg.to_dict(), tokenizer=state, iter=0), tmp_path / "v.pt")
    loaded, tokenizer, _, _ = sample.load_model(str(tmp_path / "v.pt"), torch.device("cpu"))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    idx = torch.tensor([tokenizer.encode("abc")])
    out = [t.item() for t in generate(loaded, idx, 20, Sampling(temperature=0.0))]
    assert len(out) == 20 and all(0 <= t < 40 for t in out)
