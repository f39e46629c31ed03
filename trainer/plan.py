"""The pre-flight plan: before a run reads its data or builds its model, estimate its peak memory
and stop it if it cannot fit; `python train.py CONFIG --dry-run` prints the whole plan instead.

Design decisions:
- The check comes first (right after the batch arithmetic, before the run folder, the data and
  the model), so a run that cannot fit says so in its first line and has changed nothing. It
  needs the model's shape only: the model is built on the meta device, and the vocabulary, if
  the data is not prepared yet, is the tokenizer's (a char vocabulary, the corpus's own
  characters, is taken as 256). init_from and resumed runs take the model config from their
  checkpoint, memory-mapped (only its config is read).
- It compares the estimate (trainer/footprint.py) with what the device has now
  (trainer/memory.py; CPU ranks under torchrun on one machine share its RAM). A run that cannot
  fit stops with one line (exit 2) holding the word "memory", both figures in GB and the knobs
  that would make it fit, naming the largest micro-batch that does with the accumulation that
  keeps the tokens per step; within 10% of the limit it warns. `train.memory_check: false`
  turns the check off (the estimate is an estimate).
- `--dry-run` runs the same estimate, then prepares the data if needed (into data.prepared_dir,
  which the run shares), builds the model and optimizer for real and times a few micro-steps on
  real batches (one untimed, for first-call allocations) plus one optimizer step and one eval
  batch, and extrapolates to max_iters. It never opens out_dir. It times the eager step in one
  process: a compiled CUDA run is faster once compiled, and several ranks add communication.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from common.errors import UserError
from data.loader import build_loader, open_split
from data.prepare import default_prepared_dir, prepare_data, read_meta
from data.tokenizer import from_state
from model import build_model, config_class, padded_vocab
from model.lora import add_adapters, chat_token_ids
from trainer.checkpoint import LATEST, find_checkpoint, load_checkpoint
from trainer.config import Config
from trainer.footprint import GB, Footprint, estimate_memory
from trainer.init import explicit_model_keys
from trainer.memory import available_bytes, current_rss_bytes, peak_memory_mb
from trainer.optim import build_optimizers
from trainer.rundir import flat

WARN_WITHIN = 0.10  # warn when the estimate is within this fraction of the available memory
TIMED_MICRO_STEPS, TIMING_BUDGET_S = 3, 20.0  # the dry run's timing: at most this many, or this long
# Vocabulary sizes of tiktoken's encodings (the data need not be prepared to plan a run).
ENCODING_VOCAB = {"gpt2": 50257, "r50k_base": 50257, "cl100k_base": 100277, "o200k_base": 200019}
CHAR_VOCAB_GUESS = 256


@dataclasses.dataclass
class Estimate:
    model: torch.nn.Module  # on the meta device
    footprint: Footprint
    available: int
    where: str  # what `available` is
    start_iter: int  # where the run starts (a resumed run: its checkpoint's iteration)

    @property
    def fits(self) -> bool:
        return self.footprint.peak <= self.available

    def summary(self) -> str:
        return (f"needs about {self.footprint.peak / GB:.2f} GB at its peak (estimate) and the device has "
                f"{self.available / GB:.2f} GB ({self.where})")


def runtime_baseline(device: torch.device) -> int:
    """This process's resident memory on CPU once one tiny training step has loaded the kernels it
    uses (the libraries map pages on first use); 0 elsewhere (see trainer/footprint.py)."""
    if device.type != "cpu":
        return 0
    with torch.random.fork_rng(devices=[]):  # the run's random streams stay untouched
        layer = torch.nn.Linear(16, 16)
        optimizer = torch.optim.AdamW(layer.parameters(), fused=True)
        layer(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
    return current_rss_bytes()


def planned_vocab(data) -> int:
    meta = read_meta(Path(data.prepared_dir) if data.prepared_dir else default_prepared_dir(data.input, data.tokenizer))
    if meta and meta.get("settings", {}).get("tokenizer") == data.tokenizer:
        return padded_vocab(meta["vocab_size"])
    if data.tokenizer == "bpe":
        return padded_vocab(data.bpe_vocab_size)
    return padded_vocab(ENCODING_VOCAB.get(data.tokenizer, CHAR_VOCAB_GUESS))


def planned_model_config(cfg, vocab: int = 0):
    """(the run's model config, vocabulary resolved; the iteration it starts from). A resumed or
    init_from run's model is its checkpoint's; an unreadable checkpoint is left for the run to
    report in its place. `vocab`: the prepared data's vocabulary, when known (an init_from run
    grows its source's rows to it: the chat tokens)."""
    model_cfg, start = dataclasses.replace(cfg.model), 0
    source = Path(cfg.out_dir) / LATEST if cfg.resume else cfg.init_from
    ckpt = None
    if source:
        try:
            ckpt = load_checkpoint(find_checkpoint(source), mmap=True)
        except UserError:
            pass
    if ckpt is not None:
        saved = ckpt["config"]["model"]
        if cfg.init_from:
            merged, _ = explicit_model_keys(cfg, saved, cfg.init_from)
            model_cfg = config_class(merged.get("arch", "gpt"))(**merged)
        model_cfg.vocab_size = model_cfg.vocab_size or saved.get("vocab_size", 0)
        start = ckpt["iter"] if cfg.resume else 0
    model_cfg.vocab_size = model_cfg.vocab_size or planned_vocab(cfg.data)
    if cfg.init_from and vocab:
        model_cfg.vocab_size = max(model_cfg.vocab_size, padded_vocab(vocab))
    return model_cfg, start


def estimate_run(cfg, rt, d, batch, vocab: int = 0) -> Estimate:
    """The run's memory estimate against what this rank's device has."""
    model_cfg, start = planned_model_config(cfg, vocab)
    with torch.device("meta"):
        model = build_model(model_cfg)
        add_adapters(model, cfg.lora)  # lora.rank > 0: only the adapters train (the chat-token rows: a few more)
    runtime = runtime_baseline(rt.device)
    footprint = _footprint(cfg, model, rt, d, batch.micro_batch, batch.grad_accum, runtime)
    available, where = available_bytes(rt.device)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if rt.device.type == "cpu" and local_ranks > 1:
        available, where = available // local_ranks, f"{where}, shared by {local_ranks} ranks"
    return Estimate(model, footprint, available, where, start)


def _footprint(cfg, model, rt, d, micro_batch: int, grad_accum: int, runtime: int) -> Footprint:
    return estimate_memory(cfg, model, micro_batch, grad_accum, rt.device, rt.dtype, d.parallel, d.world_size, runtime)


def check_memory(cfg, rt, d, batch, log=print) -> Estimate:
    """Stop a run that cannot fit (UserError), warn about one that barely does."""
    est = estimate_run(cfg, rt, d, batch)
    if not est.fits:
        raise UserError(f"not enough memory: the run {est.summary()}; to fit: {_fitting_knobs(cfg, rt, d, batch, est)}; "
                        f"or train.memory_check=false to start anyway")
    if est.footprint.peak > (1 - WARN_WITHIN) * est.available:
        log(f"warning: memory is tight: the run {est.summary()}; if it runs out, lower train.batch_size")
    else:
        log(f"memory: estimated peak {est.footprint.describe()} of {est.available / GB:.2f} GB ({est.where})")
    return est


def _fitting_knobs(cfg, rt, d, batch, est: Estimate) -> str:
    """The knobs that would make the run fit, the largest fitting micro-batch named."""
    sequences = batch.micro_batch * batch.grad_accum  # per rank per step

    def fits(micro_batch, **train_changes) -> bool:
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_changes))
        accum = max(sequences // micro_batch, 1)
        return _footprint(run, est.model, rt, d, micro_batch, accum, est.footprint.runtime).peak <= est.available

    knobs = []
    low, high = 0, batch.micro_batch - 1  # memory grows with the micro-batch: bisect for the largest that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    same_total = max((b for b in _divisors(sequences) if b <= low), default=0)
    if same_total:
        accum = "" if cfg.train.tokens_per_step else f" train.grad_accum={sequences // same_total}"
        knobs.append(f"train.batch_size={same_total}{accum} (the same tokens per step)")
    elif low:
        knobs.append(f"train.batch_size={low}")
    else:
        knobs.append("train.batch_size=1 does not fit either")
    if not cfg.train.activation_checkpointing:
        works = fits(batch.micro_batch, activation_checkpointing=True)
        knobs.append(f"train.activation_checkpointing=true ({'fits' if works else 'not enough alone'})")
    knobs.append("a smaller model.block_size")
    return ", ".join(knobs)


def _divisors(n: int) -> list[int]:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return small + [n // i for i in small]


# ---------------------------------------------------------------------------------------------
# --dry-run


def config_changes(cfg) -> list[str]:
    """`key=value` for every resolved key that differs from its default."""
    defaults = flat(Config(model=config_class(cfg.model.arch)()).to_dict())
    return [f"{k}={v}" for k, v in flat(cfg.to_dict()).items() if v != defaults.get(k)]


def dry_run(cfg, rt, d, batch, log=print):
    """Print the run's plan: what it is, what it needs, how long it would take. Writes nothing
    to out_dir."""
    given = None
    if cfg.init_from and not cfg.resume:  # the source's tokenizer, as the run uses it
        given = from_state(load_checkpoint(find_checkpoint(cfg.init_from), mmap=True)["tokenizer"])
    prepared = prepare_data(cfg.data, log=log, tokenizer=given)  # first: the estimate then knows the vocabulary
    est = estimate_run(cfg, rt, d, batch, read_meta(prepared)["vocab_size"])
    model_cfg = est.model.cfg
    # Text windows, or chat conversations packed into windows (data/packing.py).
    train_data, val_data = (open_split(prepared, split, model_cfg.block_size) for split in ("train", "val"))
    steps = cfg.train.max_iters - est.start_iter
    log(f"plan: {' '.join(config_changes(cfg)) or 'the defaults'}")
    log(f"model: {model_cfg.arch}, {est.model.num_params() / 1e6:.2f}M parameters, "
        f"{est.model.flops_per_token() / 1e6:.1f} MFLOP/token (training); device {rt.device}, "
        f"{str(rt.dtype).removeprefix('torch.')}, parallel {d.parallel}")
    log(f"batch: {batch.describe()}; {steps:,} steps to train.max_iters={cfg.train.max_iters}"
        f"{f' from iter {est.start_iter}' if est.start_iter else ''} = {steps * batch.tokens_per_step / 1e6:,.2f}M tokens")
    epochs = steps * batch.tokens_per_step / max(train_data.num_tokens, 1)
    log(f"data: train {train_data.num_tokens:,} tokens, val {val_data.num_tokens:,} ({prepared}); "
        f"the run reads {epochs:.2f} epochs of the train split")
    log(f"memory: {est.footprint.describe()} of {est.available / GB:.2f} GB ({est.where})")
    if not est.fits:
        log(f"the run would stop here: not enough memory; to fit: {_fitting_knobs(cfg, rt, d, batch, est)}")
        return
    if not est.model.trainable:
        log("time: a counted model fits in one pass over the data; nothing to time")
        return

    model = build_model(model_cfg)
    add_adapters(model, cfg.lora, chat_token_ids(from_state(read_meta(prepared)["tokenizer"])))  # lora.rank > 0
    model.to(rt.device)
    optimizer = build_optimizers(model, cfg.optim, rt.device.type)
    loader = build_loader(cfg.data.sampling, train_data, batch.micro_batch, model_cfg.block_size, cfg.train.seed,
                          rt.device, 0, 1, batch.grad_accum)
    micro_s, optimizer_s, eval_s = _time_steps(model, optimizer, loader, rt)
    step_s = micro_s * batch.grad_accum + optimizer_s
    evals = max(cfg.train.max_iters - 1, 0) // cfg.train.eval_interval - est.start_iter // cfg.train.eval_interval
    windows = (val_data.num_tokens - 1) // model_cfg.block_size
    if cfg.train.final_eval_tokens:  # a full evaluation covers at most this many tokens
        windows = min(windows, max(1, cfg.train.final_eval_tokens // model_cfg.block_size))
    full_eval = math.ceil(windows / batch.micro_batch)
    eval_batches = max(evals, 0) * (cfg.train.eval_batches or full_eval) + full_eval
    log(f"time: {step_s:.3f} s per step ({batch.tokens_per_step / step_s:,.0f} tokens/s; eager, one process), "
        f"so about {_duration(steps * step_s)} for {steps:,} steps, plus about {_duration(eval_batches * eval_s)} "
        f"for {eval_batches:,} evaluation batches")
    log(f"measured: this process's peak memory so far {peak_memory_mb(rt.device) * 2**20 / GB:.2f} GB")
    log(f"dry run: nothing written to {cfg.out_dir}")


def _time_steps(model, optimizer, loader, rt) -> tuple[float, float, float]:
    """Seconds per micro-step, per optimizer step and per eval batch, after an untimed warm-up."""
    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)

    def micro_step():
        x, y = loader.next_batch()
        with rt.autocast:
            _, loss = model(x, y)
        loss.backward()

    micro_step()  # untimed: first-call allocations and kernel selection
    optimizer.set_lr_multiplier(0.0)
    for opt in optimizer.optimizers:
        opt.step()  # creates the optimizer state
    sync()
    times = []
    while len(times) < TIMED_MICRO_STEPS and sum(times) < TIMING_BUDGET_S:
        start = time.perf_counter()
        micro_step()
        sync()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for opt in optimizer.optimizers:
        opt.step()
    optimizer.zero_grad()
    sync()
    optimizer_s = time.perf_counter() - start
    x, _ = loader.next_batch()
    with torch.no_grad(), rt.autocast:
        model(x)
        sync()
        start = time.perf_counter()
        model(x)
        sync()
    return sum(times) / len(times), optimizer_s, time.perf_counter() - start


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
