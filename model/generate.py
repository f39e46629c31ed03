"""Autoregressive generation for any model family, and the text it streams.

A family's decoder (model/base.py: `model.decoder(...)`) owns its state between tokens: GPT's
KV cache (model/kv_cache.py), a recurrent state, the last n-1 tokens. `generate` only asks it for
the next logits, samples, and keeps track of which rows have finished.

Sampling (`Sampling`): vocabulary limit (padded ids the tokenizer cannot decode), repetition
penalty, then temperature 0 = greedy, or temperature, top-k, top-p, drawn from a caller-owned
`torch.Generator`, so a seed gives the same text on a given device. A batch of samples shares
one prompt and runs as one batch; each row finishes on its own (end-of-text, or the caller
marks it, e.g. on a stop string) and the loop ends when all have. `TextStream` turns one
row's tokens into text: whole UTF-8 characters only, cut at the first stop string.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the context
    vocab_limit: int | None = None  # ids >= this are never drawn (vocabulary padding)


def penalise_repetition(logits, context, penalty: float):
    """CTRL's repetition penalty: the logit of every token present in the row's context
    (prompt included) is divided by `penalty` when positive and multiplied when negative."""
    seen = logits.gather(1, context)
    return logits.scatter(1, context, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample_next(logits, context, s: Sampling, generator=None) -> torch.Tensor:
    """One token id per row from logits (B, V); context (B, N) is the sequence so far."""
    # Each step below runs only when it changes something: at batch 1 on a CPU a token costs a
    # few milliseconds, and every small op is a few microseconds of it.
    logits = logits.float()
    if s.vocab_limit is not None and s.vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[:, s.vocab_limit:] = float("-inf")
    if s.repetition_penalty != 1.0:
        logits = penalise_repetition(logits, context, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one stays).
        drop = probs.cumsum(dim=-1) - probs >= s.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None,
             generator: torch.Generator | None = None, eot_id: int | None = None, use_cache: bool = True,
             finished: torch.Tensor | None = None, decode: str = "dynamic",
             steer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Continue idx (B, T) and yield each step's tokens (B,): a row's token, or -1 once the row
    has finished. A row finishes after yielding `eot_id`, or when the caller sets its entry
    in `finished` (a (B,) bool tensor it passed in, read before every step). Stops after
    max_new_tokens steps or when every row has finished. `use_cache` and `decode`: see the
    family's decoder (model/base.py; GPT's "graph" needs CUDA, its "trace" is for the CPU).
    `steer`, when given, sees each step's sampled tokens and returns the tokens to keep instead
    (forced tokens, e.g. a tool's output: chat/agent.py); they go through the decoder like
    sampled ones, cache and all."""
    model.eval()
    sampling = sampling or Sampling()
    B, N = idx.shape
    context = model.decoder(use_cache, decode, max_len=N + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device) if finished is None else finished
    # The sequence grows in one buffer, written in place: no copy of the history per token.
    tokens = idx.new_empty(B, N + max_new_tokens)
    tokens[:, :N] = idx
    for n in range(N, N + max_new_tokens):
        if finished.all():
            return
        nxt = sample_next(context.next_logits(tokens[:, :n]), tokens[:, :n], sampling, generator)
        if steer is not None:
            nxt = steer(nxt)
        nxt = nxt.masked_fill(finished, -1)
        if eot_id is not None:
            finished |= nxt == eot_id
        # A finished row keeps computing (rows are independent) on a harmless token.
        tokens[:, n] = nxt.clamp(min=0)
        yield nxt


class TextStream:
    """One sample's text, fed a token at a time. `feed` returns the text that is now final:
    whole UTF-8 characters only (a character may span tokens), and never a tail that could
    still grow into a stop string, so streamed text never has to be taken back. When the text
    contains a stop string it is cut just before it and `done` becomes true."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded but not yet released
        self.text = ""  # released so far
        self.done = False

    def feed(self, token: int) -> str:
        if self.done:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def close(self) -> str:
        """The rest of the text, once generation is over."""
        if not self.done:
            self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.done = self.pending[:min(hits)], "", True
        else:
            hold = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                        if self.pending.endswith(s[:k])), default=0)
            out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        self.text += out
        return out
