"""Evaluate a chat model on held-out conversations: greedy answers, scored by exact match.

    python evaluate.py --ckpt RUN_DIR --data FILE.jsonl [--max-new-tokens N] [--no-tools] [--out results.jsonl]

For each conversation of FILE (the chat format of data/conversations.py, e.g. made by
`python -m chat.tasks NAME --split test`), the model generates the last assistant turn from the
messages before it (up to the last user message), greedily, until `<|assistant_end|>`, calling
the calculator when it writes a tool call (chat/agent.py; `--no-tools`: calls are not run, the
model writes on by itself). The answer is read from the reply's final text (after the last tool
output) as the conversation's `task` says (chat/tasks.py `answer`: the last integer for
addition, the whole reply otherwise) and compared with the same reading of the reference reply.
Prints one line per task when there are several, then `accuracy: K/N (P%)`; `--out` gets one
JSON line per conversation (its file and line, task, prompt, reply, the whole turn with its tool
calls and outputs, answer, expected answer, correct).

Design decisions:
- Conversations whose prompts have the same length are generated as one batch (up to
  `--batch-size`), each row stopping on its own, with the KV cache: no padding, so a row's
  answer is exactly what it would be alone.
- A reply stops at `<|assistant_end|>` or at any other special token but the tool tokens, as in
  the chat REPL; each row's tool outputs are forced into that row only (chat/agent.py).
- A prompt that leaves no room in the context window for a reply counts as wrong, with a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from chat.agent import final_text, generate_turn
from chat.tasks import answer
from chat.template import ChatTemplate
from common.errors import UserError, report_user_errors
from common.files import atomic_write
from data.conversations import read_conversations
from model.generate import Sampling
from trainer.checkpoint import load_model
from trainer.runtime import Runtime, pick_device, pick_dtype


@torch.no_grad()
def generate_replies(model, template: ChatTemplate, prompts: list[list[int]], max_new_tokens: int, block_size: int,
                     batch_size: int, device, tools: bool = True, turns: list | None = None) -> list[str | None]:
    """The greedy reply to each prompt (None where the prompt leaves no room for one): the final
    text of the turn. `turns`, when given a list, gets each whole turn (tool calls and outputs
    included, special tokens as their strings)."""
    sampling = Sampling(temperature=0, vocab_limit=template.tokenizer.vocab_size)
    replies: list[str | None] = [None] * len(prompts)
    if turns is not None:
        turns[:] = [None] * len(prompts)
    by_length = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    for length, rows in sorted(by_length.items()):
        budget = min(max_new_tokens, block_size - length)
        if budget <= 0:
            continue
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            made = generate_turn(model, template, idx, budget, sampling, tools=tools)
            for r, i in enumerate(chunk):
                replies[i] = final_text(template, made[r])
                if turns is not None:
                    turns[i] = template.tokenizer.decode(made[r])
    return replies


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to its last user message: what the model answers (the reference
    turn after it may hold tool calls and outputs)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[:last_user + 1]


def score(records: list[tuple[dict, str]], replies: list[str | None], turns: list | None = None) -> list[dict]:
    results = []
    for n, ((record, where), reply) in enumerate(zip(records, replies)):
        task = record.get("task")
        expected = answer(task, record["messages"][-1]["content"])
        got = answer(task, reply) if reply is not None else None
        results.append({"where": where, "task": task, "prompt": prompt_messages(record["messages"])[-1]["content"],
                        "reply": reply, **({"turn": turns[n]} if turns else {}), "answer": got, "expected": expected,
                        "correct": got == expected})
    return results


def report(results: list[dict]) -> str:
    def line(label, rows):
        k, n = sum(r["correct"] for r in rows), len(rows)
        return f"{label}: {k}/{n} ({100 * k / n:.1f}%)"

    tasks = Counter(r["task"] for r in results)
    lines = [line(task or "(no task)", [r for r in results if r["task"] == task]) for task in tasks] if len(tasks) > 1 else []
    return "\n".join(lines + [line("accuracy", results)])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score a chat model's greedy answers on held-out conversations.")
    ap.add_argument("--ckpt", required=True, help="run folder (best.pt, else latest.pt) or checkpoint file")
    ap.add_argument("--data", required=True, help="chat JSONL: each conversation's last assistant turn is the reference")
    ap.add_argument("--max-new-tokens", type=int, default=100, help="most tokens per reply")
    ap.add_argument("--batch-size", type=int, default=64, help="conversations generated together")
    ap.add_argument("--no-tools", action="store_true", help="do not run the model's tool calls (chat/agent.py)")
    ap.add_argument("--out", default=None, help="write one JSON line of results per conversation here")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        for name, ok in (("--max-new-tokens", args.max_new_tokens >= 1), ("--batch-size", args.batch_size >= 1)):
            if not ok:
                raise UserError(f"{name}={getattr(args, name[2:].replace('-', '_'))} is out of range")
        if not Path(args.data).is_file():
            raise UserError(f"--data: no such file: {args.data}")
        records = list(read_conversations(Path(args.data)))
        if not records:
            raise UserError(f"--data: {args.data} holds no conversation")
        device = pick_device(args.device)
        rt = Runtime(device, pick_dtype("auto", device))
        model, tokenizer, cfg, _ = load_model(args.ckpt, device)
        template = ChatTemplate(tokenizer)
        prompts = [template.render_for_generation(prompt_messages(record["messages"])) for record, _ in records]
        turns: list = []
        with rt.autocast:
            replies = generate_replies(model, template, prompts, args.max_new_tokens, cfg.model.block_size,
                                       args.batch_size, device, tools=not args.no_tools, turns=turns)
        skipped = sum(r is None for r in replies)
        if skipped:
            print(f"warning: {skipped} prompt(s) leave no room for a reply in the context window of "
                  f"{cfg.model.block_size} tokens; counted as wrong", file=sys.stderr)
        results = score(records, replies, turns)
        if args.out:
            atomic_write(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        print(report(results))


if __name__ == "__main__":
    main()
