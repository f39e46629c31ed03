import itertools

import pytest
import torch

from model import GPT
from model import GPTConfig

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


def tiny(**kw) -> GPTConfig:
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)
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
    assert untied.flops_per_token() == tied.flops_per_token()  # the head's matmul either way


def test_residual_projections_scaled_with_depth():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=8, n_head=4, n_embd=256))
    std_proj = model.blocks[0].mlp.c_proj.weight.std().item()
    std_fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2 * 8)


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_and_flops_count_lookups_as_free(tie):
    """FLOPs count 6 per weight that takes part in a matmul: not the token and position lookups,
    but the head's matrix, tied or not, plus attention's 12 * layers * width * context."""
    cfg = tiny(tie_weights=tie)
    model = GPT(cfg)
    V, C, T = cfg.vocab_size, cfg.n_embd, cfg.block_size
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    norms = 2 * C  # ln_f gain and bias
    total = V * C + T * C + cfg.n_layer * per_block + norms + (0 if tie else V * C)
    assert model.num_params() == total
    matmul = cfg.n_layer * per_block + norms + V * C  # the head; the lookups are free
    assert model.flops_per_token() == 6 * matmul + 12 * cfg.n_layer * C * T


def test_gqa_equals_attention_with_each_kv_head_repeated_for_its_group():
    """Grouped-query attention against a plain multi-head model whose key/value weights are the
    GQA model's, each kv head copied to the query heads of its group (the definition of GQA)."""
    torch.manual_seed(0)
    gqa = GPT(tiny(n_kv_head=2, pos="rope"))
    full = GPT(tiny(pos="rope"))
    n_head, n_kv, hd = 4, 2, 32 // 4
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"blocks.{i}.attn.c_attn.weight"]  # rows: q (n_head*hd), k (n_kv*hd), v (n_kv*hd)
        q, k, v = w.split([n_head * hd, n_kv * hd, n_kv * hd])
        expand = lambda m: m.view(n_kv, hd, -1).repeat_interleave(n_head // n_kv, dim=0).reshape(n_head * hd, -1)  # noqa: E731
        state[f"blocks.{i}.attn.c_attn.weight"] = torch.cat([q, expand(k), expand(v)])
        b = state[f"blocks.{i}.attn.c_attn.bias"]
        qb, kb, vb = b.split([n_head * hd, n_kv * hd, n_kv * hd])
        state[f"blocks.{i}.attn.c_attn.bias"] = torch.cat([qb, *(x.view(n_kv, hd).repeat_interleave(2, 0).flatten()
                                                                 for x in (kb, vb))])
    full.load_state_dict(state)
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(gqa(x)[0], full(x)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gqa(x)[0], GPT(tiny(pos="rope"))(x)[0])  # the weights matter


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
