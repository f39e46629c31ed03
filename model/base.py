"""The model interface: what the trainer, the sampler and the tools need from a model family.

A family (GPT, LSTM, RWKV, n-gram) is one module in `model/` holding a config dataclass (a
subclass of `ModelConfig`) and a model (a subclass of `LanguageModel`), registered by name in
`model/__init__.py`. Nothing outside `model/` knows a family's insides: `train.py`, `sample.py`,
the optimizer, the distributed wrappers and the converters go through these methods only.

    logits, loss = model(idx, targets=None)
        idx (B, T) token ids -> logits (B, T, vocab) for the next token at every position; loss is
        the mean cross-entropy over targets that are not IGNORE (-1), or None without targets.
    model.param_groups() -> {"embed" | "head" | "matrix" | "vector" | "adapter": [parameters]}
        how the optimizer treats each trainable parameter: token/position lookups (their own lr),
        an untied output head (its own lr), hidden 2-D weights (Muon's, or decayed AdamW),
        gains, biases and other vectors (AdamW without decay), and LoRA's adapters (AdamW
        without decay; the modules of model/lora.py say which they are).
    model.units() -> nn.ModuleList | None
        the repeated blocks: what FSDP shards one by one and activation checkpointing wraps.
    model.flops_per_token() -> int
        training FLOPs (forward + backward) per token, lookups excluded, for MFU.
    model.decoder(...) -> Decoder
        generation state: `next_logits(tokens)` takes the whole sequence so far and feeds the
        model only what it has not seen (a KV cache, a recurrent state, the last n-1 tokens).
    model.rows_decoder(capacity) -> RowsDecoder
        generation state for rows that join and leave at any step (continuous batching, the
        server's engine: model/engine.py). By default one `decoder` per row, stepped one after
        another; a family opts in to batched steps by overriding it (GPT: model/kv_rows.py).
    model.activation_bytes(batch, element_size, ...) / model.logits_bytes(batch, element_size, ...)
        what a training forward keeps for its backward, and the loss's logits at their peak: the
        pre-flight memory estimate (trainer/footprint.py). The defaults fit a stack of linear layers.
    model.trainable
        False for a counted model (the n-gram): the loop fits it in one pass, with no optimizer.
    model.vocab_tensors
        state-dict names of the tensors indexed by token id in their first dimension (embedding,
        head), so a vocabulary can grow (`init_from` with added tokens) without knowing the family.
    model.lora_targets() -> {"attn" | "mlp" | "head": [module names]}
        the nn.Linear projections LoRA may adapt, by kind (model/lora.py); {} for none.

Design decisions:
- The config is the model: a family's model is a function of its config alone (and a seed), so a
  checkpoint's config rebuilds it. Options that do not apply to a family are config errors.
- The interface is a base class with defaults, not a protocol: the defaults (parameter roles by
  shape, no units, 6 FLOPs per matmul weight) are right for most families, and a family
  overrides only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from common.checks import at_least, positive

IGNORE = -1  # a target that takes no part in the loss (masked prompt, padding)


def padded_vocab(tokenizer_vocab: int) -> int:
    """The model's vocabulary for a tokenizer's: large ones are padded to a multiple of 64 for
    faster matmuls (50257 -> 50304; the sampler never emits the padding ids), small ones exact."""
    return tokenizer_vocab if tokenizer_vocab < 1024 else (tokenizer_vocab + 63) // 64 * 64


@dataclass
class ModelConfig:
    """The keys every family has; a family's config adds its own."""

    arch: str = "gpt"  # the model family: gpt | lstm | rwkv | ngram (model/__init__.py)
    vocab_size: int = 0  # 0: taken from the tokenizer (padded up to a multiple of 64 when >= 1024)
    block_size: int = 256  # context length in tokens: training windows, and what generation sees

    def validate(self):
        positive(self, "model", "block_size")
        at_least(self, "model", 0, "vocab_size")


