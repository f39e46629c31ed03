"""Generation for recurrent families (LSTM, RWKV): the state carried from token to token.

A recurrent family implements `step(idx, state) -> (logits, state)`: it reads the T tokens in
idx (B, T) after those the state has already seen (state None: nothing seen, the zero state) and
returns the logits at each of them and the state after the last. `CarriedState` prefills the
prompt with one such call and then feeds one token per step, so a token costs the same whatever
the length of the text so far, and memory stays constant. Nothing is cropped to block_size: the
state summarises the whole history (the models train on block_size windows, so far past it they
extrapolate, as any RNN sampled beyond its training length does).

`Recompute` is the reference the carried state is checked against: a full forward from the zero
state over the whole sequence for every token (quadratic in the length; for tests and
`sample.py --no-kv-cache`).
"""

from __future__ import annotations

import torch


class CarriedState:
    def __init__(self, model):
        self.model, self.state, self.seen = model, None, 0

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model.step(tokens[:, self.seen:], self.state)
        self.seen = tokens.shape[1]
        return logits[:, -1]


class Recompute:
    def __init__(self, model):
        self.model = model

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.step(tokens, None)[0][:, -1]


def recurrent_decoder(model, use_cache: bool):
    return CarriedState(model) if use_cache else Recompute(model)
