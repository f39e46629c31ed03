"""Autoregressive generation with a KV cache, beside the model and using its blocks.

The prompt is prefilled in one forward pass that fills each block's cache; every new token
then costs one position. When the context window fills, the cache is rebuilt from the last
half of the window (one prefill per block_size/2 tokens, so the cost stays amortised);
without the cache (`use_cache=False`, the slow reference path) the window is simply cropped.

Sampling: temperature (0 = greedy), top-k, top-p (nucleus), all from a caller-owned
`torch.Generator`, so a seed gives the same text on a given device.
"""

from __future__ import annotations

from typing import Iterator

import torch


class KVCache:
    """Keys and values of one block for positions [0, pos), preallocated to max_len."""

    def __init__(self, batch: int, n_kv_head: int, head_dim: int, max_len: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def update(self, k, v):
        T = k.shape[2]
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


def new_caches(model, batch: int, device, dtype) -> list[KVCache]:
    c = model.cfg
    return [KVCache(batch, c.n_kv_head or c.n_head, c.n_embd // c.n_head, c.block_size, device, dtype)
            for _ in range(c.n_layer)]


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """One token id per row from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one stays).
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, vocab_limit: int | None = None,
             use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token (B,) for each of max_new_tokens steps, continuing idx (B, T).
    vocab_limit masks padded vocabulary ids the tokenizer cannot decode."""
    model.eval()
    block = model.cfg.block_size
    dtype = next(model.parameters()).dtype
    tokens = idx
    caches = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(tokens[:, -block:])
        else:
            if caches is None or tokens.shape[1] > block:
                # (Re)build: prefill the last half window (all of a short prompt) in one pass.
                keep = tokens[:, -(block // 2 or 1):] if tokens.shape[1] > block else tokens
                tokens = keep
                caches = new_caches(model, tokens.shape[0], tokens.device, dtype)
                logits, _ = model(tokens, kv_caches=caches, start_pos=0)
            else:
                logits, _ = model(tokens[:, -1:], kv_caches=caches, start_pos=tokens.shape[1] - 1)
        logits = logits[:, -1, :]
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        yield nxt
