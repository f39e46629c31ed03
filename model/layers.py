"""The building blocks of the GPT, each variant a small module chosen by config.

- Norms: `layernorm` (GPT-2) or `rmsnorm` (no mean, no bias; cheaper, modern default), with
  epsilon 1e-5 and 1e-6 unless `norm_eps` says otherwise (imported models keep their own).
- Positions: learned absolute embeddings live in `GPT`; `rope` (rotary) is applied here to
  queries and keys, so attention scores depend only on relative offsets.
- Attention: causal, through `F.scaled_dot_product_attention`, which dispatches to flash
  kernels on GPU and a fused flash kernel on CPU (with torch 2.13 the fastest CPU choice at
  short contexts too, bench/RESULTS.md). `n_kv_head < n_head` shares each key/value head
  across a group of query heads (GQA; 1 = multi-query), shrinking the KV cache. Optional
  QK-norm normalises each head's queries and keys, which keeps logits bounded at high lr. A
  query sees at most block_size keys: longer sequences (rotary models generating past their
  context) get a sliding window, see `attention_mask`.
- MLP: `gelu` (exact, erf), `gelu_tanh` (the tanh approximation GPT-2 was trained with, HF's
  `gelu_new`), `swiglu` (gated, LLaMA), `relu2` (squared ReLU, modded-nanogpt).

Every linear layer whose output is added to the residual stream is named `c_proj`; `GPT`
scales its initialisation with depth (GPT-2's 1/sqrt(2 * n_layer)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    def __init__(self, dim: int, bias: bool, eps: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps or 1e-5

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, bias: bool = False, eps: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps or 1e-6

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(cfg) -> nn.Module:
    return NORMS[cfg.norm](cfg.n_embd, cfg.bias, cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding tables; `cos`/`sin` have shape (max_len, head_dim // 2).

    The tables start at the training context and grow (doubling) when asked for later
    positions, so generation can run past block_size. Angles are computed in float64: near
    position 1e5 a float32 angle is off by up to ~4e-3 rad, which would blur the property that
    scores depend only on relative offsets."""

    def __init__(self, head_dim: int, base: float, max_len: int):
        super().__init__()
        self.inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
        self._build(max_len, device="cpu")

    def _build(self, max_len: int, device):
        # On the CPU, because some devices (MPS) have no float64.
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), self.inv_freq)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def reserve(self, max_len: int):
        """Make the tables cover positions below max_len (before a CUDA graph captures them)."""
        if max_len > self.cos.shape[0]:
            self._build(max(max_len, 2 * self.cos.shape[0]), self.cos.device)

    def forward(self, start: int | torch.Tensor, length: int):
        """(cos, sin) for positions start..start+length: (length, D/2), or (B, 1, length, D/2)
        when start is a (B,) tensor of per-row positions (broadcast over the heads)."""
        if isinstance(start, torch.Tensor):  # on the device (a captured step; a position per row): tables reserved
            if start.dim() == 1:
                positions = start[:, None] + torch.arange(length, device=self.cos.device)
                return self.cos[positions][:, None], self.sin[positions][:, None]
            positions = start + torch.arange(length, device=self.cos.device)
            return self.cos[positions], self.sin[positions]
        self.reserve(start + length)
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x, cos, sin):
    """Rotate each (first-half, second-half) pair of x: (B, H, T, D) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def attention_mask(T: int, S: int, window: int, device):
    """Which of S keys each of the T newest queries may see, or None where SDPA's own causal
    flag (T == S) or no mask at all (one query over a cache that holds only its window) is right.
    The keys are the S latest positions in order; query i sits at position S - T + i and sees
    keys at most `window - 1` positions back: causal within the new block, full over a cached
    past, and a sliding window once a rotary model runs past its context (beyond block_size
    each layer still sees block_size keys, as in training, and depth carries older context)."""
    if T == 1 or (T == S and S <= window):
        return None
    q = torch.arange(S - T, S, device=device)[:, None]
    key = torch.arange(S, device=device)[None, :]
    return (key <= q) & (q - key < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        self.qk_norm_eps = cfg.norm_eps or None  # None: F.rms_norm's default, the dtype's epsilon
        self.window = cfg.block_size  # a query sees at most this many keys (itself included)
        kv_dim = self.n_kv_head * self.head_dim
        # One matmul for queries, keys and values.
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary=None, kv_cache=None):
        """x: (B, T, C). rotary: (cos, sin) for these T positions or None. kv_cache: an object
        with `update(k, v) -> (k_all, v_all, mask)` holding earlier positions, or None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            eps = self.qk_norm_eps
            q, k = F.rms_norm(q, (self.head_dim,), eps=eps), F.rms_norm(k, (self.head_dim,), eps=eps)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v, mask = kv_cache.update(k, v)
        else:
            mask = attention_mask(T, T, self.window, x.device)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=dropout_p, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_width(cfg) -> int:
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":  # 8/3 keeps the parameter count of a 4x ungated MLP
        return (int(8 * cfg.n_embd / 3) + 63) // 64 * 64
    return 4 * cfg.n_embd


def relu2(x):
    return F.relu(x).square()


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Ungated MLP: c_proj(act(c_fc(x)))."""

    def __init__(self, cfg, act):
        super().__init__()
        self.act = act
        self.c_fc = nn.Linear(cfg.n_embd, mlp_width(cfg), bias=cfg.bias)
        self.c_proj = nn.Linear(mlp_width(cfg), cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Gated MLP: c_proj(silu(gate) * up), gate and up from one fused matmul."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * mlp_width(cfg), bias=cfg.bias)
        self.c_proj = nn.Linear(mlp_width(cfg), cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_mlp(cfg) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg)
    return MLP(cfg, {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu2": relu2}[cfg.mlp])


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)

    def forward(self, x, rotary=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rotary, kv_cache)
        return x + self.mlp(self.ln_2(x))
