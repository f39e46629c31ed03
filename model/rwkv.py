"""RWKV: an RNN that trains in parallel like a transformer (Peng et al. 2023; here RWKV-6 "Finch",
Peng et al. 2024, "Eagle and Finch"), written from scratch.

    embedding -> LayerNorm -> n x [x += TimeMix(LN(x)); x += ChannelMix(LN(x))] -> LayerNorm -> head

TimeMix (the attention's place), per head of head_size channels, with a state S (K x V):
    token shift   each of r, k, v, g and the decay reads a per-channel mix of this token's x and
                  the previous one's, the mix itself data-dependent (RWKV-6's "ddlerp": a LoRA of
                  the input adds to the learned mix coefficients)
    decay         w_t = exp(-exp(d + LoRA(x_t))): a per-channel forgetting factor in (0, 1) that
                  depends on the input (RWKV-6's data-dependent decay; RWKV-4/5's was fixed)
    WKV           y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(w_t) S_{t-1} + k_t^T v_t
                  (u: a learned bonus for the current token)
    output        GroupNorm per head, times silu(g), a linear map
ChannelMix (the MLP's place): token shift, then sigmoid(receptance) * value(relu(key(x))^2).

Two forms of the same function:
- Training and prefill run the WKV in parallel over a window, chunk by chunk (`wkv_chunked`, the
  chunkwise form of linear attention with decay, as in GLA / flash-linear-attention): within a
  chunk of L tokens the pairwise decays come from cumulative sums of log w, so the chunk is two
  matmuls; between chunks a state is carried, one step per chunk. Log-space keeps it stable: every
  exponent is a sum of at most L log decays, and the log decay is bounded (below), so no factor
  overflows float32 (see LOG_DECAY_MIN). The WKV always runs in float32 or wider, autocast or not.
- Generation runs it as the RNN (`wkv_step`): one token, constant memory (per layer: the previous
  token's x for each of the two token shifts, and one K x V state per head).
tests/test_recurrent.py checks that both give the same logits, in float64, over several chunks.

Design decisions:
- Deviation from RWKV-6: the per-token log decay -exp(d + LoRA(x)) is clamped at LOG_DECAY_MIN = -3
  (w >= 0.05: a channel at the bound forgets 95% per token, all but nothing within two; RWKV-6's
  initial decays are 0.69-0.998). It is what makes the chunked form safe in float32 (RWKV-7 bounds
  its decay, to w >= 0.55, for the same reason); the recurrent form applies the same clamp, so the
  two stay one function.
- Initialisation follows RWKV-LM's RWKV-6 (mix and decay curves over channels and depth, zero
  output projections, orthogonal matrices, a tiny embedding normalised by the first LayerNorm).
- Parameter roles (trainer/optim.py): the embedding is "embed", the untied head "head"; every
  linear map is "matrix" (Muon's under `optim.optimizer: muon`): receptance, key, value, gate
  and output in TimeMix, key, value, receptance in ChannelMix, and the low-rank factors of the
  two LoRAs; the mix coefficients, base decay, bonus and norm parameters are "vector" (AdamW,
  never decayed: decaying a decay would bias every channel towards forgetting).
- FLOPs per token: 6 per matmul weight (lookup excluded) plus the WKV recurrence, counted in its
  recurrent form (what the model computes; the chunked form trades it for intra-chunk work,
  which MFU does not count, as GPT's count ignores how attention is computed): per head the
  update S <- diag(w) S + k^T v (3 FLOPs per state entry) and the read r S (2 per entry), 5 K V
  forward, 15 K V with backward: 15 * n_embd * head_size per layer. Elementwise work (token
  shift, norms, activations, the bonus) is left out, as in GPT's count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checks import at_least, in_range, positive
from common.errors import UserError
from model.base import IGNORE, LanguageModel, ModelConfig
from model.recurrent import recurrent_decoder

LOG_DECAY_MIN = -3.0  # the per-token log decay's floor; |cumulative log decay| <= 3 * chunk_size
MAX_CHUNK = 16  # so every exponent is <= 48, leaving float32 (max e^88.7) e^40 for the values it scales


@dataclass
class RWKVConfig(ModelConfig):
    arch: str = "rwkv"
    n_layer: int = 4
    n_embd: int = 128
    head_size: int = 32  # channels per WKV head; each head carries a head_size x head_size state
    ffn_hidden: int = 0  # ChannelMix width; 0 = 3.5 x n_embd rounded down to a multiple of 32 (RWKV-6)
    mix_rank: int = 16  # rank of the LoRA that makes the token-shift mix data-dependent (RWKV-6: 32)
    decay_rank: int = 32  # rank of the LoRA that makes the decay data-dependent (RWKV-6: 64)
    chunk_size: int = 16  # tokens per chunk of the parallel WKV (1-16): speed only, the same function

    def validate(self):
        super().validate()
        positive(self, "model", "n_layer", "n_embd", "head_size", "mix_rank", "decay_rank")
        at_least(self, "model", 0, "ffn_hidden")
        in_range(self, "model", "chunk_size", 1, MAX_CHUNK)
        if self.n_embd % self.head_size:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by model.head_size={self.head_size}")

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden or max(32, int(self.n_embd * 3.5) // 32 * 32)


# The WKV recurrence --------------------------------------------------------------------------------


def wkv_step(r, k, v, logw, u, state):
    """One token. r, k, logw (B, H, K); v (B, H, V); u (H, K); state (B, H, K, V)."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)
    y = (r.unsqueeze(-2) @ (state + u.unsqueeze(-1) * kv)).squeeze(-2)
    return y, logw.exp().unsqueeze(-1) * state + kv


