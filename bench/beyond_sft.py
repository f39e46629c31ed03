"""Beyond instruction tuning, measured: DPO, tool use with the calculator, chain of thought.

    python -m bench.beyond_sft tools|cot|dpo|all [--out out/beyond] [--reuse]

Each part generates its tasks (`python -m chat.tasks`, seed 0, test splits held out by
construction), fine-tunes small char-level GPTs from scratch with `train.py configs/sft.yaml`
(3 layers, 96 wide, 0.34M parameters: the same model and step budget within a part), and
scores held-out conversations greedily as `evaluate.py` does. Accuracy at a fixed step budget:
the figures do not depend on how busy the machine is (the wall times printed do).

- tools: 4-digit x 3-digit multiplication. A model fine-tuned on `multiply_tool` (the reply
  calls the calculator), scored with the calculator and with `--no-tools`, next to a model
  fine-tuned on `multiply` (the same questions answered without the tool), same budget.
- cot: 6-digit + 6-digit addition. A model fine-tuned on `addition_cot` (column by column with
  carries, then the sum) next to one fine-tuned on `addition` (the sum alone), same questions,
  model, batch of tokens and steps.
- dpo: two preference tasks, each from its own SFT model (1- to 3-digit addition, 4,000 steps)
  and DPO (`configs/dpo.yaml` as it ships, 150 steps; and with `dpo.nll=1`). `preference`: the model is fine-tuned
  on `addition_chatty` (nine replies in ten padded, "Sure! ... Hope that helps!"), the pairs
  prefer the concise reply to the same reply padded. `preference_correct`: the model is
  fine-tuned on `addition`, the pairs prefer the right sum to a plausible wrong one. Before and
  after DPO: held-out preference accuracy (the policy's log-probability of the chosen reply
  above the rejected one's, summed over the reply and its end token), held-out 3-digit
  addition accuracy, and the share of greedy replies that are not padded.

`--reuse` scores runs already in --out instead of training them again (the commands are printed
either way). Prints markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.harness import REPO, machine, run_repo as run

DATA = REPO / "data" / "chat"
MODEL = ["model.n_layer=3", "model.n_head=4", "model.n_embd=96", "model.pos=rope", "model.norm=rmsnorm",
         "model.mlp=relu2", "model.qk_norm=true", "model.tie_weights=false", "model.bias=false", "data.tokenizer=char",
         "data.val_fraction=0.01", "optim.muon_lr=0.03", "optim.lr=3e-3", "train.log_interval=50", "train.threads=1"]
# Each fine-tuning run (its training file is data/chat/train/NAME.jsonl): block_size, batch_size, steps.
RUNS = {"multiply_tool": (128, 16, 600), "multiply": (128, 16, 600),  # tools
        "addition_cot6": (128, 8, 800), "addition6": (128, 8, 800),  # chain of thought
        "sft_chatty": (96, 16, 4000), "sft_addition": (96, 16, 4000)}  # the models DPO starts from
TASK = {"addition_cot6": "addition_cot", "addition6": "addition"}
# DPO: preference pairs -> (the SFT run it starts from, the held-out conversations it is scored on).
DPO_FROM = {"preference": ("sft_chatty", "addition_chatty"), "preference_correct": ("sft_addition", "addition")}
DPO_STEPS = 150
# Each DPO run: its label and its overrides of configs/dpo.yaml.
DPO_RUNS = [("after DPO (`configs/dpo.yaml`: beta 0.1, AdamW 1e-4)", []),
            ("after DPO + NLL on the chosen replies (`dpo.nll=1`)", ["dpo.nll=1"])]



def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def make(task: str, n: int, split: str, options: list[str], out: Path, log):
    run(["-m", "chat.tasks", task, "--n", str(n), "--seed", "0", "--split", split, *options, "--out", str(out)], log)


def finetune(name: str, out: Path, reuse: bool, log) -> Path:
    block, batch, steps = RUNS[name]
    run_dir = out / name
    if reuse and (run_dir / "latest.pt").exists():
        log(f"(reusing {run_dir})")
        return run_dir
    cmd = ["train.py", "configs/sft.yaml", f"data.input=[data/chat/train/{name}.jsonl]", *MODEL,
           f"model.block_size={block}", f"train.batch_size={batch}", f"train.max_iters={steps}",
           f"train.eval_interval={steps}", f"out_dir={run_dir}", "overwrite=true"]
    before = load()
    wall = run(cmd, log)
    log(f"{name}: {steps} steps in {wall:.0f} s (load average {before} before, {load()} after)")
    return run_dir


def replies(run_dir: Path, test: Path, tools: bool = True) -> tuple[list, list]:
    """The held-out conversations and the model's greedy reply to each, as evaluate.py makes them."""
    import evaluate
    from chat.template import ChatTemplate
    from data.conversations import read_conversations
    from trainer.checkpoint import load_model

    model, tokenizer, cfg, _ = load_model(run_dir, "cpu")
    template = ChatTemplate(tokenizer)
    records = list(read_conversations(test))
    prompts = [template.render_for_generation(evaluate.prompt_messages(r["messages"])) for r, _ in records]
    return records, evaluate.generate_replies(model, template, prompts, 120, cfg.model.block_size, 64, "cpu", tools=tools)