class Decoder(Protocol):
    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N), the whole sequence so far -> logits (B, vocab) for token N."""


class LanguageModel(nn.Module):
    trainable = True
    vocab_tensors: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("vocab_size must be resolved from the tokenizer before building")
        self.cfg = cfg

    # What the optimizer needs --------------------------------------------------------------

    def embedding_params(self) -> list[nn.Parameter]:
        """Parameters used as lookup tables (token and position embeddings)."""
        return []

    def head_params(self) -> list[nn.Parameter]:
        """An output head with its own learning rate (an untied LM head); a tied one is an embedding."""
        return []

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        embed = {id(p) for p in self.embedding_params()}
        head = {id(p) for p in self.head_params()} - embed
        adapter = {id(p) for m in self.modules() if hasattr(m, "adapter_parameters") for p in m.adapter_parameters()}
        groups = {"embed": [], "head": [], "matrix": [], "vector": [], "adapter": []}
        for p in self.parameters():  # tied parameters appear once
            if not p.requires_grad:
                continue
            role = ("adapter" if id(p) in adapter else "embed" if id(p) in embed else "head" if id(p) in head
                    else "matrix" if p.dim() >= 2 else "vector")
            groups[role].append(p)
        return groups

    def row_blocks(self) -> dict[int, tuple[int, ...]]:
        """Weights that stack several linear maps by rows, as {id(parameter): each map's rows}:
        Muon orthogonalises them one map at a time (trainer/muon.py)."""
        return {}

    # What distribution and MFU need ------------------------------------------------------------

    def units(self) -> nn.ModuleList | None:
        return None

    def lora_targets(self) -> dict[str, list[str]]:
        return {}

    def num_params(self) -> int:
        """Parameters, tied ones counted once."""
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all but the lookups, plus the head's
        matrix when it is tied to the embedding (the lookup then costs nothing, the head does)."""
        lookups = sum(p.numel() for p in self.embedding_params())
        tied_head = sum(p.numel() for p in self.head_params() if any(p is e for e in self.embedding_params()))
        return self.num_params() - lookups + tied_head

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 2 per matmul weight forward, 4 backward (Kaplan et al.)."""
        return 6 * self.matmul_params()

    # What the pre-flight memory estimate needs (trainer/footprint.py) ------------------------

    def activation_bytes(self, batch: int, element_size: int, device_type: str = "cpu", attention: str = "auto",
                         checkpointing: bool = False) -> int:
        """Bytes one training forward over `batch` sequences of block_size tokens keeps for its
        backward, the loss's logits excluded (`logits_bytes`). element_size: bytes per element
        of the compute dtype (4 in float32, 2 under bf16/fp16 autocast); device_type and
        attention (`train.attention`) say which kernels run; checkpointing: each unit keeps only
        its input and recomputes the rest in backward (`train.activation_checkpointing`).
        The default counts what a stack of linear layers keeps per token: each nn.Linear's input
        and output, and each lookup's output; a family with other layers overrides it."""
        head = {id(p) for p in self.head_params()}

        def per_token(module) -> int:
            return sum(m.in_features + (0 if id(m.weight) in head else m.out_features)
                       for m in module.modules() if isinstance(m, nn.Linear))

        total = per_token(self) + sum(m.embedding_dim for m in self.modules() if isinstance(m, nn.Embedding))
        units = self.units()
        if checkpointing and units:
            kept = [per_token(unit) for unit in units]
            inputs = sum(next((m.in_features for m in unit.modules() if isinstance(m, nn.Linear)), 0)
                         for unit in units)
            total += inputs + max(kept) - sum(kept)
        return batch * self.cfg.block_size * element_size * total

    def logits_bytes(self, batch: int, element_size: int, compiled: bool = False) -> int:
        """Peak bytes of the loss over `batch` sequences: the logits (batch x block_size x vocab,
        in the compute dtype; the caller holds them through backward), their float32 copy under
        autocast, the cross-entropy's float32 log-probabilities, and in backward the float32
        gradients of both. `compiled`: under torch.compile (a family may fuse its loss there)."""
        elements = batch * self.cfg.block_size * self.cfg.vocab_size
        return elements * (element_size + (4 if element_size != 4 else 0) + 3 * 4)

    # Generation -----------------------------------------------------------------------------------

    def decoder(self, use_cache: bool = True, decode: str = "dynamic", max_len: int = 0) -> Decoder:
        """Generation state for one batch. use_cache=False recomputes from scratch each token (the
        reference the cached path is checked against); decode and max_len are hints a family may
        use (GPT: fixed-shape steps, captured as CUDA graphs or traces; tables sized for max_len positions)."""
        return Recompute(self)

    def rows_decoder(self, capacity: int):
        """Generation state for up to `capacity` rows that come and go (model/engine.py)."""
        from model.engine import SeparateRows

        return SeparateRows(self)


class Recompute:
    """The decoder with no state: a full forward over the last block_size tokens per token."""

    def __init__(self, model: LanguageModel):
        self.model = model

    def next_logits(self, tokens):
        return self.model(tokens[:, -self.model.cfg.block_size:])[0][:, -1]
