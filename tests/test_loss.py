"""The fused head + cross-entropy (model/loss.py) against the plain path it replaces."""

import pytest
import torch
import torch.nn.functional as F

from model import GPT
from model.loss import linear_cross_entropy
from model import GPTConfig


def cross_entropy(logits, targets):
    """The plain path's loss: full logits, in float32 at least, then F.cross_entropy."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def plain(x, w, targets, softcap):
    logits = x @ w.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return cross_entropy(logits, targets)


def loss_and_grads(fn, x, w, targets, softcap, upstream=1.0):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(x, w, targets, softcap)
    (loss * upstream).backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_loss_and_gradients_equal_the_plain_path(softcap):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w = torch.randn(40, 16, dtype=torch.float64)
    targets = torch.randint(0, 40, (3, 5))
    targets[0, :2] = -1  # ignored positions count neither in the mean nor in the gradient
    # A gradient scaler's factor reaches the fused backward as the incoming gradient.
    fused = loss_and_grads(linear_cross_entropy, x, w, targets, softcap, upstream=1024.0)
    ref = loss_and_grads(plain, x, w, targets, softcap, upstream=1024.0)
    for a, b in zip(fused, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_the_plain_path_to_bf16_precision():
    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(100, 32) * 0.3
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(linear_cross_entropy, x, w, targets, 0.0)
        ref = loss_and_grads(plain, x, w, targets, 0.0)
    assert fused[1].dtype == x.dtype and fused[2].dtype == w.dtype  # gradients in the parameters' dtype
    for a, b in zip(fused, ref):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def tiny_model(**options):
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **options)
    cfg.validate()
    return GPT(cfg)


def grads_of_plain_path(model, x, y):
    model.zero_grad()
    loss = cross_entropy(model(x)[0], y)  # no targets: the model returns the full logits
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("options", [{}, dict(tie_weights=False, logit_softcap=10.0, pos="rope")])
def test_model_takes_the_fused_path_when_compiling_with_the_plain_gradients(options, monkeypatch):
    torch.manual_seed(0)
    model = tiny_model(**options).double()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    plain = grads_of_plain_path(model, x, y)
    model.zero_grad()
    logits, loss = model(x, y)
    assert logits is not None  # eager training keeps the plain path
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    logits, loss = model(x, y)
    assert logits is None  # the fused path, as a compiled forward traces it
    loss.backward()
    fused = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_compiled_model_on_cpu_matches_the_plain_path():
    """Inductor's CPU backend traces the fused loss in one graph and computes the same numbers."""
    torch.manual_seed(0)
    model = tiny_model(logit_softcap=10.0)
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    y[0, :4] = -1
    plain = grads_of_plain_path(model, x, y)
    model.zero_grad()
    logits, loss = torch.compile(model, fullgraph=True)(x, y)
    assert logits is None
    loss.backward()
    fused = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_compiled_bf16_on_cuda_matches_the_plain_path(softcap):
    """What training runs on a GPU: the fused loss compiled by Inductor, under bf16 autocast."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=4, n_embd=64, logit_softcap=softcap)
    cfg.validate()
    model = GPT(cfg).cuda()
    x, y = torch.randint(0, 4096, (8, 64), device="cuda"), torch.randint(0, 4096, (8, 64), device="cuda")
    y[0] = -1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = torch.compile(model)(x, y)
    loss.backward()
    fused = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain_loss = cross_entropy(model(x)[0], y)
    plain_loss.backward()
    plain = [plain_loss.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
