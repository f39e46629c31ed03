"""Train a GPT.

    python train.py configs/small.yaml [key=value ...] [--debug]

Reads top to bottom: config -> run folder -> data -> model and optimizer -> (resume) -> loop.
Every knob is a field in trainer/config.py. The loop never synchronises with the GPU except at
log and eval intervals (reading a loss is a sync), so the host stays ahead of the device; the
numerical-fault guard decides on the device too (trainer/guard.py).

A run stops at `train.max_iters`, at `train.max_time` (evaluating and saving, as at the end), on
SIGTERM/SIGINT (finishing the step and saving; trainer/signals.py), or when more than
`train.max_bad_steps` updates in a row had to be skipped (keeping the last good checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.loader import RandomWindows, TokenSplit, eval_windows
from data.prepare import prepare, read_meta
from data.tokenizer import from_state
from model import GPT
from trainer.checkpoint import LATEST, load_model_state, save_run_checkpoint
from trainer.config import load_config, parse_duration
from trainer.errors import UserError, report_user_errors
from trainer.guard import StepGuard, guarded_step
from trainer.metrics import MetricsLog, format_mfu, peak_flops
from trainer.optim import build_optimizers, lr_multiplier
from trainer.rundir import check_resume_config, claim_out_dir, rewind_run, write_config
from trainer.runtime import rng_state, seed_everything, set_rng_state, setup_runtime
from trainer.signals import StopRequest


@torch.no_grad()
def evaluate(model, data: TokenSplit, cfg, rt, max_batches: int) -> float:
    """Mean loss per token over the split (or over max_batches fixed random batches)."""
    model.eval()
    total, count = torch.zeros((), device=rt.device), 0
    for x, y in eval_windows(data, cfg.train.batch_size, cfg.model.block_size, rt.device, max_batches):
        with rt.autocast:
            _, loss = model(x, y)
        total += loss.float() * y.numel()
        count += y.numel()
    model.train()
    return (total / count).item()


def vocab_for_model(tokenizer_vocab: int) -> int:
    # Large vocabularies are padded to a multiple of 64 for faster matmuls (50257 -> 50304);
    # the sampler never emits the padding ids. Small ones stay exact.
    return tokenizer_vocab if tokenizer_vocab < 1024 else (tokenizer_vocab + 63) // 64 * 64


def train(cfg):
    # SIGTERM/SIGINT finish the step, save and exit cleanly; `closing` closes the progress bar on
    # any way out, so an error message starts on a line of its own.
    with StopRequest() as stop, contextlib.ExitStack() as closing:
        return _train(cfg, stop, closing)


def _train(cfg, stop: StopRequest, closing: contextlib.ExitStack):
    rt = setup_runtime(cfg.train)
    ckpt = claim_out_dir(cfg)
    if ckpt is not None:
        check_resume_config(cfg, ckpt, log=tqdm.write)

    # Data: prepared on first use, re-prepared when the inputs or settings change.
    prepared = prepare(cfg.data.input, cfg.data.tokenizer, cfg.data.prepared_dir or None,
                       cfg.data.val_fraction, log=tqdm.write)
    meta = read_meta(prepared)
    tokenizer = from_state(meta["tokenizer"])
    if ckpt is not None and ckpt["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"cannot resume {cfg.out_dir}: its tokenizer differs from the prepared data's")
    cfg.model.vocab_size = cfg.model.vocab_size or vocab_for_model(meta["vocab_size"])
    if cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}")
    train_data, val_data = TokenSplit(prepared, "train"), TokenSplit(prepared, "val")
    for split, data in (("train", train_data), ("val", val_data)):
        if max((len(s) for s in data.shards), default=0) <= cfg.model.block_size:
            raise UserError(f"the {split} split has {data.num_tokens} tokens, fewer than one context "
                            f"window (model.block_size={cfg.model.block_size}) plus one")

    # Model, optimizer, loader: everything seeded, so a run is a function of its config.
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(rt.device)
    optimizer = build_optimizers(model, cfg.optim, rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.needs_grad_scaler)
    loader = RandomWindows(train_data, cfg.train.batch_size, cfg.model.block_size, cfg.train.seed, rt.device)
    guard = StepGuard(cfg.train, rt.device, scaler.is_enabled())
    start_iter, best_val = 0, math.inf
    if ckpt is not None:
        load_model_state(model, ckpt, Path(cfg.out_dir) / LATEST)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        guard.load_state_dict(ckpt["guard"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val_loss"]
        rewind_run(cfg.out_dir, start_iter)
        tqdm.write(f"resuming {cfg.out_dir} from iter {start_iter}")
    write_config(cfg)
    step_model = torch.compile(model) if cfg.train.compile else model

    def checkpoint(it: int, val_loss: float | None):
        nonlocal best_val
        if val_loss is not None and not math.isfinite(val_loss):
            tqdm.write(f"iter {it}: val loss {val_loss}: not saving over the last good checkpoint")
            return
        is_best = val_loss is not None and val_loss < best_val
        best_val = val_loss if is_best else best_val
        payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                       config=cfg.to_dict(), tokenizer=tokenizer.state(), iter=it, best_val_loss=best_val,
                       rng=rng_state(), loader=loader.state(), guard=guard.state_dict())
        save_run_checkpoint(payload, Path(cfg.out_dir), is_best, cfg.train.keep_last)

    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
    peak = peak_flops(rt.device)
    tqdm.write(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} MFLOP/token; "
               f"device {rt.device}, {str(rt.dtype).removeprefix('torch.')}; {tokens_per_step:,} tokens/step; "
               f"train {train_data.num_tokens:,} tokens, val {val_data.num_tokens:,}")
    metrics = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl")
    bar = closing.enter_context(tqdm(total=cfg.train.max_iters, initial=start_iter, unit="it", dynamic_ncols=True))
    run_start = time.perf_counter()
    window_start, window_iters, interval_loss_sum, interval_steps = run_start, 0, 0.0, 0
    loss_acc = torch.zeros((), device=rt.device)  # summed on device: no sync per step
    time_budget, skipped_before = parse_duration(cfg.train.max_time, "train.max_time"), int(guard.skipped)

    it = start_iter
    while True:
        # Evaluate and checkpoint: every eval_interval steps, and over the whole val split at the end
        # (max_iters or the time budget); only checkpoint every ckpt_interval steps and on a signal.
        out_of_time = time_budget is not None and time.perf_counter() - run_start >= time_budget
        last = it == cfg.train.max_iters or out_of_time
        if last or (it % cfg.train.eval_interval == 0 and it > start_iter):
            val_loss = evaluate(model, val_data, cfg, rt, 0 if last else cfg.train.eval_batches)
            train_loss = interval_loss_sum / max(interval_steps, 1) if interval_steps else None
            interval_loss_sum, interval_steps = 0.0, 0
            metrics.write(iter=it, val_loss=val_loss, train_loss=train_loss,
                          elapsed_s=round(time.perf_counter() - run_start, 3))
            train_str = f"train {train_loss:.4f}, " if train_loss is not None else ""
            tqdm.write(f"iter {it}: {train_str}val {val_loss:.4f}{' (whole val split)' if last else ''}")
            checkpoint(it, val_loss)
            window_start = time.perf_counter()  # keep eval time out of tokens/s
        elif stop.reason or (cfg.train.ckpt_interval and it % cfg.train.ckpt_interval == 0 and it > start_iter):
            checkpoint(it, None)
        if last or stop.reason:
            break

        # One optimizer step over grad_accum micro-batches, skipped when its loss or gradient norm
        # is non-finite or spikes (decided on the device; grad_clip=0 still measures the norm).
        optimizer.set_lr_multiplier(lr_multiplier(it, cfg.optim, cfg.train.max_iters))
        step_loss = torch.zeros((), device=rt.device)
        for _ in range(cfg.train.grad_accum):
            x, y = loader.next_batch()
            with rt.autocast:
                _, loss = step_model(x, y)
            step_loss += loss.detach()
            scaler.scale(loss / cfg.train.grad_accum).backward()
        optimizer.unscale_(scaler)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf)
        skip = guard.check(step_loss / cfg.train.grad_accum, grad_norm)
        guarded_step(optimizer, scaler, skip)
        scaler.update()
        optimizer.zero_grad()
        loss_acc += torch.where(skip, 0.0, step_loss)
        it += 1
        window_iters += 1

        if it % cfg.train.log_interval == 0 or it == cfg.train.max_iters:
            skipped = guard.read(it)  # a sync; raises DivergedError after too many skips in a row
            good_iters, skipped_before = window_iters - (skipped - skipped_before), skipped
            if good_iters < window_iters:
                tqdm.write(f"iter {it}: skipped {window_iters - good_iters} update(s) with a non-finite "
                           f"or spiking loss or gradient norm ({skipped} in this run)")
            loss_sum = loss_acc.item() / cfg.train.grad_accum  # summed over the window's applied steps
            loss_val = loss_sum / good_iters if good_iters else math.nan
            loss_acc.zero_()
            elapsed = time.perf_counter() - window_start
            tok_s = window_iters * tokens_per_step / elapsed
            mfu = model.flops_per_token() * tok_s / peak if peak else None
            lr = optimizer.param_groups[0]["lr"]
            interval_loss_sum += loss_sum
            interval_steps += good_iters
            metrics.write(iter=it, train_loss=loss_val, lr=lr, tokens_per_sec=round(tok_s, 1),
                          mfu=mfu, elapsed_s=round(time.perf_counter() - run_start, 3),
                          **({"skipped_steps": skipped} if skipped else {}))
            bar.set_postfix_str(f"loss {loss_val:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, mfu {format_mfu(mfu)}")
            bar.update(window_iters)
            window_start, window_iters = time.perf_counter(), 0
    bar.close()
    metrics.close()
    if stop.reason or out_of_time:
        why = stop.reason or f"train.max_time={cfg.train.max_time} reached"
        tqdm.write(f"{why}: stopped at iter {it}, checkpoint saved to {Path(cfg.out_dir) / LATEST}; "
                   f"continue with resume=true")
    tqdm.write(f"done: {it} iterations in {time.perf_counter() - run_start:.1f}s; best val {best_val:.4f}; "
               f"checkpoints in {cfg.out_dir}")
    return best_val


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train a GPT from a YAML config plus key=value overrides.")
    ap.add_argument("config", help="YAML config file, e.g. configs/small.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value pairs, e.g. train.max_iters=200")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
