"""The history of language models, measured: n-gram, LSTM, RWKV and GPT trained on Tiny
Shakespeare for the same wall-time budget on this machine, in one table and one plot.

    python -m bench.history [--budget 120s] [--only ngram,lstm,rwkv,gpt] [--out bench]

Writes HISTORY.md (each model's parameters, val bits per byte, wall time and a 200-character
sample from the same prompt, with the command, machine and date) and history.png (val bits per
byte against wall time: compare.py's plot) into --out. The runs stay in out/history/, so
`python compare.py out/history/*` and `python sample.py --ckpt out/history/NAME` work on them.

Design decisions:
- Every row is a real `python train.py CONFIG train.max_time=BUDGET` run of a config kept in
  configs/, the data pinned to Tiny Shakespeare, characters, 10% val (the default,
  configs/small.yaml, keeps its own tokenizer: its row is the run a user gets), so a reader reruns any row
  with the command HISTORY.md lists for it.
- The budget is train.py's own `train.max_time`: the training loop and its periodic evaluations,
  not interpreter start-up or the final evaluation over the whole val split, which is the figure
  reported. The configs' learning-rate schedules count steps, so a budget shorter than a config's
  `train.max_iters` stops it before its decay ends, and a config whose steps end sooner uses less
  than the budget (bench/RESULTS.md gives the LSTM and RWKV the budget's steps by hand).
- The n-gram has no budget to spend: it counts the train split once. Orders 1 to 8 each get a
  run (counting is fast); the table shows n=2 and n=4 (the classic examples: babble, then words)
  and the order with the lowest val bits, which is chosen on the split it is scored on.
- The score is `val_bpb`, bits per UTF-8 byte, so a BPE model and character models compare on one
  scale (for this ASCII corpus one character is one byte: bits per byte are bits per character).
  A sample is cut to its first 200 characters, whatever its tokens.
- A family whose config does not exist, or whose run fails, becomes a row saying why: the table
  is built from whichever families the checkout has.
- Samples: sample.py's default sampling (temperature 0.8, top-k 200) with seed 1337, so a
  rerun on the same checkpoint gives the same text.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import date

from bench.harness import REPO, machine
from common.errors import UserError, report_user_errors
from common.files import atomic_write
from compare import human, plot
from trainer.config import parse_duration
from trainer.runs import Run, read_run

DATA = ("data.input=data/tinyshakespeare/input.txt", "data.tokenizer=char", "data.val_fraction=0.1")
# The default (configs/small.yaml) keeps its own tokenizer: the row shows it as a user runs it.
OWN_TOKENIZER = tuple(o for o in DATA if not o.startswith("data.tokenizer="))
PROMPT, SAMPLE_CHARS, SEED = "ROMEO:", 200, 1337
NGRAM_ORDERS, NGRAMS_SHOWN = range(1, 9), (2, 4)  # every order is trained; the table shows these and the best
FAMILIES = ("ngram", "lstm", "rwkv", "gpt")


@dataclass
class Entry:
    family: str  # what --only selects
    name: str  # the run folder under out/history/, and the plot's label
    label: str  # the table's name for it
    config: str
    overrides: tuple[str, ...] = ()
    data: tuple[str, ...] = DATA
    run: Run | None = None  # once trained
    skipped: str = ""  # why there is no run
    command_s: float = 0.0  # the whole train.py command
    sample: str = ""

    def command(self, budget: str) -> list[str]:
        """As a reader types it, from the repository root."""
        return ["python", "train.py", self.config, *self.overrides, f"train.max_time={budget}", *self.data,
                f"out_dir=out/history/{self.name}", "overwrite=true"]


NGRAMS = {n: Entry("ngram", f"ngram-{n}", f"n-gram, n={n}", "configs/ngram.yaml", (f"model.ngram_order={n}",))
          for n in NGRAM_ORDERS}
NEURAL = [Entry("lstm", "lstm", "LSTM", "configs/lstm.yaml"),
          Entry("rwkv", "rwkv", "RWKV", "configs/rwkv.yaml"),
          Entry("gpt", "gpt-classic", "GPT, classic (nanoGPT's CPU recipe)", "configs/classic-cpu.yaml"),
          Entry("gpt", "gpt-modern", "GPT, modern (configs/small.yaml, the default)", "configs/small.yaml",
                data=OWN_TOKENIZER)]


def train(entry: Entry, budget: str):
    if not (REPO / entry.config).is_file():
        entry.skipped = f"{entry.config} does not exist yet"
        print(f"{entry.label}: skipped, {entry.skipped}", flush=True)
        return
    print(f"{entry.label}: {' '.join(entry.command(budget))}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *entry.command(budget)[1:]], cwd=REPO, capture_output=True, text=True)
    entry.command_s = time.perf_counter() - start
    if proc.returncode != 0:
        entry.skipped = f"train.py failed: {last_line(proc.stderr)}"
        print(f"{entry.label}: skipped, {entry.skipped}", flush=True)
        return
    entry.run = read_run(REPO / "out/history" / entry.name, name=entry.name)
    entry.sample = sample(entry)


def sample(entry: Entry) -> str:
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", f"out/history/{entry.name}", "--prompt", PROMPT,
                           "--max-new-tokens", str(SAMPLE_CHARS), "--seed", str(SEED)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"(sample.py failed: {last_line(proc.stderr)})"
    return proc.stdout.removesuffix("\n")[:len(PROMPT) + SAMPLE_CHARS]  # the prompt, then what the model wrote


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(no output)"


def cell(text: str) -> str:
    """Text inside a Markdown table cell: one line, pipes escaped, as code so nothing renders."""
    return "`" + text.replace("\n", "↵").replace("|", "\\|") + "`"


def report(rows: list[Entry], args, command: str, loads: tuple[str, str]) -> str:
    out = [
        "# The history of language models, measured",
        "",
        f"Each model trained on Tiny Shakespeare (characters, except the default's own byte-level BPE; 10% held "
        f"out) for the same wall-time budget, "
        f"{args.budget} of training (`train.max_time`), on one machine; the n-gram counts the train split once "
        f"instead. Val bits per byte (= per character) are over the whole val split at the end of each run. Samples: "
        f"{SAMPLE_CHARS} characters after the prompt `{PROMPT}` (↵ is a line break), sample.py's default "
        f"sampling, seed {SEED}. Written by `{command}`.",
        "",
        f"- machine: {machine()}; load average {loads[0]} before, {loads[1]} after",
        f"- date: {date.today().isoformat()}",
        "",
        "| model | parameters | val bits/byte | wall time | sample |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for e in rows:
        if e.run is None:
            out.append(f"| {e.label} | - | - | - | skipped: {e.skipped.replace('|', '/')} |")
            continue
        bpc, wall = e.run.last("val_bpb"), e.run.wall_s
        out.append(f"| {e.label} | {human(e.run.num_params)} | {'-' if bpc is None else f'{bpc:.3f}'} | "
                   f"{'-' if wall is None else f'{wall:.0f} s'} | {cell(e.sample)} |")
    out += ["", "![val bits per byte against wall time](history.png)", "", "Every run, to rerun one:", ""]
    out += [f"- {e.label}: `{' '.join(e.command(args.budget))}` ({e.command_s:.0f} s for the whole command)"
            for e in unique(rows) if e.run is not None]
    return "\n".join(out) + "\n"


def table_rows(ngrams: dict[int, Entry], neural: list[Entry], only: list[str]) -> list[Entry]:
    rows = [e for e in neural if e.family in only]
    if "ngram" not in only:
        return rows
    scored = [e for e in ngrams.values() if e.run is not None and e.run.last("val_bpb") is not None]
    best = min(scored, key=lambda e: e.run.last("val_bpb"), default=None)
    shown = [ngrams[n] for n in NGRAMS_SHOWN]
    if best is not None:
        shown.append(replace(best, label=best.label.replace("n-gram,", "n-gram, best order on val:")))
    return shown + rows


def unique(rows: list[Entry]) -> list[Entry]:
    """One entry per run (the best n-gram order is also n=2 or n=4 at times)."""
    first = {}
    for e in rows:
        first.setdefault(e.name, e)
    return list(first.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train every model family for the same budget; table and plot.")
    ap.add_argument("--budget", default="120s", help="training time per model (train.max_time), e.g. 120s, 5m")
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated families: {', '.join(FAMILIES)}")
    ap.add_argument("--out", default="bench", help="folder for HISTORY.md and history.png")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    with report_user_errors():
        if parse_duration(args.budget, "--budget") is None:
            raise UserError("--budget is empty; give a duration like 120s")
        only = [f.strip() for f in args.only.split(",") if f.strip()]
        unknown = [f for f in only if f not in FAMILIES]
        if unknown or not only:
            raise UserError(f"--only {args.only!r}: families are {', '.join(FAMILIES)}")
        out = REPO / args.out
        if not out.is_dir():
            raise UserError(f"--out {args.out}: not a folder")

        loads = [f"{os.getloadavg()[0]:.1f}"]
        ngrams, neural = {n: replace(e) for n, e in NGRAMS.items()}, [replace(e) for e in NEURAL]
        for entry in [*ngrams.values(), *neural]:
            if entry.family in only:
                train(entry, args.budget)
        loads.append(f"{os.getloadavg()[0]:.1f}")
        rows = table_rows(ngrams, neural, only)
        command = " ".join(["python -m bench.history", *argv])
        atomic_write(out / "HISTORY.md", report(rows, args, command, tuple(loads)))
        drawn = plot([e.run for e in unique(rows) if e.run is not None], "val_bpb", "time", out / "history.png")
        print(f"wrote {out / 'HISTORY.md'}" + (f" and {out / 'history.png'}" if drawn else ""))


if __name__ == "__main__":
    main()