def accuracy(run_dir: Path, test: Path, tools: bool = True) -> tuple[int, int]:
    import evaluate

    results = evaluate.score(*replies(run_dir, test, tools))
    return sum(r["correct"] for r in results), len(results)


def preference_accuracy(run_dir: Path, pairs: Path) -> tuple[int, int]:
    """Held-out pairs whose chosen reply the model finds likelier than the rejected one."""
    import torch

    from chat.template import ChatTemplate
    from data.preferences import read_pairs
    from model.base import IGNORE
    from trainer.checkpoint import load_model
    from trainer.objectives import completion_logps

    model, tokenizer, _, _ = load_model(run_dir, "cpu")
    template = ChatTemplate(tokenizer)
    wins = total = 0
    for record, _ in read_pairs(pairs):
        rows = []
        for reply in (record["chosen"], record["rejected"]):
            ids, mask = template.render([*record["prompt"], {"role": "assistant", "content": reply}])
            start = len(ids) - 1 - ids[::-1].index(template.assistant_start_id)
            rows.append((ids, [m and i > start for i, m in enumerate(mask)]))
        width = max(len(ids) for ids, _ in rows)
        x = torch.tensor([ids[:-1] + [0] * (width - len(ids)) for ids, _ in rows])
        y = torch.tensor([[t if m else IGNORE for t, m in zip(ids[1:], mask[1:])] + [IGNORE] * (width - len(ids))
                          for ids, mask in rows])
        with torch.no_grad():
            chosen, rejected = completion_logps(model.eval(), x, y).tolist()
        wins += chosen > rejected
        total += 1
    return wins, total


def pct(k_n: tuple[int, int]) -> str:
    k, n = k_n
    return f"{100 * k / n:.1f}% ({k}/{n})"


def tools(out: Path, reuse: bool, log):
    for task in ("multiply_tool", "multiply"):
        make(task, 20000, "train", [], DATA / "train" / f"{task}.jsonl", log)
        make(task, 200, "test", [], DATA / "test" / f"{task}.jsonl", log)
    tool_run, plain_run = finetune("multiply_tool", out, reuse, log), finetune("multiply", out, reuse, log)
    rows = [("fine-tuned with tool calls (`multiply_tool`), calculator on", accuracy(tool_run, DATA / "test/multiply_tool.jsonl")),
            ("the same model, `--no-tools`", accuracy(tool_run, DATA / "test/multiply_tool.jsonl", tools=False)),
            ("fine-tuned without tool data (`multiply`)", accuracy(plain_run, DATA / "test/multiply.jsonl"))]
    log("| model (0.34M parameters, 600 steps of 16 x 128 tokens) | held-out 4-digit x 3-digit multiplication |")
    log("| --- | --- |")
    for name, score in rows:
        log(f"| {name} | {pct(score)} |")