def wkv_chunked(r, k, v, logw, u, state, chunk: int):
    """T tokens at once, chunk by chunk; the same function as T calls of wkv_step.
    r, k, logw (B, H, T, K); v (B, H, T, V); u (H, K); state (B, H, K, V) -> y (B, H, T, V), state.

    In a chunk, with c_i = log w_0 + ... + log w_i (from the chunk's start) and e_i = c_{i-1}
    (e_0 = 0), the weight of token s's k^T v in token i's read (s < i) is exp(e_i - c_s) per key
    channel, so the intra-chunk scores are (r_i exp(e_i)) . (k_s exp(-c_s)): one matmul. The
    incoming state is read as (r_i exp(e_i)) S and leaves the chunk as
    diag(exp(c_last)) S + sum_s (k_s exp(c_last - c_s))^T v_s. Every exponent lies within
    +-3 * chunk (LOG_DECAY_MIN), so nothing overflows float32, in backward either."""
    B, H, T, K = r.shape
    pad = -T % chunk  # zero k and v and a decay of 1 at the end: the state passes through unchanged
    if pad:
        r, k, v, logw = (F.pad(t, (0, 0, 0, pad)) for t in (r, k, v, logw))
    N = (T + pad) // chunk
    r, k, v, logw = (t.reshape(B, H, N, chunk, t.size(-1)) for t in (r, k, v, logw))
    c = logw.cumsum(dim=3)
    e = F.pad(c, (0, 0, 1, -1))
    r_in, k_in = r * e.exp(), k * (-c).exp()
    scores = (r_in @ k_in.transpose(-1, -2)).tril(-1)  # s < i; the rest may be huge and is dropped
    scores = scores + torch.diag_embed((r * u.view(1, H, 1, 1, K) * k).sum(-1))  # the bonus, s = i
    y = scores @ v
    k_out = k * (c[:, :, :, -1:] - c).exp()
    written = k_out.transpose(-1, -2) @ v  # (B, H, N, K, V): each chunk's own contribution
    decay = c[:, :, :, -1].exp().unsqueeze(-1)  # (B, H, N, K, 1)
    entering = []
    for decay_n, written_n in zip(decay.unbind(2), written.unbind(2)):  # unbind: one backward for all
        entering.append(state)
        state = decay_n * state + written_n
    y = y + r_in @ torch.stack(entering, dim=2)
    return y.reshape(B, H, N * chunk, -1)[:, :, :T], state


def wkv(r, k, v, logw, u, state, chunk: int):
    """The WKV over T tokens (T = 1: the recurrent step), in float32 at least and outside autocast."""
    B, H, T, K = r.shape
    dtype = torch.promote_types(r.dtype, torch.float32)
    with torch.autocast(r.device.type, enabled=False):
        r, k, v, logw, u = (t.to(dtype) for t in (r, k, v, logw, u))
        state = r.new_zeros(B, H, K, v.size(-1)) if state is None else state.to(dtype)
        if T == 1:
            y, state = wkv_step(r[:, :, 0], k[:, :, 0], v[:, :, 0], logw[:, :, 0], u, state)
            return y.unsqueeze(2), state
        return wkv_chunked(r, k, v, logw, u, state, chunk)


# The blocks --------------------------------------------------------------------------------------------


