"""Fitting a counted model (the n-gram): one streaming pass over the train split, no optimizer.

train.py hands a model whose `trainable` is False over to `fit_counted`, which:
  1. counts the train split in chunks of CHUNK_TOKENS tokens: `model.count(tokens, starts)` adds
     the k-grams (k <= `model.span`) starting at tokens[:starts]; consecutive chunks overlap by
     span - 1 tokens, so every k-gram is counted once, those across the cuts included;
  2. evaluates over the whole val split with train.py's `evaluate`, so val_loss and val_bpb
     mean the same for every family;
  3. writes metrics.jsonl (iter, val_loss, val_bpb, elapsed_s, train_time_s) and best.pt /
     latest.pt like any run, under the same run-folder rules (trainer/rundir.py).

Design decisions:
- A run's `iter` is the number of passes over the train split: 0 while counting, 1 once counted
  and evaluated, and `tokens_per_step` is the split's size, so iter x tokens_per_step is the
  tokens seen, as for a trained model. `elapsed_s` and `train_time_s` are the counting seconds,
  summed over resumed processes.
- Between chunks the run honours SIGTERM/SIGINT (trainer/signals.py) and train.max_time: it saves
  the counts with the position in the train stream (the checkpoint's `loader` state) and exits;
  `resume=true` continues counting from there. Counting is addition and the model's tables are
  canonical, so the final counts equal an uninterrupted run's. A finished run refuses to resume.
- Step-based settings (train.max_iters, optim.*, ...) mean nothing here: they are ignored, with
  one line naming those the config or the command line set.
- Memory is one chunk plus the model's tables (their size is the number of distinct n-grams).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from trainer.checkpoint import LATEST, save_run_checkpoint
from trainer.config import parse_duration
from trainer.metrics import MetricsLog
from trainer.rundir import METRICS, rewind_run, write_config
from trainer.state import TrainingState

CHUNK_TOKENS = 1 << 22  # tokens counted between looks at the clock and at signals
STEP_KEYS = ("train.max_iters", "train.grad_accum", "train.tokens_per_step", "train.grad_clip", "train.eval_interval",
             "train.eval_batches", "train.log_interval", "train.ckpt_interval", "train.stop_at_val_loss",
             "train.max_bad_steps", "train.spike_z", "train.spike_window", "train.activation_checkpointing",
             "train.compile", "data.sampling")


class CountStream:
    """The train split read in order, chunk by chunk: the loader of a counting run. Its state (the
    position, the split's size, the counting seconds so far) goes into the checkpoint."""

    kind = "count"

    def __init__(self, data, overlap: int):
        self.data, self.overlap = data, overlap
        self.position, self.seconds = 0, 0.0

    @property
    def done(self) -> bool:
        return self.position >= self.data.num_tokens

    def next_chunk(self) -> tuple[np.ndarray, int]:
        """(tokens, starts): the next CHUNK_TOKENS k-gram starts, with the tokens their k-grams reach."""
        starts = min(CHUNK_TOKENS, self.data.num_tokens - self.position)
        length = min(starts + self.overlap, self.data.num_tokens - self.position)
        return np.asarray(self.data.read(self.position, length), dtype=np.int64), starts

    def state(self) -> dict:
        return {"sampling": self.kind, "position": self.position, "tokens": self.data.num_tokens,
                "seconds": self.seconds}

    def load_state(self, state: dict):
        if state.get("sampling") != self.kind:
            raise UserError(f"the checkpoint's loader state is for data.sampling={state.get('sampling')}, not a count")
        if state["tokens"] != self.data.num_tokens:
            raise UserError(f"the train split has {self.data.num_tokens:,} tokens, but the checkpoint counted "
                            f"one of {state['tokens']:,}: the data changed; start over with overwrite=true")
        self.position, self.seconds = int(state["position"]), float(state["seconds"])


def ignored_settings(cfg) -> str:
    given = sorted(k for k in cfg.given if k in STEP_KEYS or k.startswith("optim."))
    what = (f"ignoring {', '.join(given)}" if given
            else "step and optimizer settings (train.max_iters, optim.*) do not apply")
    return f"model.arch={cfg.model.arch} is counted in one pass over the train split, with no optimizer: {what}"


def count(model, stream: CountStream, stop=None, budget_s: float | None = None, progress=None) -> bool:
    """Count the stream into the model until its end, a stop request or the time budget (checked
    between chunks, after at least one); returns whether the end was reached."""
    start = time.perf_counter()
    while not stream.done:
        t0 = time.perf_counter()
        tokens, starts = stream.next_chunk()
        model.count(tokens, starts)
        stream.position += starts
        stream.seconds += time.perf_counter() - t0
        if progress is not None:
            progress.update(starts)
        if (stop is not None and stop.reason) or (budget_s is not None and time.perf_counter() - start >= budget_s):
            break
    return stream.done


def fit_counted(cfg, model, tokenizer, ckpt: dict | None, train_data, stop, distributed: bool, evaluate_val,
                log=tqdm.write) -> float:
    """Count, evaluate, save (see the module docstring); returns the val loss (inf if stopped early)."""
    out = Path(cfg.out_dir)
    if distributed:
        raise UserError(f"model.arch={cfg.model.arch} counts in one process; run it without torchrun")
    if ckpt is not None and ckpt["iter"] >= 1:
        raise UserError(f"cannot resume {cfg.out_dir}: its count is complete (the whole train split counted and "
                        f"evaluated); start a new run with overwrite=true")
    log(ignored_settings(cfg))
    stream = CountStream(train_data, overlap=model.span - 1)
    state = TrainingState(cfg, tokenizer, model, loader=stream, tokens_per_step=train_data.num_tokens)
    if ckpt is not None:
        state.load_state_dict(ckpt, out / LATEST)
        rewind_run(cfg.out_dir, state.iter)
        log(f"resuming {cfg.out_dir}: {stream.position:,} of {train_data.num_tokens:,} train tokens counted")
    write_config(cfg)

    with tqdm(total=train_data.num_tokens, initial=stream.position, unit="tok", unit_scale=True, dynamic_ncols=True,
              desc="counting") as bar:
        finished = count(model, stream, stop, parse_duration(cfg.train.max_time, "train.max_time"), bar)
    if not finished or stop.reason:  # a signal during the last chunk: save, and let the resume evaluate
        save_run_checkpoint(state.state_dict(), out, False, cfg.train.keep_last)
        why = stop.reason or f"train.max_time={cfg.train.max_time} reached"
        log(f"{why}: stopped after {stream.position:,} of {train_data.num_tokens:,} train tokens, checkpoint saved to "
            f"{out / LATEST}; continue with resume=true")
        return math.inf

    eval_start = time.perf_counter()
    val_loss, val_bpb = evaluate_val()
    eval_s = time.perf_counter() - eval_start
    state.iter = 1
    state.best_val_loss = val_loss if math.isfinite(val_loss) else math.inf
    metrics = MetricsLog(out / METRICS, cfg.train.tensorboard)
    metrics.write(iter=state.iter, val_loss=val_loss, val_bpb=val_bpb, elapsed_s=round(stream.seconds, 3),
                  train_time_s=round(stream.seconds, 3), num_params=model.num_params(), tokens=train_data.num_tokens)
    metrics.close()
    save_run_checkpoint(state.state_dict(), out, math.isfinite(val_loss), cfg.train.keep_last)
    log(f"counted {train_data.num_tokens:,} train tokens in {stream.seconds:.1f}s: {model.num_params():,} distinct "
        f"n-grams of orders 1-{model.span}; val {val_loss:.4f} ({val_bpb:.4f} bits/byte) (whole val split, "
        f"{eval_s:.1f}s); checkpoints in {cfg.out_dir}")
    return state.best_val_loss
