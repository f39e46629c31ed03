"""A decoder-only transformer (GPT), as a function of its config alone.

The defaults are GPT-2: learned absolute positions, pre-norm LayerNorm blocks, GELU MLP, an LM
head tied to the token embedding, and GPT-2's initialisation (N(0, 0.02), residual
projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow
with depth). Modern options (rotary positions, RMSNorm, SwiGLU/ReLU², QK-norm, grouped-query
attention, untied head, logit soft-capping) are config choices; see model/layers.py.

Beyond the family interface (model/base.py), forward takes a KV cache for generation:
    logits, loss = model(idx, targets=None, kv_caches=None, start_pos=0)
In compiled training (targets given, gradients enabled, under torch.compile) the logits are
None: the loss is fused with the head's matmul. With kv_caches (one per block), idx holds the T
tokens after the `start_pos` tokens already cached. With learned positions start_pos + T must
fit in block_size; rotary models accept any length (attention then slides over a block_size
window). start_pos may also be a 0-dim tensor on the device (the CUDA-graph decode step in
model/kv_cache.py: one captured graph serves every position), or a (B,) tensor giving each row
its own position (continuous batching, model/kv_rows.py); the caller then checks the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checks import at_least, choice, in_range, positive
from common.errors import UserError
from model.base import IGNORE, LanguageModel, ModelConfig
from model.layers import Block, Rotary, make_norm, mlp_width
from model.loss import linear_cross_entropy


@dataclass
class GPTConfig(ModelConfig):
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int = 0  # key/value heads: 0 = n_head; fewer gives grouped-query, 1 multi-query
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms
    pos: str = "learned"  # learned | rope
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 0.0  # the norms' epsilon: 0 = 1e-5 for layernorm, 1e-6 for rmsnorm (QK-norm: the dtype's)
    mlp: str = "gelu"  # gelu | gelu_tanh (GPT-2's tanh approximation) | swiglu | relu2
    mlp_hidden: int = 0  # MLP width: 0 = 4*n_embd (gelu, relu2) or 8/3*n_embd rounded to 64 (swiglu)
    qk_norm: bool = False  # normalise queries and keys per head before attention
    tie_weights: bool = True  # LM head shares the token embedding matrix
    logit_softcap: float = 0.0  # 0 = off; else logits = c * tanh(logits / c)

    def validate(self):
        super().validate()
        positive(self, "model", "n_layer", "n_head", "n_embd")
        at_least(self, "model", 0, "n_kv_head", "mlp_hidden", "logit_softcap", "norm_eps")
        in_range(self, "model", "dropout", 0.0, 1.0, high_open=True)
        choice(self, "model", "pos", ("learned", "rope"))
        choice(self, "model", "norm", ("layernorm", "rmsnorm"))
        choice(self, "model", "mlp", ("gelu", "gelu_tanh", "swiglu", "relu2"))
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"model.pos=rope needs an even head size; n_embd/n_head = {self.n_embd // self.n_head}")
        if self.rope_base <= 1:
            raise UserError(f"model.rope_base={self.rope_base} must be > 1")


class GPT(LanguageModel):
    vocab_tensors = ("wte.weight", "lm_head.weight")

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.block_size) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
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
            rows = isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1  # (B,) -> positions (B, T)
            x = x + self.wpe(torch.arange(T, device=idx.device) + (start_pos[:, None] if rows else start_pos))
        rotary = self.rotary(start_pos, T) if self.rotary is not None else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, kv_caches[i] if kv_caches is not None else None)
        x = self.ln_f(x)
        if targets is not None and torch.is_grad_enabled() and torch.compiler.is_compiling():
            # Compiled training: the head's matmul fused with the loss, the logits never kept
            # (model/loss.py). Only a compiler fuses it: in eager its temporaries cost more.
            head = self.lm_head  # a LoRA-adapted head (model/lora.py) folds its adapters into the weight
            weight = head.adapted_weight() if hasattr(head, "adapted_weight") else head.weight
            return None, linear_cross_entropy(x, weight, targets, self.cfg.logit_softcap)
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE)
        return logits, loss

    # The family interface (model/base.py) ----------------------------------------------------

    def embedding_params(self):
        return [self.wte.weight] + ([self.wpe.weight] if self.wpe is not None else [])

    def head_params(self):
        return [self.lm_head.weight]

    def units(self):
        return self.blocks

    def row_blocks(self):
        c = self.cfg  # c_attn stacks W_q (n_head heads), W_k and W_v (n_kv_head heads each)
        kv = (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)
        return {id(block.attn.c_attn.weight): (c.n_embd, kv, kv) for block in self.blocks}

    def lora_targets(self):
        layers = range(self.cfg.n_layer)
        return {"attn": [f"blocks.{i}.attn.{n}" for i in layers for n in ("c_attn", "c_proj")],
                "mlp": [f"blocks.{i}.mlp.{n}" for i in layers for n in ("c_fc", "c_proj")],
                "head": ["lm_head"]}

    def flops_per_token(self) -> int:
        """Training FLOPs per token at full context: 6 per matmul weight plus attention's
        12 * layers * width * context (the PaLM paper's estimate; the scores and the weighted sum
        of values, forward and backward)."""
        c = self.cfg
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def activation_bytes(self, batch: int, element_size: int, device_type: str = "cpu", attention: str = "auto",
                         checkpointing: bool = False) -> int:
        """What a training forward keeps for backward, per layer and token (in the compute dtype,
        e bytes, except the residual stream that the norms read, float32), as autograd's saved
        tensors show it for each variant (tests/test_plan.py checks it against them):
          attention  norm input and output, q/k/v, the output; rotated (rope) or normalised
                     (qk_norm) queries and keys once more, 1.5x their width; the kernel's
                     log-sum-exp per head, or with the math kernel (train.attention=math, or
                     dropout on CPU) the heads x context scores per token: twice, three times
                     with dropout
          MLP        norm input and output; the hidden width twice (gelu and relu2: the
                     activation's input or output and the down projection's input), four
                     times for swiglu (gate and up, their product, silu's output)
          rmsnorm    one more width per norm (F.rms_norm runs decomposed); dropout: one width
                     per residual dropout
        Outside the layers: the final norm's input and output. With activation checkpointing
        each layer keeps its input, and one layer's activations exist at a time in backward."""
        c, e, r = self.cfg, element_size, 4
        width, kv, hidden = c.n_embd, (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head), mlp_width(c)
        math_kernel = attention == "math" or (device_type == "cpu" and c.dropout > 0)
        attn = r * width + e * (width + (width + 2 * kv) + width)
        if c.pos == "rope" or c.qk_norm:
            attn += e * 3 * (width + kv) // 2
        if math_kernel:
            attn += c.n_head * c.block_size * e * (3 if c.dropout > 0 else 2)
        else:
            attn += c.n_head * 4
        mlp = r * width + e * width + e * hidden * (4 if c.mlp == "swiglu" else 2)
        extra = (2 * r * width if c.norm == "rmsnorm" else 0) + (2 * e * width if c.dropout > 0 else 0)
        layer = attn + mlp + extra
        outside = r * width + e * width + (r * width if c.norm == "rmsnorm" else 0)
        layers = c.n_layer * layer if not checkpointing else c.n_layer * r * width + layer
        return batch * c.block_size * (layers + outside)

    def logits_bytes(self, batch: int, element_size: int, compiled: bool = False) -> int:
        """Compiled training fuses the head with the loss (model/loss.py): the logits exist only
        inside it, and what backward needs is their gradient in the compute dtype."""
        if not compiled:
            return super().logits_bytes(batch, element_size)
        return batch * self.cfg.block_size * self.cfg.vocab_size * 2 * element_size

    def decoder(self, use_cache: bool = True, decode: str = "dynamic", max_len: int = 0):
        from model.kv_cache import KVDecoder

        return KVDecoder(self, use_cache, decode, max_len)

    def rows_decoder(self, capacity: int):
        from model.kv_rows import KVRows

        return KVRows(self, capacity)