def cot(out: Path, reuse: bool, log):
    for name in ("addition_cot6", "addition6"):
        make(TASK[name], 20000, "train", ["--digits", "6"], DATA / "train" / f"{name}.jsonl", log)
        make(TASK[name], 200, "test", ["--digits", "6"], DATA / "test" / f"{name}.jsonl", log)
    worked, bare = finetune("addition_cot6", out, reuse, log), finetune("addition6", out, reuse, log)
    log("| model (0.34M parameters, 800 steps of 8 x 128 tokens) | held-out 6-digit + 6-digit addition |")
    log("| --- | --- |")
    log(f"| worked answers (`addition_cot`) | {pct(accuracy(worked, DATA / 'test/addition_cot6.jsonl'))} |")
    log(f"| bare answers (`addition`) | {pct(accuracy(bare, DATA / 'test/addition6.jsonl'))} |")


def dpo(out: Path, reuse: bool, log):
    import evaluate
    from chat.tasks import is_padded

    for name, (sft_name, task) in DPO_FROM.items():
        make(task, 30000, "train", ["--min-digits", "1"], DATA / "train" / f"{sft_name}.jsonl", log)
        make(task, 200, "test", [], DATA / "test" / f"{task}.jsonl", log)
        make(name, 20000, "train", ["--min-digits", "1"], DATA / "train" / f"{name}.jsonl", log)
        make(name, 200, "test", [], DATA / "test" / f"{name}.jsonl", log)
    table = []
    for name, (sft_name, task) in DPO_FROM.items():
        sft = finetune(sft_name, out, reuse, log)
        stages = [(f"SFT on `{task}`, before DPO", sft)]
        for label, options in DPO_RUNS:
            tuned = out / "_".join(["dpo", name, *(o.replace("=", "") for o in options)])
            stages.append((label, tuned))
            if reuse and (tuned / "latest.pt").exists():
                continue
            before = load()
            wall = run(["train.py", "configs/dpo.yaml", f"init_from={sft}", f"data.input=[data/chat/train/{name}.jsonl]",
                        f"out_dir={tuned}", "overwrite=true", f"train.max_iters={DPO_STEPS}", "train.threads=1", *options], log)
            log(f"{tuned.name}: {DPO_STEPS} steps in {wall:.0f} s (load average {before} before, {load()} after)")
        for stage, run_dir in stages:
            records, made = replies(run_dir, DATA / "test" / f"{task}.jsonl")
            correct = sum(r["correct"] for r in evaluate.score(records, made))
            concise = sum(not is_padded(r or "") for r in made)
            table.append(f"| `{name}` | {stage} | {pct(preference_accuracy(run_dir, DATA / 'test' / f'{name}.jsonl'))} | "
                         f"{pct((correct, len(made)))} | {pct((concise, len(made)))} |")
    log(f"| pairs | model (0.34M parameters; SFT {RUNS['sft_chatty'][2]} steps, DPO {DPO_STEPS} steps) | "
        "held-out preference accuracy | held-out 3-digit addition | concise replies |")
    log("| --- | --- | --- | --- | --- |")
    for row in table:
        log(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("tools", "cot", "dpo", "all"))
    ap.add_argument("--out", default="out/beyond", help="folder for the runs")
    ap.add_argument("--reuse", action="store_true", help="score the runs already in --out instead of training them")
    args = ap.parse_args()
    log = print
    log(f"machine: {machine()}")
    for part in ("tools", "cot", "dpo") if args.part == "all" else (args.part,):
        log(f"## {part}")
        globals()[part](Path(args.out), args.reuse, log)


if __name__ == "__main__":
    main()
