"""The search for `configs/small.yaml`'s recipe: the best val bits per byte a whole
`python train.py configs/small.yaml` command reaches in five minutes on this 2-core CPU.

    python -m bench.search_small time [NAME ...]            # seconds per step (under the lock)
    python -m bench.search_small rank [NAME ...] [--parallel 2]  # val_bpb at the fitted step count
    python -m bench.search_small table                      # the results as Markdown

On the shared 2-core machine both ran under the lock in a session of their own with its
autogroup raised: `setsid flock /tmp/quiet.lock bash -c 'echo -15 > /proc/self/autogroup;
python -m bench.search_small ...'` (the kernel shares the CPU between sessions before `nice`
applies, so a niced run of another session slows a timing run as much as an un-niced one, and a
niced search run gets a few percent of a core). Under the lock, `rank`'s wall time is the whole
command's.

Design decisions:
- A time budget (`train.max_time`) measured on a shared machine is wrong twice: the steps a
  candidate gets depend on the load, and its schedule is cut short. So each candidate is timed
  once (`time`: a short run under the shared lock, at normal priority), which gives its seconds
  per step and the rest of the whole command (start-up, data preparation, the final evaluation
  over the whole val split); from those, `rank` gives it the step count that fills BUDGET_S of
  whole command and trains it to that fixed step count (niced: a fixed step count gives the same
  val_bpb under any load). The chosen recipe's step count goes into small.yaml as
  `train.max_iters`, and its whole command is then timed under the lock (README, RESULTS.md).
- BUDGET_S is 4.3 minutes, not 5: a quiet machine's step time varies by ~10% between sessions.
- Candidates are overrides of configs/small.yaml, so the search says what it changed. Every
  candidate overrides the recipe's keys it varies explicitly: rerunning the search after
  small.yaml changed still measures the same thing.
- The score is the run's final evaluation over the whole val split, in bits per UTF-8 byte, so a
  byte-level BPE and characters compare on one scale (the BPE is learnt from the train split).
- Results go to out/search/results.jsonl (one row per run, appended) and timing.json; `table`
  prints them for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench.harness import REPO

OUT = REPO / "out/search"
BUDGET_S = 258.0  # whole command, 4.3 minutes
TIME_STEPS, TIME_FROM, LOG_EVERY = 60, 20, 5  # timing run: the fastest LOG_EVERY steps in TIME_FROM..TIME_STEPS
# The whole command's seconds outside the training steps: start-up, data preparation, one
# estimate mid-run, the final evaluation over the whole val split (~20 s for the char recipe on
# the quiet machine, bench/RESULTS.md), with room to spare.
OTHER_S = 25.0
MEAN_OVER_FASTEST = 1.15  # a whole run's mean step over the fastest window's (GC, allocator, the estimate)
# Candidates: overrides of configs/small.yaml. Eval cadence: one cheap estimate mid-run (a curve
# point for compare.py) plus the final whole-split evaluation, which is the score.
COMMON = ["train.eval_batches=10", "train.eval_interval=500", "train.log_interval=25"]
BPE = ["data.tokenizer=bpe"]
CANDIDATES = {
    "char": ["data.tokenizer=char"],  # the recipe as it was, given the budget's steps
    "bpe512": [*BPE, "data.bpe_vocab_size=512"],
    "bpe768": [*BPE, "data.bpe_vocab_size=768"],
    "bpe1024": [*BPE, "data.bpe_vocab_size=1024"],
    "bpe1536": [*BPE, "data.bpe_vocab_size=1536"],
    "bpe1024_B32": [*BPE, "data.bpe_vocab_size=1024", "train.batch_size=32"],
    "bpe1024_T64B32": [*BPE, "data.bpe_vocab_size=1024", "model.block_size=64", "train.batch_size=32"],
    "bpe1024_192w": [*BPE, "data.bpe_vocab_size=1024", "model.n_embd=192", "model.n_head=6"],
    "bpe1024_3L": [*BPE, "data.bpe_vocab_size=1024", "model.n_layer=3"],
    "bpe1024_6L": [*BPE, "data.bpe_vocab_size=1024", "model.n_layer=6"],
    "bpe1024_muon05": [*BPE, "data.bpe_vocab_size=1024", "optim.muon_lr=0.05"],
    "bpe1024_adam6e-3": [*BPE, "data.bpe_vocab_size=1024", "optim.lr=6e-3"],
    "bpe1024_decay05": [*BPE, "data.bpe_vocab_size=1024", "optim.decay_fraction=0.5"],
    "bpe1024_drop01": [*BPE, "data.bpe_vocab_size=1024", "model.dropout=0.1"],
}


def run(name: str, overrides: list[str], steps: int, extra: list[str] = ()) -> dict:
    """One whole `python train.py configs/small.yaml ...` command; its figures."""
    out, prepared = OUT / "runs" / f"{name}-{steps}", OUT / "prepared" / f"{name}-{steps}"
    shutil.rmtree(prepared, ignore_errors=True)  # data preparation is part of the whole command
    cmd = [sys.executable, "train.py", "configs/small.yaml", *COMMON, *overrides, f"train.max_iters={steps}",
           *extra, f"data.prepared_dir={prepared.relative_to(REPO)}",
           f"out_dir={out.relative_to(REPO)}", "overwrite=true"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("val_bpb") is not None][-1]
    logged = [r for r in rows if "tokens_per_sec" in r]
    return {"name": name, "overrides": overrides, "steps": steps, "val_bpb": round(final["val_bpb"], 4),
            "val_loss": round(final["val_loss"], 4), "tokens": final["tokens"],
            "params": rows[0]["num_params"], "wall_s": round(wall, 1), "train_time_s": final["train_time_s"],
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "elapsed": [(r["iter"], r["elapsed_s"]) for r in logged], "command": " ".join(["python", *cmd[1:]])}


def time_candidates(names: list[str]):
    """Seconds per step: the fastest window of LOG_EVERY steps between steps TIME_FROM and
    TIME_STEPS. The shared lock keeps other timing runs away, not other sessions' niced work
    (the kernel shares the CPU between sessions before nice applies), so the fastest window is
    the one that best shows a quiet machine."""
    timing = json.loads((OUT / "timing.json").read_text()) if (OUT / "timing.json").exists() else {}
    for name in names:
        r = run(name, CANDIDATES[name], TIME_STEPS, [f"train.log_interval={LOG_EVERY}", f"train.eval_interval={TIME_STEPS}"])
        at = [(it, s) for it, s in r["elapsed"] if it >= TIME_FROM]
        s_step = min((s1 - s0) / (i1 - i0) for (i0, s0), (i1, s1) in zip(at, at[1:]))
        timing[name] = {"s_per_step": round(s_step, 4), "wall_s": r["wall_s"], "load": [r["load_before"], r["load_after"]]}
        print(f"{name}: {s_step * 1000:.0f} ms/step, load {r['load_before']}->{r['load_after']}", flush=True)
        (OUT / "timing.json").write_text(json.dumps(timing, indent=1))


def budget_steps(t: dict) -> int:
    return int((BUDGET_S - OTHER_S) / (t["s_per_step"] * MEAN_OVER_FASTEST)) // 25 * 25


def rank(names: list[str], parallel: int):
    timing = json.loads((OUT / "timing.json").read_text())
    missing = [n for n in names if n not in timing]
    if missing:
        sys.exit(f"not timed yet: {', '.join(missing)}; run `flock /tmp/quiet.lock python -m bench.search_small "
                 f"time {' '.join(missing)}` first")
    # Parallel runs share the cores: one thread each, so they do not fight over them.
    extra = ["train.threads=1"] if parallel > 1 else []

    def one(name):
        r = run(name, CANDIDATES[name], budget_steps(timing[name]), extra)
        r["s_per_step"] = timing[name]["s_per_step"]
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name}: {r['steps']} steps, val_bpb {r['val_bpb']} (val loss {r['val_loss']}), "
              f"{r['tokens']:,} tokens, {r['wall_s']} s niced", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, names))


def table():
    timing = json.loads((OUT / "timing.json").read_text())
    print("| candidate | overrides of small.yaml | ms/step (locked) | steps in 4.3 min | tokens seen | "
          "val_bpb (whole val split) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for line in (OUT / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"| {r['name']} | `{' '.join(r['overrides'])}` | {timing[r['name']]['s_per_step'] * 1000:.0f} | "
              f"{r['steps']:,} | {r['tokens']:,} | {r['val_bpb']:.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("time", "rank", "table"))
    ap.add_argument("names", nargs="*", help=f"candidates (default all): {', '.join(CANDIDATES)}")
    ap.add_argument("--parallel", type=int, default=1, help="rank: runs at once (each with one thread)")
    args = ap.parse_args()
    names = args.names or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.mode == "time":
        time_candidates(names)
    elif args.mode == "rank":
        rank(names, args.parallel)
    else:
        table()


if __name__ == "__main__":
    main()
