"""The chat REPL behind `python sample.py --ckpt RUN_DIR --chat [--system TEXT]`.

Each line of stdin (a terminal or a pipe) is a user turn; the reply streams to stdout as it is
generated and ends with a newline. `/reset` starts a new conversation, `/exit` or the end of
input (Ctrl-D) leaves. On a terminal a `you> ` prompt and notices go to stderr; over a pipe
stdout holds the replies only, so a script can read them back line by line.

Design decisions:
- The conversation is kept as messages and rendered whole for every turn (chat/template.py
  `render_for_generation`): the prompt is exactly what the model was fine-tuned on. Re-encoding
  costs microseconds next to the forward pass over the prompt.
- A reply ends at `<|assistant_end|>`, or at any other special token but the tool tokens (a
  model that starts to write the user's next turn has finished its own), or at the token limit.
  A tool call the model writes is run and its output fed back (chat/agent.py; `--no-tools`
  turns that off); the call and output stream as their special-token strings, and the history
  keeps them as messages, so the next turn's prompt holds exactly what the model saw.
- The context window holds the prompt and room for a reply (`--max-new-tokens`, at most half
  the window): when a conversation outgrows it, the oldest turns (a user message and its reply)
  are dropped, the system message kept, and a notice on stderr says how many. A single message
  too long for the window is refused with a notice, and the REPL goes on.
- One generator, seeded once from `--seed`, serves the whole session: the same input lines
  give the same conversation.
"""

from __future__ import annotations

import sys

import torch

from chat.agent import generate_turn, turn_messages
from chat.template import ChatTemplate
from model.generate import Sampling, TextStream


def fit(template: ChatTemplate, system: list[dict], history: list[dict], window: int) -> tuple[list[int], int] | None:
    """(prompt ids, messages dropped from the front of history) so that the prompt fits in
    `window` tokens, dropping whole exchanges (a user message and the reply's messages); None
    when even the last message alone does not."""
    for start in (i for i, m in enumerate(history) if m["role"] == "user"):
        ids = template.render_for_generation(system + history[start:])
        if len(ids) <= window:
            return ids, start
    return None


def reply(model, template: ChatTemplate, ids: list[int], max_new_tokens: int, sampling: Sampling, generator,
          device, tools: bool = True) -> list[dict]:
    """Generate the assistant's reply to the prompt `ids`, streaming it to stdout; returns it as
    messages (tool calls and outputs, then the final text)."""
    out = sys.stdout
    stream = TextStream(template.tokenizer)
    ends = set(template.special_ids.values()) - set(template.special_ids[t] for t in
                                                     ("<|tool_call_start|>", "<|tool_call_end|>",
                                                      "<|tool_output_start|>", "<|tool_output_end|>"))

    def show(row: int, tok: int):
        if tok not in ends:
            out.write(stream.feed(tok))
            out.flush()

    idx = torch.tensor([ids], dtype=torch.long, device=device)
    tokens = generate_turn(model, template, idx, max_new_tokens, sampling, generator, tools=tools, on_token=show)[0]
    out.write(stream.close() + "\n")
    out.flush()
    return turn_messages(template, tokens)


def chat_repl(model, tokenizer, block_size: int, args, rt):
    template = ChatTemplate(tokenizer)  # refuses a model without chat tokens, in one line
    system = [{"role": "system", "content": args.system}] if args.system else []
    room = max(1, min(args.max_new_tokens, block_size // 2))  # kept free for the reply
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                        vocab_limit=tokenizer.vocab_size)
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    tty = sys.stdin.isatty()
    if tty:
        print("chat: /reset starts over, /exit or Ctrl-D leaves", file=sys.stderr)
    history: list[dict] = []
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input: Ctrl-D or the end of a pipe
            break
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = []
            print("(new conversation)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        fitted = fit(template, system, history + [{"role": "user", "content": text}], block_size - room)
        if fitted is None:
            print(f"(that message does not fit in the context window of {block_size} tokens with room for a "
                  f"reply; not sent)", file=sys.stderr)
            continue
        ids, dropped = fitted
        if dropped:
            turns = sum(m["role"] == "user" for m in history[:dropped])
            history = history[dropped:]
            print(f"(the conversation outgrew the context window of {block_size} tokens: dropped the "
                  f"{turns} oldest turn{'s' if turns > 1 else ''})", file=sys.stderr)
        with rt.autocast:
            answer = reply(model, template, ids, min(args.max_new_tokens, block_size - len(ids)), sampling, generator,
                           rt.device, tools=not args.no_tools)
        if answer[-1]["content"].strip():  # an empty reply is no turn: the template has no empty assistant turns
            history += [{"role": "user", "content": text}, *answer]
