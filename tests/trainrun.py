"""Helpers for tests that run real training processes on a tiny model.

`python train.py` costs several seconds before its first step (importing torch and the parts of
it the optimizer pulls in), so the tests that need many processes (the kill test, the signal
tests) start them from a multiprocessing forkserver that has imported `train` once: every child
is still a separate process running `train.main` from its first line, receiving real signals,
but it starts in a fraction of a second. The exact-resume test uses plain `python train.py`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_CHARS = 30_000

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.1",
    "train.batch_size=4", "train.grad_accum=2", "train.max_iters=60", "train.eval_interval=10",
    "train.eval_batches=2", "train.log_interval=1", "train.threads=1", "train.device=cpu", "optim.warmup_iters=5",
]


def make_data(folder: Path) -> tuple[Path, Path]:
    """A small corpus and its prepared-data folder (prepared once, shared by every run)."""
    from data.prepare import prepare

    corpus = folder / "corpus.txt"
    text = (REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:CORPUS_CHARS]
    corpus.write_text(text, encoding="utf-8")
    prepared = folder / "prepared"
    prepare([str(corpus)], "char", prepared, 0.1, log=lambda *a: None)
    return corpus, prepared


def train_args(data: tuple[Path, Path], out_dir: Path, *overrides: str) -> list[str]:
    corpus, prepared = data
    return [str(REPO / "configs/small.yaml"), f"data.input={corpus}", f"data.prepared_dir={prepared}",
            *TINY, f"out_dir={out_dir}", *overrides]


def popen_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _child(args: list[str], log: str):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)
    import train

    train.main(args)


def _slow_child(args: list[str], log: str, slow_from_call: int, marker: str):
    """`_child`, with every model forward from the `slow_from_call`-th on running one long kernel
    first: a chain of 2048x2048 matmuls inside a single torch op (minutes of CPU; no sleep), after
    touching `marker`. What a signal must cut short."""
    import torch
    from model.gpt import GPT

    forward, calls = GPT.forward, [0]

    def slow_forward(self, *a, **kw):
        calls[0] += 1
        if calls[0] >= slow_from_call:
            Path(marker).touch()
            torch.linalg.matrix_power(torch.eye(2048), 2**62 - 1)  # 123 matmuls in one op
        return forward(self, *a, **kw)

    GPT.forward = slow_forward
    _child(args, log)


class Forker:
    """Starts `train.main(args)` in fresh processes forked from a server that imported train."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["train", "torch._dynamo", "trainrun"])

    def start(self, args: list[str], log: Path) -> multiprocessing.Process:
        proc = self.ctx.Process(target=_child, args=(args, str(log)))
        proc.start()
        return proc

    def start_slow(self, args: list[str], log: Path, slow_from_call: int, marker: Path) -> multiprocessing.Process:
        """A run whose forwards turn into one long kernel from the given call on (`_slow_child`)."""
        proc = self.ctx.Process(target=_slow_child, args=(args, str(log), slow_from_call, str(marker)))
        proc.start()
        return proc


def metrics(out_dir: Path) -> tuple[dict, dict]:
    """(iter -> train loss from the per-step log lines, iter -> val loss)."""
    train, val = {}, {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "lr" in row:
            assert row["iter"] not in train, f"iter {row['iter']} logged twice"
            train[row["iter"]] = row["train_loss"]
        if "val_loss" in row:
            val[row["iter"]] = row["val_loss"]
    return train, val
