"""Synthetic chat tasks: conversations to fine-tune on and to evaluate, generated offline.

    python -m chat.tasks list
    python -m chat.tasks NAME --n N --seed S [--split train|test] [--digits D] [--max-turns T] --out FILE.jsonl

Each line is `{"messages": [...], "task": NAME}` (data/conversations.py's format); `evaluate.py`
generates each conversation's last assistant turn and compares `answer(task, reply)` with the
same extraction of the reference reply, so a task states once how its answer is read.

Tasks:
- `addition`: "What is 123 + 456?" -> "123 + 456 = 579". The reply restates the problem and
  writes the sum in the natural order, most significant digit first; the answer is the last
  integer in the reply. `--digits D` (default 3) sets both operands' digits.
- `spell`: "Spell the word castle." -> "c-a-s-t-l-e", words from the bundled Tiny Shakespeare;
  the answer is the whole reply.
- `identity`: "Who are you?" and a few other questions about the assistant, each with its fixed
  answer; the answer is the whole reply.
- `multiply`: "What is 1234 * 567?" -> "1234 * 567 = 699678" (a 4-digit by a 3-digit number),
  answered from the model's own head. `multiply_tool`: the same questions (the same seed gives
  the same ones), answered through the calculator: the assistant calls `1234*567`
  (chat/tools.py), the tool message holds its output, and the turn goes on with the same reply.
  In training the call is learned and the output is context (chat/template.py).
- `addition_cot`: the same questions as `addition` (same seed, same questions), answered with
  the working first: column addition from the right, one `a+b+carry=sum` per column, then the
  restated sum, e.g. "3+6+0=9, 2+5+0=7, 1+4+0=5; 123 + 456 = 579". The answer is the last integer.

- `addition_chatty`: addition's problems, nine replies in ten padded with a stock opener and
  closer ("Sure! 123 + 456 = 579. Hope that helps!"), as chatty instruction data is: the answer
  is still the last integer. A model fine-tuned on it pads its answers; DPO on `preference`
  teaches it not to.

    python -m chat.tasks preference|preference_correct --n N --seed S [--split train|test] --out FILE.jsonl

writes preference pairs for DPO instead (`data.format: preference`, trainer/objectives.py):
`{"prompt": [messages], "chosen": "...", "rejected": "...", "task": "addition"}` for addition's
problems and splits (`--digits`, `--min-digits`). `preference`: the concise reply chosen, the
same reply padded as `addition_chatty` pads rejected (a style the SFT data did not settle, which
preferences can). `preference_correct`: the correct reply chosen, a plausible wrong one
rejected (a dropped or extra carry, one digit off): preferences that ask the model to add better.

Design decisions:
- Train and test are disjoint by construction, not by luck: a problem belongs to one split by
  a hash of its content (the unordered operand pair, the word), and identity's test split asks
  with phrasings the train split never uses. A model's test accuracy is then about problems it
  has not seen.
- A test file holds distinct conversations (asking for more than the split has is an error); a
  train file is drawn with replacement, as a training stream is.
- With `--max-turns T` a conversation asks up to T questions of the task in a row (uniformly 1
  to T), so the model also learns to answer the last question of a longer conversation, which
  is what the chat REPL asks of it. One in five conversations opens with a system message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.errors import UserError, report_user_errors
from common.files import atomic_write

REPO = Path(__file__).resolve().parent.parent
TEST_FRACTION = 0.1
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a small model; do your best.")


def in_test(key: str) -> bool:
    """Whether a problem belongs to the test split: a function of its content alone."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < TEST_FRACTION * 2**64


# ---------------------------------------------------------------------------------------------
# The tasks: each draws one (question, reply) of a split


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def addition(rng: random.Random, split: str, digits: range) -> tuple[str, str]:
    while True:  # each operand's number of digits drawn from `digits`, then its value
        a, b = _number(rng, rng.choice(digits)), _number(rng, rng.choice(digits))
        if in_test(f"{min(a, b)}+{max(a, b)}") == (split == "test"):
            break
    question = rng.choice(("What is {a} + {b}?", "{a} + {b} = ?", "Add {a} and {b}.", "Compute {a}+{b}.",
                           "What's the sum of {a} and {b}?")).format(a=a, b=b)
    return question, f"{a} + {b} = {a + b}"


_WORDS: dict[str, list[str]] = {}


