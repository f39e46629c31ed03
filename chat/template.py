"""The chat template: conversations as token ids, and which of them the model learns.

One template serves data prep, SFT, `sample.py --chat`, `evaluate.py` and the server. A
conversation is the OpenAI-style list `[{"role": "system"|"user"|"assistant"|"tool",
"content": str}, ...]` and renders as

    <|bos|> [<|system_start|> text <|system_end|>]
    <|user_start|> text <|user_end|> <|assistant_start|> text <|assistant_end|> ...

with a tool's output as `<|tool_output_start|> text <|tool_output_end|>` after the assistant turn
that called it. The mask is 1 exactly on the tokens the model must learn to produce: each
assistant turn's text and its `<|assistant_end|>` (the model must learn to stop). The
`<|assistant_start|>` token is context, never a target: the template, not the model, opens a
turn. Everything else (bos, system, user, tool output) is context too.

Design decisions:
- Special tokens are ids of their own, added to every tokenizer family by
  `data.tokenizer.with_chat_tokens`, and they exist only where the template puts them: message
  text is encoded with the tokenizer's plain `encode`, which never produces a special id, so a
  user who types `<|assistant_end|>` gets those characters, not the control token (a prompt
  cannot forge a turn).
- Each message's text is encoded on its own, between special tokens, so a tokenizer's merges
  never straddle a turn boundary and rendering for generation is exactly the prefix of
  rendering for training.
- The order of roles is checked here, once (`check_messages`), for data prep (which adds the
  file and line), the REPL and the server: an optional system message first, then user and
  assistant alternating, a tool message only right after an assistant turn and followed by one.
"""

from __future__ import annotations

from common.errors import UserError

SPECIAL_TOKENS = (
    "<|bos|>",  # beginning of a conversation
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|tool_call_start|>", "<|tool_call_end|>",  # inside an assistant turn (the tool-use work)
    "<|tool_output_start|>", "<|tool_output_end|>",  # a tool's answer: context, never a target
)
ROLES = ("system", "user", "assistant", "tool")
# Which roles may follow each role (None: the start of the conversation).
_NEXT = {None: ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user", "tool"),
         "tool": ("assistant",)}
_WRAP = {"system": ("<|system_start|>", "<|system_end|>"), "user": ("<|user_start|>", "<|user_end|>"),
         "assistant": ("<|assistant_start|>", "<|assistant_end|>"),
         "tool": ("<|tool_output_start|>", "<|tool_output_end|>")}


class ConversationError(UserError):
    """A conversation that breaks the format (the message says how, without saying where)."""


def has_chat_tokens(tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in SPECIAL_TOKENS)


def check_messages(messages, for_generation: bool = False):
    """Raise ConversationError unless `messages` is a conversation the template can render: one
    that ends with an assistant turn (training), or with a user or tool turn (generation)."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list")
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(f"messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ConversationError(f"messages[{i}]: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ConversationError(f"messages[{i}] ({role}): content must be a string, got {type(content).__name__}")
        if role not in _NEXT[previous]:
            where = "first" if previous is None else f"after {previous}"
            raise ConversationError(f"messages[{i}]: role {role} cannot come {where} (expected "
                                    f"{' or '.join(_NEXT[previous])})")
        if role == "assistant" and not content.strip():
            raise ConversationError(f"messages[{i}]: empty assistant turn")
        previous = role
    wanted = ("user", "tool") if for_generation else ("assistant",)
    if previous not in wanted:
        raise ConversationError(f"the last message is {previous}; "
                                f"{'a reply is generated after a user or tool message' if for_generation else 'a training conversation ends with an assistant turn'}")


class ChatTemplate:
    def __init__(self, tokenizer):
        if not has_chat_tokens(tokenizer):
            raise UserError("this model's tokenizer has no chat tokens; fine-tune it on chat data first "
                            "(python train.py configs/sft.yaml init_from=RUN_DIR)")
        self.tokenizer = tokenizer
        self.special_ids = {t: tokenizer.special_tokens[t] for t in SPECIAL_TOKENS}
        self.bos_id = self.special_ids["<|bos|>"]
        self.assistant_start_id = self.special_ids["<|assistant_start|>"]
        self.assistant_end_id = self.special_ids["<|assistant_end|>"]

    def render(self, messages) -> tuple[list[int], list[int]]:
        """(ids, mask) of a training conversation; mask is 1 on assistant text and assistant-end."""
        check_messages(messages)
        return self._render(messages)

    def render_for_generation(self, messages) -> list[int]:
        """The conversation so far, ending right after `<|assistant_start|>`: the model writes on."""
        check_messages(messages, for_generation=True)
        ids, _ = self._render(messages)
        return ids + [self.assistant_start_id]

    def _render(self, messages) -> tuple[list[int], list[int]]:
        ids, mask = [self.bos_id], [0]
        for m in messages:
            start, end = (self.special_ids[t] for t in _WRAP[m["role"]])
            text = self.tokenizer.encode(m["content"])
            learn = int(m["role"] == "assistant")
            ids += [start, *text, end]
            mask += [0] + [learn] * (len(text) + 1)
        return ids, mask
