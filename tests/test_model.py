import itertools

import pytest
import torch

from model import GPT
from trainer.config import ModelConfig

VARIANTS = {
    "classic": {},
    "rope": dict(pos="rope"),
    "rmsnorm-swiglu": dict(norm="rmsnorm", mlp="swiglu"),
    "relu2-qknorm": dict(mlp="relu2", qk_norm=True),
    "gqa": dict(n_kv_head=2),
    "mqa-untied-softcap": dict(n_kv_head=1, tie_weights=False, logit_softcap=10.0, bias=False),
    "modern": dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, n_kv_head=2, tie_weights=False,
                   bias=False, logit_softcap=15.0),
}


def tiny(**kw) -> ModelConfig:
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_mask(variant):
    """Changing a later token never changes the logits at earlier positions."""
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant])).eval()
    x = torch.randint(0, 50, (2, 16))
    for t in (0, 7, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 50
        lx, _ = model(x)
        ly, _ = model(y)
        assert torch.allclose(lx[:, :t], ly[:, :t], atol=1e-6), f"position {t} leaked backwards"
        assert not torch.allclose(lx[:, t:], ly[:, t:]), "a changed token must change its own logits"


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant]))
    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.2, (first, loss.item())


def test_tied_head_shares_embedding():
    tied, untied = GPT(tiny()), GPT(tiny(tie_weights=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() == tied.num_params() + 50 * 32


def test_residual_projections_scaled_with_depth():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=8, n_head=4, n_embd=256))
    std_proj = model.blocks[0].mlp.c_proj.weight.std().item()
    std_fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2 * 8)


def test_param_count_and_flops():
    cfg = tiny()
    model = GPT(cfg)
    counted = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert model.num_params() == counted
    assert model.flops_per_token() == 6 * counted + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_gqa_with_all_heads_equals_plain_attention():
    """n_kv_head == n_head is plain multi-head attention: same weights, same outputs."""
    torch.manual_seed(0)
    plain = GPT(tiny())
    explicit = GPT(tiny(n_kv_head=4))
    explicit.load_state_dict(plain.state_dict())
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(plain(x)[0], explicit(x)[0])


def test_rope_scores_depend_only_on_relative_position():
    from model.layers import Rotary, apply_rotary

    torch.manual_seed(0)
    rot = Rotary(head_dim=8, base=10000.0, max_len=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        cq, sq = rot(i, 1)
        ck, sk = rot(j, 1)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    for (i, j), shift in itertools.product([(5, 2), (10, 10), (3, 9)], [0, 7, 30]):
        assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.long))
