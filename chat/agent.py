"""Generating an assistant turn that may call tools: the calculator's output fed back as forced tokens.

    tokens = generate_turn(model, template, idx, max_new_tokens, sampling, tools=True)

The model writes `<|tool_call_start|> EXPR <|tool_call_end|>` inside its turn (it learned to,
chat/template.py); when a row's call ends, the calculator runs on EXPR (chat/tools.py) and
`<|tool_output_start|> VALUE <|tool_output_end|>` (or `error: ...`) becomes that row's next
tokens, forced instead of sampled, and the model goes on writing after them. The turn ends at
`<|assistant_end|>`, at any other special token but the four tool tokens, or at the token limit
(forced tokens count against it). With `tools=False` nothing is run: the tool tokens are
ordinary tokens and the model writes on by itself (a call it makes gets whatever output it
imagines), which is how `--no-tools` measures what the model does without the calculator.

Design decisions:
- Forced tokens go through the same decoding step as sampled ones (model/generate.py's
  `steer` replaces a row's sampled token by the next forced one): each row of a batch follows
  its own calls and outputs, the KV cache is kept and extended as for any token, and a row's
  tokens are exactly those it gets alone, or without the cache. Feeding an output costs one
  decoding step per token instead of one prefill, which for outputs of a few tokens is noise
  next to the simplicity of never splitting the batch.
- The expression is the text between the row's last `<|tool_call_start|>` and the call's end;
  whatever it is, the calculator answers in bounded time and never raises, so a model that
  writes garbage reads an error and cannot hang or break generation.
- `turn_messages` turns a generated turn back into messages (assistant with `tool_call`, tool,
  assistant), so the REPL's history renders to exactly the tokens the model saw; the answer a
  task reads is the text after the last tool output (`final_text`).
"""

from __future__ import annotations

from collections import deque

import torch

from chat.template import ChatTemplate
from chat.tools import calculate
from common.errors import UserError
from model.generate import Sampling, generate

TOOL_TOKENS = ("<|tool_call_start|>", "<|tool_call_end|>", "<|tool_output_start|>", "<|tool_output_end|>")


class ToolUse:
    """Per-row state of a batch of turns: every token so far, and the forced tokens queued."""

    def __init__(self, template: ChatTemplate, finished: torch.Tensor, tools: bool = True):
        ids = template.special_ids
        self.template, self.finished, self.tools = template, finished, tools
        self.call_start, self.call_end, self.output_start, self.output_end = (ids[t] for t in TOOL_TOKENS)
        self.ends = set(ids.values()) - {ids[t] for t in TOOL_TOKENS}  # tokens that end a turn
        self.rows: list[list[int]] = [[] for _ in range(len(finished))]
        self.forced = [deque() for _ in range(len(finished))]

    def steer(self, sampled: torch.Tensor) -> torch.Tensor:
        """model/generate.py's hook: a row's next forced token replaces its sampled one."""
        tokens, done = sampled.tolist(), self.finished.tolist()
        for r, tok in enumerate(tokens):
            if done[r]:
                continue
            if self.forced[r]:
                tok = tokens[r] = self.forced[r].popleft()
            elif tok == self.call_end and self.tools:
                self.forced[r].extend(self.output_ids(self.rows[r]))
            self.rows[r].append(tok)
        return torch.tensor(tokens, dtype=sampled.dtype, device=sampled.device)

    def output_ids(self, row: list[int]) -> list[int]:
        starts = [i for i, t in enumerate(row) if t == self.call_start]
        call = row[starts[-1] + 1:] if starts else row
        tokenizer = self.template.tokenizer
        expression = tokenizer.decode([t for t in call if t not in self.template.special_ids.values()])
        return [self.output_start, *encodable(tokenizer, calculate(expression)), self.output_end]


def encodable(tokenizer, text: str) -> list[int]:
    """`text` encoded, skipping characters a char vocabulary lacks (an error text may use some)."""
    try:
        return tokenizer.encode(text)
    except UserError:
        return [i for c in text for i in _or_nothing(tokenizer, c)]


def _or_nothing(tokenizer, c: str) -> list[int]:
    try:
        return tokenizer.encode(c)
    except UserError:
        return []


@torch.no_grad()
def generate_turn(model, template: ChatTemplate, idx: torch.Tensor, max_new_tokens: int, sampling: Sampling,
                  generator: torch.Generator | None = None, tools: bool = True, use_cache: bool = True,
                  on_token=None) -> list[list[int]]:
    """Each row's turn (B rows of prompts of one length), tool outputs included; a row ends with
    the token that ended it, if any. `on_token(row, token)` sees every token as it comes."""
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    state = ToolUse(template, finished, tools)
    for step in generate(model, idx, max_new_tokens, sampling, generator, template.assistant_end_id,
                         use_cache=use_cache, finished=finished, steer=state.steer):
        for r, tok in enumerate(step.tolist()):
            if tok < 0:
                continue
            if tok in state.ends:
                finished[r] = True
            if on_token is not None:
                on_token(r, tok)
    return state.rows


def turn_messages(template: ChatTemplate, tokens: list[int]) -> list[dict]:
    """A generated turn as messages: (assistant with tool_call, tool)* then the final assistant
    text. A call left without an output (tools off, or the token limit) is dropped."""
    ids = template.special_ids
    call_start, call_end, output_start, output_end = (ids[t] for t in TOOL_TOKENS)
    decode = template.tokenizer.decode
    messages, parts, where = [], {"text": [], "call": [], "output": []}, "text"
    for tok in tokens:
        if tok == call_start:
            where, parts["call"] = "call", []
        elif tok == output_start:
            where, parts["output"] = "output", []
        elif tok in (call_end, output_end):
            if tok == output_end and parts["call"]:
                messages += [{"role": "assistant", "content": decode(parts["text"]), "tool_call": decode(parts["call"])},
                             {"role": "tool", "content": decode(parts["output"])}]
                parts = {"text": [], "call": [], "output": []}
            where = "text"
        elif tok in ids.values():
            break
        else:
            parts[where].append(tok)
    return messages + [{"role": "assistant", "content": decode(parts["text"])}]


def final_text(template: ChatTemplate, tokens: list[int]) -> str:
    """The text the assistant wrote after its last tool output: where a task reads the answer."""
    return turn_messages(template, tokens)[-1]["content"]
