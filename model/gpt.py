"""A decoder-only transformer (GPT), as a function of its config alone.

The defaults are GPT-2: learned absolute positions, pre-norm LayerNorm blocks, GELU MLP, an LM
head tied to the token embedding, and GPT-2's initialisation (N(0, 0.02), residual
projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow
with depth). Modern options (rotary positions, RMSNorm, SwiGLU/ReLU², QK-norm, grouped-query
attention, untied head, logit soft-capping) are config choices; see model/layers.py.

Interface, shared by training, evaluation and generation:
    logits, loss = model(idx, targets=None, kv_caches=None, start_pos=0)
idx (B, T) token ids; logits (B, T, vocab); loss is the mean cross-entropy over targets that
are not -1, or None without targets. In compiled training (targets given, gradients enabled,
under torch.compile) the logits are None: the loss is fused with the head's matmul. With
kv_caches (one per block), idx holds the T tokens after the `start_pos` tokens already cached.
With learned positions start_pos + T must fit in block_size; rotary models accept any length
(attention then slides over a block_size window).
start_pos may also be a 0-dim tensor on the device (the CUDA-graph decode step in
model/generate.py: one captured graph serves every position); the caller then checks the range.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers import NORMS, Block, Rotary
from model.loss import linear_cross_entropy


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be resolved from the tokenizer before building"
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.block_size) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = NORMS[cfg.norm](cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_caches=None, start_pos: int | torch.Tensor = 0):
        B, T = idx.shape
        if isinstance(start_pos, int) and start_pos + T > self.cfg.block_size and self.wpe is not None:
            # Rotary models run past the context with sliding-window attention (model/layers.py).
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size {self.cfg.block_size} "
                             f"(learned positions have no embedding beyond it)")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device) + start_pos)
        rotary = self.rotary(start_pos, T) if self.rotary is not None else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, kv_caches[i] if kv_caches is not None else None)
        x = self.ln_f(x)
        if targets is not None and torch.is_grad_enabled() and torch.compiler.is_compiling():
            # Compiled training: the head's matmul fused with the loss, the logits never kept
            # (model/loss.py). Only a compiler fuses it: in eager its temporaries cost more.
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, self.cfg.logit_softcap)
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (they cost no matmul FLOPs),
        as GPT-2's figures are quoted. Tied weights count once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context: 6 per parameter plus
        attention's 12 * layers * head_dim * heads * context (the PaLM paper's estimate)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
