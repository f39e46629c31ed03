import io
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# The repo root may not be on sys.path under pytest's default import mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.muon import Muon, zeropower_via_newtonschulz5  # noqa: E402


def _polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


def _cos(a, b):
    return ((a * b).sum() / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (64, 64), (96, 128)])
def test_newton_schulz_approximates_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = zeropower_via_newtonschulz5(G, 5)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X)
    # The quintic deliberately overshoots 1 a little, never by much.
    assert s.max() < 1.25
    # Singular values not negligible relative to ||G||_F land in ~[0.68, 1.2];
    # a square Gaussian matrix has a few tiny ones that 5 steps cannot lift.
    s_in = torch.linalg.svdvals(G) / G.norm()
    big = s_in > 2e-3
    assert ((s >= 0.5) & (s <= 1.5))[big].all()
    if shape[0] != shape[1]:
        assert big.all() and s.min() > 0.6
    else:
        assert ((s >= 0.5) & (s <= 1.5)).float().mean() > 0.9
    assert _cos(X, _polar(G)) > 0.95


def test_newton_schulz_transpose_consistent_and_bf16():
    torch.manual_seed(1)
    G = torch.randn(48, 16)
    torch.testing.assert_close(zeropower_via_newtonschulz5(G, 5), zeropower_via_newtonschulz5(G.T, 5).T)
    Xb = zeropower_via_newtonschulz5(G, 5, dtype=torch.bfloat16)
    assert Xb.dtype == torch.float32
    s = torch.linalg.svdvals(Xb)
    assert 0.5 < s.min() and s.max() < 1.5
    assert _cos(Xb, _polar(G)) > 0.95


def test_step_update_is_orthogonal_and_scaled_per_group():
    torch.manual_seed(2)
    wide = nn.Parameter(torch.randn(32, 64))
    tall = nn.Parameter(torch.randn(64, 16))
    opt = Muon([{"params": [wide], "lr": 0.1}, {"params": [tall], "lr": 0.01, "weight_decay": 0.5}])
    grads = [torch.randn_like(wide), torch.randn_like(tall)]
    before = [wide.detach().clone(), tall.detach().clone()]
    for p, g in zip((wide, tall), grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip((wide, tall), grads):
        torch.testing.assert_close(p.grad, g)  # grad left untouched

    # wide: scale 1, no decay
    upd = (before[0] - wide.detach()) / 0.1
    s = torch.linalg.svdvals(upd)
    assert 0.5 < s.min() and s.max() < 1.5
    assert _cos(upd, _polar(grads[0])) > 0.95
    # tall: scale sqrt(64/16) = 2, decoupled decay p *= 1 - lr*wd
    upd = (before[1] * (1 - 0.01 * 0.5) - tall.detach()) / (0.01 * 2.0)
    s = torch.linalg.svdvals(upd)
    assert 0.5 < s.min() and s.max() < 1.5
    assert _cos(upd, _polar(grads[1])) > 0.95


def test_row_blocks_step_like_separate_matrices():
    """A stacked (q; k; v) weight with row_blocks moves exactly as three matrices of their own
    would, each block orthogonalised and scaled alone (GQA's unequal blocks included)."""
    torch.manual_seed(3)
    sizes = (32, 8, 8)
    stacked = nn.Parameter(torch.randn(sum(sizes), 32))
    parts = [nn.Parameter(b.detach().clone()) for b in stacked.split(sizes)]
    together = Muon([stacked], lr=0.05, row_blocks={id(stacked): sizes})
    apart = Muon(parts, lr=0.05)
    for _ in range(3):
        grad = torch.randn_like(stacked)
        stacked.grad = grad.clone()
        for part, g in zip(parts, grad.split(sizes)):
            part.grad = g.clone()
        together.step()
        apart.step()
    torch.testing.assert_close(stacked.detach(), torch.cat([part.detach() for part in parts]), rtol=1e-5, atol=1e-6)
    # Without the blocks the stack is one tall matrix: a different step.
    one, three = (nn.Parameter(torch.zeros(sum(sizes), 32)) for _ in range(2))
    one.grad, three.grad = grad.clone(), grad.clone()
    Muon([one]).step()
    Muon([three], row_blocks={id(three): sizes}).step()
    assert not torch.allclose(one.detach(), three.detach(), atol=1e-3)


def test_match_rms_scaling_gives_adamw_like_rms():
    torch.manual_seed(3)
    for shape in [(64, 256), (256, 64), (128, 128)]:
        p = nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        Muon([p], lr=1.0, adjust_lr="match_rms").step()
        rms = p.detach().pow(2).mean().sqrt().item()
        assert 0.15 < rms < 0.25, (shape, rms)


def _make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32, bias=False), nn.Tanh(), nn.Linear(32, 24, bias=False), nn.Tanh(), nn.Linear(24, 48, bias=False))


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _muon_for(model):
    ws = [m.weight for m in model if isinstance(m, nn.Linear)]
    return Muon([{"params": ws[:2]}, {"params": ws[2:], "lr": 0.01, "nesterov": False}], weight_decay=0.1)


def test_state_dict_roundtrip_resumes_identically():
    ref = _make_model(0)
    opt = _muon_for(ref)
    _train(ref, opt, 6)

    model = _make_model(0)
    opt = _muon_for(model)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _make_model(123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = _muon_for(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert all(torch.is_tensor(v) for st in opt2.state.values() for v in st.values())
    assert opt2.param_groups[1]["lr"] == 0.01 and opt2.param_groups[1]["nesterov"] is False
    _train(resumed, opt2, 3, start=3)

    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_deterministic_and_works_with_compiled_model():
    a, b = _make_model(0), _make_model(0)
    compiled = torch.compile(b, backend="aot_eager")
    _train(a, _muon_for(a), 3)
    _train(compiled, _muon_for(b), 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)

    c = _make_model(0)
    _train(c, _muon_for(c), 3)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_muon_plus_adamw_trains_mlp_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = torch.sin(x @ torch.randn(4, 1)) + 0.5 * x[:, :1] * x[:, 1:2]
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    hidden = [model[2].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    muon = Muon(hidden, lr=0.02)
    adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0)

    def loss_fn():
        return nn.functional.mse_loss(model(x), y)

    with torch.no_grad():
        start = loss_fn().item()
    for _ in range(200):
        loss = loss_fn()
        muon.zero_grad()
        adamw.zero_grad()
        loss.backward()
        muon.step()
        adamw.step()
    with torch.no_grad():
        end = loss_fn().item()
    assert end < 0.25 * start, (start, end)


def test_rejects_non_2d_params_and_bad_options():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="2-D"):
        Muon(lin.parameters())  # includes the 1-D bias
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(2, 3, 3, 3))])
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.tensor(1.0))])

    opt = Muon([lin.weight])
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": [lin.bias]})
    with pytest.raises(ValueError, match="adjust_lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], "adjust_lr": "bogus"})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError):
        Muon([lin.weight], momentum=1.0)