def _words(split: str) -> list[str]:
    if not _WORDS:
        text = (REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8").lower()
        words = sorted({w for w in re.findall(r"[a-z]+", text) if 3 <= len(w) <= 10})
        for s in ("train", "test"):
            _WORDS[s] = [w for w in words if in_test(w) == (s == "test")]
    return _WORDS[split]


def spell(rng: random.Random, split: str, digits: range) -> tuple[str, str]:
    word = rng.choice(_words(split))
    question = rng.choice(("Spell the word {w}.", "How do you spell {w}?", "Spell {w} letter by letter.",
                           "Can you spell '{w}'?")).format(w=word)
    return question, "-".join(word)


IDENTITY = {  # answer: phrasings; the last two of each are the test split's
    "I am a small assistant, a language model trained from scratch with gpt-trainer.": (
        "Who are you?", "What are you?", "Tell me about yourself.", "who are you", "Introduce yourself.",
        "What kind of thing are you?", "Who am I talking to?", "Could you tell me who you are?"),
    "My name is Tiny. I am a small language model.": (
        "What is your name?", "What's your name?", "Do you have a name?", "your name?", "How should I call you?",
        "Tell me your name.", "What do people call you?", "By what name do you go?"),
    "I was made with gpt-trainer, pretrained on Shakespeare and fine-tuned on a few tasks on a CPU.": (
        "Who made you?", "Who created you?", "How were you made?", "Who built you?", "Where do you come from?",
        "How were you trained?", "Who is your creator?", "What were you trained on?"),
    "I can add numbers, spell words and tell you about myself.": (
        "What can you do?", "How can you help me?", "What are you good at?", "what can you do", "What tasks can you do?",
        "What are your skills?", "What do you know how to do?", "In what ways can you help?"),
}


def identity(rng: random.Random, split: str, digits: range) -> tuple[str, str]:
    answer = rng.choice(list(IDENTITY))
    phrasings = IDENTITY[answer]
    return rng.choice(phrasings[-2:] if split == "test" else phrasings[:-2]), answer


def _factors(rng: random.Random, split: str) -> tuple[int, int]:
    while True:
        a, b = _number(rng, 4), _number(rng, 3)
        if in_test(f"{a}*{b}") == (split == "test"):
            return a, b


def _multiply_question(rng: random.Random, a: int, b: int) -> str:
    return rng.choice(("What is {a} * {b}?", "{a} * {b} = ?", "Multiply {a} by {b}.", "Compute {a}*{b}.",
                       "What's the product of {a} and {b}?")).format(a=a, b=b)


def multiply(rng: random.Random, split: str, digits: range) -> tuple[str, str]:
    a, b = _factors(rng, split)
    return _multiply_question(rng, a, b), f"{a} * {b} = {a * b}"


def multiply_tool(rng: random.Random, split: str, digits: range) -> tuple[str, list[dict]]:
    from chat.tools import calculate

    a, b = _factors(rng, split)
    question, call = _multiply_question(rng, a, b), f"{a}*{b}"
    return question, [{"role": "assistant", "content": "", "tool_call": call},
                      {"role": "tool", "content": calculate(call)},
                      {"role": "assistant", "content": f"{a} * {b} = {a * b}"}]


def column_addition(a: int, b: int) -> str:
    """The worked sum: each column from the right as `a+b+carry=sum`, then the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        steps.append(f"{x}+{y}+{carry}={x + y + carry}")
        carry = (x + y + carry) // 10
    return ", ".join(steps) + f"; {a} + {b} = {a + b}"


def addition_cot(rng: random.Random, split: str, digits: range) -> tuple[str, str]:
    question, reply = addition(rng, split, digits)
    a, b = map(int, re.findall(r"\d+", reply)[:2])
    return question, column_addition(a, b)


def wrong_sum(rng: random.Random, a: int, b: int) -> int:
    """A plausible wrong sum: a carry dropped or added, or one digit off by one."""
    right = a + b
    while True:
        place = 10 ** rng.randrange(len(str(right)))
        wrong = right + rng.choice((-1, 1)) * place * rng.choice((1, 1, 2))
        if wrong >= 0 and wrong != right:
            return wrong


OPENERS = ("Sure! ", "Happy to help. ")
CLOSERS = (". Hope that helps!", ". Let me know if you have another one.")


def padded(rng: random.Random, reply: str) -> str:
    return rng.choice(OPENERS) + reply + rng.choice(CLOSERS)


def is_padded(reply: str) -> bool:
    return reply.startswith(OPENERS) or reply.endswith(CLOSERS)


def addition_chatty(rng: random.Random, split: str, digits: range) -> tuple[str, str]:
    question, reply = addition(rng, split, digits)
    return question, padded(rng, reply) if rng.random() < 0.9 else reply


def addition_pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected,
            "task": "addition"}


def concise_pair(rng: random.Random, split: str, digits: range) -> dict:
    question, reply = addition(rng, split, digits)
    return addition_pair(question, reply, padded(rng, reply))


def correct_pair(rng: random.Random, split: str, digits: range) -> dict:
    question, reply = addition(rng, split, digits)
    a, b = map(int, re.findall(r"\d+", reply)[:2])
    return addition_pair(question, reply, f"{a} + {b} = {wrong_sum(rng, a, b)}")


def whole_reply(reply: str) -> str:
    return reply.strip()


def last_integer(reply: str) -> str:
    numbers = re.findall(r"-?\d+", reply)
    return numbers[-1] if numbers else ""


@dataclass(frozen=True)
class Task:
    # One (question, reply) of a split; the reply is the assistant's text, or the messages that
    # answer (assistant, tool, assistant) when the task calls a tool.
    draw: Callable[[random.Random, str, range], tuple[str, str | list[dict]]]
    extract: Callable[[str], str]  # the answer in a reply, compared by evaluate.py
    about: str
    stream: str = ""  # the random stream's name (default: the task's): tasks that share one ask the same questions


TASKS = {
    "addition": Task(addition, last_integer, "add two D-digit numbers (--digits, default 3; --min-digits for fewer)"),
    "addition_cot": Task(addition_cot, last_integer, "addition's questions, answered column by column with carries",
                         stream="addition"),
    "addition_chatty": Task(addition_chatty, last_integer, "addition, most replies padded with an opener and a closer"),
    "multiply": Task(multiply, last_integer, "multiply a 4-digit by a 3-digit number"),
    "multiply_tool": Task(multiply_tool, last_integer, "multiply's questions, answered with the calculator tool",
                          stream="multiply"),
    "spell": Task(spell, whole_reply, "spell a word letter by letter"),
    "identity": Task(identity, whole_reply, "questions about the assistant, with fixed answers"),
}
# Preference pairs for DPO: name -> (draw, about).
PAIRS = {"preference": (concise_pair, "addition: the concise reply chosen, the same reply padded rejected"),
         "preference_correct": (correct_pair, "addition: the correct reply chosen, a plausible wrong one rejected")}


def answer(task: str | None, reply: str) -> str:
    """The answer in a reply, as the task reads it (the whole reply for an unknown task)."""
    return TASKS[task].extract(reply) if task in TASKS else whole_reply(reply)


def conversation(name: str, rng: random.Random, split: str, digits: range = range(3, 4), max_turns: int = 1) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
    for _ in range(rng.randint(1, max_turns)):
        question, reply = TASKS[name].draw(rng, split, digits)
        answer = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        messages += [{"role": "user", "content": question}, *answer]
    return {"messages": messages, "task": name}


def generate(name: str, n: int, seed: int, split: str = "train", digits: int = 3, max_turns: int = 1,
             min_digits: int = 0) -> list[dict]:
    """n conversations of a task's split; a test split's are distinct. Addition's operands have
    `digits` digits each, or from `min_digits` to `digits` when it is given."""
    if name not in TASKS and name not in PAIRS:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join([*TASKS, *PAIRS])}")
    stream = TASKS[name].stream or name if name in TASKS else "addition"
    rng = random.Random(f"{stream}-{split}-{seed}")
    digits = range(min_digits or digits, digits + 1)
    if name in PAIRS:
        draw = lambda: PAIRS[name][0](rng, split, digits)  # noqa: E731
    else:
        draw = lambda: conversation(name, rng, split, digits, max_turns)  # noqa: E731
    if split == "train":
        return [draw() for _ in range(n)]
    found: dict[str, dict] = {}
    for _ in range(50 * n + 1000):
        if len(found) == n:
            break
        c = draw()
        found.setdefault(json.dumps(c, sort_keys=True), c)
    if len(found) < n:
        raise UserError(f"--n {n}: the {name} test split has only about {len(found)} distinct conversations"
                        f"{' with these options' if name == 'addition' else ''}; ask for fewer")
    return list(found.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate synthetic chat conversations (JSONL) for fine-tuning and "
                                             "evaluation, or `list` the tasks.")
    ap.add_argument("task", help=f"one of: {', '.join([*TASKS, *PAIRS])}; or list")
    ap.add_argument("--n", type=int, default=1000, help="conversations to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train", choices=("train", "test"))
    ap.add_argument("--digits", type=int, default=3, help="addition: digits of each operand")
    ap.add_argument("--min-digits", type=int, default=0,
                    help="addition: each operand's digits drawn from this many to --digits (default: --digits)")
    ap.add_argument("--max-turns", type=int, default=1, help="questions per conversation: 1 to this many")
    ap.add_argument("--out", help="the JSONL file to write")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        if args.task == "list":
            for name, task in TASKS.items():
                print(f"{name:18s} {task.about}")
            for name, (_, about) in PAIRS.items():
                print(f"{name:18s} {about}")
            return
        for flag, ok in (("--n", args.n >= 1), ("--digits", 1 <= args.digits <= 18), ("--max-turns", args.max_turns >= 1),
                         ("--min-digits", 0 <= args.min_digits <= args.digits)):
            if not ok:
                raise UserError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))} is out of range")
        if not args.out:
            raise UserError("--out FILE.jsonl is required")
        rows = generate(args.task, args.n, args.seed, args.split, args.digits, args.max_turns, args.min_digits)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        kind = "preference pairs" if args.task in PAIRS else "conversations"
        print(f"wrote {len(rows)} {args.split} {kind} of {args.task} to {args.out}")


if __name__ == "__main__":
    main()
