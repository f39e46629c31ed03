"""The chat demo, measured: a base model, fine-tuned on a mix of tasks (full and LoRA), scored on
held-out conversations per task.

    python -m bench.chat_demo [--base out/base] [--steps 2000] [--lora-steps 2000] [--out out/chat-demo]
                              [--full-run RUN_DIR] [--lora-run RUN_DIR]

1. Tasks: `python -m chat.tasks` writes the training mix (addition, spell, identity) to
   data/chat/train/ and held-out test sets to data/chat/test/ (deterministic: seed 0).
2. Base: `--base` names a pretrained run; without it one is pretrained first, as the README
   does (`configs/small.yaml` with a 512-token byte-level BPE on Tiny Shakespeare).
3. The base, full fine-tuning and LoRA are each scored with `evaluate.py` logic on every test
   set. The base has no chat tokens: it is scored as SFT starts from it (init_from's model,
   the chat tokens added with the mean row), so its figure is the fine-tuning's starting point.
4. Fine-tuning runs `train.py configs/sft.yaml init_from=BASE` for a fixed number of steps (a
   step budget, so the result does not depend on how busy the machine is); each run's wall time
   and the load average around it are printed, since the machine may be shared. `--full-run`
   and `--lora-run` score finished runs instead of training them.

Prints a markdown table (accuracy per task and model) and the commands, for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.harness import REPO, machine, run_repo as run

DATA = REPO / "data" / "chat"
# The README's commands: conversations per task and their options (addition: 1- to 3-digit operands).
TRAIN = {"addition": (30000, ["--max-turns", "3", "--min-digits", "1"]), "spell": (6000, ["--max-turns", "2"]),
         "identity": (3000, ["--max-turns", "2"])}
TEST = {"addition": 200, "spell": 100, "identity": 32}  # held out: 3-digit operands only



def make_tasks(log):
    for name, (n, options) in TRAIN.items():
        run(["-m", "chat.tasks", name, "--n", str(n), *options, "--out", str(DATA / "train" / f"{name}.jsonl")], log)
    for name, n in TEST.items():
        run(["-m", "chat.tasks", name, "--n", str(n), "--split", "test", "--out", str(DATA / "test" / f"{name}.jsonl")], log)


def scores(model, tokenizer, block_size: int) -> dict[str, float]:
    """Accuracy on every test set, as evaluate.py computes it (greedy, batched)."""
    import evaluate
    from chat.template import ChatTemplate
    from data.conversations import read_conversations

    template = ChatTemplate(tokenizer)
    out = {}
    for name in TEST:
        records = list(read_conversations(DATA / "test" / f"{name}.jsonl"))
        prompts = [template.render_for_generation(r["messages"][:-1]) for r, _ in records]
        replies = evaluate.generate_replies(model, template, prompts, 100, block_size, 64, "cpu")
        results = evaluate.score(records, replies)
        out[name] = sum(r["correct"] for r in results) / len(results)
    return out


def base_scores(base: str) -> dict[str, float]:
    """The base as fine-tuning starts from it: init_from's model, chat tokens added."""
    from model import build_model
    from trainer.checkpoint import load_model_state
    from trainer.config import load_config
    from trainer.init import load_init

    init = load_init(load_config(str(REPO / "configs/sft.yaml"), [f"init_from={base}"]))
    model = build_model(init.model_cfg)
    load_model_state(model, {"model": init.state}, init.source)
    return scores(model.eval(), init.tokenizer, init.model_cfg.block_size)


def run_scores(run_dir: Path) -> dict[str, float]:
    from trainer.checkpoint import load_model

    model, tokenizer, cfg, _ = load_model(run_dir)
    return scores(model, tokenizer, cfg.model.block_size)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a pretrained run folder (default: pretrain one into OUT/base)")
    ap.add_argument("--steps", type=int, default=2000, help="full fine-tuning steps")
    ap.add_argument("--lora-steps", type=int, default=2000, help="LoRA fine-tuning steps")
    ap.add_argument("--lora", default="lora.rank=16 optim.lr=3e-3", help="the LoRA run's overrides")
    ap.add_argument("--out", default="out/chat-demo", help="folder for the runs")
    ap.add_argument("--full-run", help="score this finished full fine-tuning run instead of training one")
    ap.add_argument("--lora-run", help="score this finished LoRA run instead of training one")
    args = ap.parse_args()
    out = Path(args.out)
    log = print
    log(f"machine: {machine()}")
    make_tasks(log)
    base = args.base
    if not base:
        base = str(out / "base")
        wall = run(["train.py", "configs/small.yaml", "data.tokenizer=bpe", "data.bpe_vocab_size=512",
                    f"out_dir={base}", "overwrite=true"], log)
        log(f"base: pretrained in {wall:.0f} s")
    rows = {"base": base_scores(base)}
    given = {"full": args.full_run, "lora": args.lora_run}
    for name, steps, extra in (("full", args.steps, []), ("lora", args.lora_steps, args.lora.split())):
        if not given[name]:
            before = load()
            wall = run(["train.py", "configs/sft.yaml", f"init_from={base}", f"out_dir={out / name}",
                        "overwrite=true", f"train.max_iters={steps}", *extra], log)
            log(f"{name}: {steps} steps in {wall:.0f} s (load average {before} before, {load()} after)")
        rows[name] = run_scores(Path(given[name] or out / name))
    log("| model | " + " | ".join(f"{t} (held-out, n={n})" for t, n in TEST.items()) + " |")
    log("| --- |" + " --- |" * len(TEST))
    for name, accuracy in rows.items():
        log(f"| {name} | " + " | ".join(f"{100 * accuracy[t]:.1f}%" for t in TEST) + " |")


if __name__ == "__main__":
    main()
