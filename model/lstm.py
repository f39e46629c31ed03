"""A multi-layer LSTM language model: the recurrent network of char-rnn and Zaremba et al. (2014).

    token embedding -> dropout -> LSTM 1 -> dropout -> ... -> LSTM n -> dropout -> [projection] -> head

Design decisions:
- One `torch.nn.LSTM` per layer, in a ModuleList, rather than one nn.LSTM with num_layers: the
  layers are the units that FSDP shards and activation checkpointing wraps (model/base.py
  `units`), and the dropout between layers is the same module as everywhere else.
- Truncated backpropagation through time over the loader's block_size windows: every window
  starts from the zero state, and gradients flow through its block_size steps only. The loader
  draws windows at random positions, so there is no previous window whose final state could be
  carried into the next (Zaremba et al. carry it over contiguous batches, which would need a
  sequential loader); evaluation uses the same zero-started windows, so train and val loss
  measure the same thing. Generation is not limited to a window: it carries the state from token
  to token for as long as it runs (model/recurrent.py).
- `tie_weights`: the head shares the embedding matrix (Press & Wolf 2017, Inan et al. 2017). The
  embedding is n_embd wide and the LSTM's output n_hidden: when they differ, a linear projection
  (n_hidden -> n_embd, no bias) sits before the head.
- Initialisation: embedding and head U(-0.1, 0.1) (PyTorch's word_language_model example), the
  LSTM's weights torch's default U(-1/sqrt(H), 1/sqrt(H)), and a forget-gate bias of 1
  (Jozefowicz et al. 2015: the cell keeps its memory by default, so gradients flow early on).
- Parameter roles for the optimizer (trainer/optim.py): the embedding is a lookup ("embed"); an
  untied head has its own lr ("head"); each layer's weight_ih (4H x input) and weight_hh
  (4H x H), the four gates stacked as torch stores them, and the projection are the "matrix"
  weights (Muon's under `optim.optimizer: muon`, which orthogonalises each stacked matrix as a
  whole); the gate biases are "vector".
- FLOPs per token: 6 per weight of a matmul (2 forward, 4 backward), the lookup excluded. The
  recurrent matmul W_hh h_{t-1} runs once per token like the input one, so W_hh counts in full.
  Elementwise work is not counted (the biases, and the cell's 3 sigmoids, 2 tanh, 3 products and
  a sum: ~10 H FLOPs per layer forward against 8 H (in + H) in its matmuls), as GPT's count
  leaves out its activations and norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checks import in_range, positive
from model.base import IGNORE, LanguageModel, ModelConfig
from model.recurrent import recurrent_decoder


@dataclass
class LSTMConfig(ModelConfig):
    arch: str = "lstm"
    n_layer: int = 2  # stacked LSTM layers
    n_embd: int = 128  # token embedding width (the first layer's input)
    n_hidden: int = 512  # hidden and cell state width of every layer
    dropout: float = 0.0  # on the embedding, between layers and before the head
    tie_weights: bool = False  # head shares the embedding (with a projection when n_hidden != n_embd)

    def validate(self):
        super().validate()
        positive(self, "model", "n_layer", "n_embd", "n_hidden")
        in_range(self, "model", "dropout", 0.0, 1.0, high_open=True)


class LSTMLayer(nn.LSTM):
    """One layer. torch returns batch-first output as a transposed view of its time-major result;
    as a unit's output FSDP warns about views (an in-place op on one would skip its hooks), so it
    is made contiguous here, which the next layer would do anyway."""

    def forward(self, x, hc=None):
        out, hc = super().forward(x, hc)
        return out.contiguous(), hc


class LSTM(LanguageModel):
    vocab_tensors = ("wte.weight", "lm_head.weight")

    def __init__(self, cfg: LSTMConfig):
        super().__init__(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(LSTMLayer(cfg.n_embd if i == 0 else cfg.n_hidden, cfg.n_hidden,
                                              batch_first=True) for i in range(cfg.n_layer))
        head_in = cfg.n_embd if cfg.tie_weights else cfg.n_hidden
        self.proj = nn.Linear(cfg.n_hidden, head_in, bias=False) if head_in != cfg.n_hidden else None
        self.lm_head = nn.Linear(head_in, cfg.vocab_size, bias=False)
        nn.init.uniform_(self.wte.weight, -0.1, 0.1)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        h = cfg.n_hidden
        with torch.no_grad():
            for layer in self.layers:  # gates stacked as (input, forget, cell, output)
                layer.bias_ih_l0[h:2 * h].fill_(1.0)
                layer.bias_hh_l0[h:2 * h].zero_()

    def forward(self, idx, targets=None):
        logits, _ = self.step(idx, None)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        return logits, loss

    def step(self, idx, state):
        """Logits for the tokens idx (B, T) read after `state` (a list of each layer's (h, c);
        None: the zero state), and the state after them (model/recurrent.py)."""
        x = self.drop(self.wte(idx))
        after = []
        for i, layer in enumerate(self.layers):
            x, hc = layer(x, None if state is None else state[i])
            x = self.drop(x)
            after.append(hc)
        if self.proj is not None:
            x = self.proj(x)
        return self.lm_head(x), after

    # The family interface (model/base.py) ----------------------------------------------------

    def embedding_params(self):
        return [self.wte.weight]

    def head_params(self):
        return [self.lm_head.weight]

    def units(self):
        return self.layers

    def flops_per_token(self) -> int:
        matrices = [p for layer in self.layers for p in (layer.weight_ih_l0, layer.weight_hh_l0)]
        matrices += [self.lm_head.weight] + ([self.proj.weight] if self.proj is not None else [])
        return 6 * sum(p.numel() for p in matrices)

    def decoder(self, use_cache: bool = True, decode: str = "dynamic", max_len: int = 0):
        return recurrent_decoder(self, use_cache)