def token_shift(x, previous):
    """x (B, T, C) -> the previous token's x at every position; `previous` (B, C) is the one before
    x[:, 0] (None: zeros, the start of a text)."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        C, self.head_size, self.chunk = cfg.n_embd, cfg.head_size, cfg.chunk_size
        self.n_head = C // cfg.head_size
        depth = layer / max(cfg.n_layer - 1, 1)  # 0 at the first layer, 1 at the last
        fading = 1.0 - layer / cfg.n_layer  # 1 at the first layer, towards 0
        ch = torch.arange(C) / C
        self.mix_x = nn.Parameter(1.0 - ch ** fading)
        # Mix coefficients of (decay, key, value, receptance, gate): 0 = this token, 1 = the previous.
        self.mix = nn.ParameterList(nn.Parameter(m) for m in (
            1.0 - ch ** fading, 1.0 - ch ** fading, 1.0 - (ch ** fading + 0.3 * depth),
            1.0 - ch ** (0.5 * fading), 1.0 - ch ** (0.5 * fading)))
        self.mix_down = nn.Linear(C, 5 * cfg.mix_rank, bias=False)
        self.mix_up = nn.ModuleList(nn.Linear(cfg.mix_rank, C, bias=False) for _ in range(5))
        n = torch.arange(C) / max(C - 1, 1)
        self.decay = nn.Parameter(-6.0 + 5.0 * n ** (0.7 + 1.3 * depth))  # log(-log w) before the LoRA
        self.decay_down = nn.Linear(C, cfg.decay_rank, bias=False)
        self.decay_up = nn.Linear(cfg.decay_rank, C, bias=False)
        zigzag = ((torch.arange(C) + 1) % 3 - 1) * 0.1
        self.bonus = nn.Parameter(depth * (1.0 - n) + zigzag)  # u
        self.receptance, self.key, self.value, self.gate, self.output = (nn.Linear(C, C, bias=False)
                                                                         for _ in range(5))
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=64e-5)  # RWKV-6: 1e-5 * head_size_divisor (8) ** 2
        with torch.no_grad():
            for lin in (self.mix_down, self.decay_down):
                lin.weight.zero_()
            for lin in (*self.mix_up, self.decay_up):
                lin.weight.uniform_(-0.01, 0.01)
            for lin, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.gate, 0.1)):
                nn.init.orthogonal_(lin.weight, gain=gain)
            self.output.weight.zero_()
            self.ln_x.weight.fill_(((1 + layer) / cfg.n_layer) ** 0.7)

    def forward(self, x, state):
        """x (B, T, C) after LayerNorm; state (previous x (B, C), WKV state (B, H, K, K)) or None."""
        B, T, C = x.shape
        previous, s = state if state is not None else (None, None)
        dx = token_shift(x, previous) - x
        lora = torch.tanh(self.mix_down(x + dx * self.mix_x)).view(B, T, 5, -1)
        xw, xk, xv, xr, xg = (x + dx * (mu + up(lora[:, :, i]))
                              for i, (mu, up) in enumerate(zip(self.mix, self.mix_up)))
        loglog = self.decay + self.decay_up(torch.tanh(self.decay_down(xw)))  # log(-log w)
        logw = -torch.exp(loglog.clamp(max=math.log(-LOG_DECAY_MIN)))

        def heads(t):
            return t.view(B, T, self.n_head, self.head_size).transpose(1, 2)

        y, s = wkv(heads(self.receptance(xr)), heads(self.key(xk)), heads(self.value(xv)), heads(logw),
                   self.bonus.view(self.n_head, self.head_size), s, self.chunk)
        y = self.ln_x(y.transpose(1, 2).reshape(B * T, C).to(x.dtype)).view(B, T, C)
        return self.output(y * F.silu(self.gate(xg))), (x[:, -1].clone(), s)


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        C = cfg.n_embd
        fading = 1.0 - layer / cfg.n_layer
        ch = torch.arange(C) / C
        self.mix_k = nn.Parameter(1.0 - ch ** fading)
        self.mix_r = nn.Parameter(1.0 - ch ** fading)
        self.key = nn.Linear(C, cfg.ffn_width, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.ffn_width, C, bias=False)
        with torch.no_grad():
            nn.init.orthogonal_(self.key.weight, gain=math.sqrt(cfg.ffn_width / C))
            self.receptance.weight.zero_()
            self.value.weight.zero_()

    def forward(self, x, previous):
        dx = token_shift(x, previous) - x
        k = torch.relu(self.key(x + dx * self.mix_k)).square()
        return torch.sigmoid(self.receptance(x + dx * self.mix_r)) * self.value(k), x[:, -1].clone()


class Block(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.att, self.ffn = TimeMix(cfg, layer), ChannelMix(cfg, layer)

    def forward(self, x, state=None):
        att_state, ffn_state = state if state is not None else (None, None)
        a, att_state = self.att(self.ln1(x), att_state)
        x = x + a
        f, ffn_state = self.ffn(self.ln2(x), ffn_state)
        return x + f, (att_state, ffn_state)


class RWKV(LanguageModel):
    vocab_tensors = ("emb.weight", "head.weight")

    def __init__(self, cfg: RWKVConfig):
        super().__init__(cfg)
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.emb.weight.uniform_(-1e-4, 1e-4)  # the scale is ln0's
            nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(max(cfg.vocab_size / cfg.n_embd, 1.0)))

    def forward(self, idx, targets=None):
        logits, _ = self.step(idx, None)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        return logits, loss

    def step(self, idx, state):
        """Logits for the tokens idx (B, T) read after `state` (one per block; None: the start of
        a text), and the state after them (model/recurrent.py)."""
        x = self.ln0(self.emb(idx))
        after = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state[i])
            after.append(s)
        return self.head(self.ln_out(x)), after

    # The family interface (model/base.py) ----------------------------------------------------

    def embedding_params(self):
        return [self.emb.weight]

    def head_params(self):
        return [self.head.weight]

    def units(self):
        return self.blocks

    def flops_per_token(self) -> int:
        c = self.cfg
        matmul_weights = sum(p.numel() for p in self.parameters() if p.dim() == 2) - self.emb.weight.numel()
        return 6 * matmul_weights + 15 * c.n_layer * c.n_embd * c.head_size

    def decoder(self, use_cache: bool = True, decode: str = "dynamic", max_len: int = 0):
        return recurrent_decoder(self, use_cache)
