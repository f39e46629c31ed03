"""Train a GPT.

    python train.py configs/small.yaml [key=value ...] [--debug]
    torchrun --standalone --nproc_per_node=N train.py CONFIG train.parallel=ddp|fsdp [...]   (see trainer/dist.py)

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
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from data.loader import TokenSplit, build_loader, eval_windows
from data.prepare import prepare_data, read_meta
from data.tokenizer import from_state
from model import GPT
from trainer.checkpoint import LATEST, save_run_checkpoint
from trainer.config import load_config, parse_duration
from trainer.dist import (NullLog, agree, all_reduce_sum, full_state, grad_sync, init_distributed, load_full_state,
                          main_first, open_out_dir, plain_tensor, plan_batches, seed_rank_streams, shard_batches,
                          shutdown, wrap_model)
from trainer.errors import UserError, report_user_errors
from trainer.guard import StepGuard, guarded_step
from trainer.metrics import MetricsLog, format_mfu, peak_flops
from trainer.optim import build_optimizers, lr_multiplier
from trainer.rundir import METRICS, check_resume_config, rewind_run, write_config
from trainer.runtime import compile_with_fallback, rng_state, seed_everything, set_rng_state, setup_runtime
from trainer.signals import StopRequest


@torch.no_grad()
def evaluate(model, data: TokenSplit, cfg, rt, max_batches: int, d) -> float:
    """Mean loss per token over the split (or over max_batches fixed random batches), the batches
    shared out over the ranks."""
    model.eval()
    total, count = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
    batches = eval_windows(data, cfg.train.batch_size, cfg.model.block_size, rt.device, max_batches)
    for (x, y), weight in shard_batches(batches, d):
        with rt.autocast:
            _, loss = model(x, y)
        total += weight * loss.float() * y.numel()
        count += weight * y.numel()
    all_reduce_sum(d, total, count)
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
    d = init_distributed(cfg.train, rt)
    plan = plan_batches(cfg.train, cfg.model.block_size, d.world_size)  # refuses an impossible split early
    ckpt = open_out_dir(cfg, d)
    if ckpt is not None:
        check_resume_config(cfg, ckpt, log=tqdm.write)

    # Data: prepared on first use, re-prepared when the inputs or settings change.
    prepared = main_first(d, prepare_data, cfg.data, log=tqdm.write)
    meta = read_meta(prepared)
    tokenizer = from_state(meta["tokenizer"])
    if ckpt is not None and ckpt["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"cannot resume {cfg.out_dir}: its tokenizer differs from the prepared data's")
    cfg.model.vocab_size = cfg.model.vocab_size or vocab_for_model(meta["vocab_size"])
    if cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}")
    train_data, val_data = TokenSplit(prepared, "train"), TokenSplit(prepared, "val")
    for split, data in (("train", train_data), ("val", val_data)):
        if data.num_tokens <= cfg.model.block_size:
            raise UserError(f"the {split} split has {data.num_tokens} tokens, fewer than one context "
                            f"window (model.block_size={cfg.model.block_size}) plus one")

    # Model, optimizer, loader: everything seeded, so a run is a function of its config.
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(rt.device)
    num_params, flops_per_token = model.num_params(), model.flops_per_token()
    wrapped = wrap_model(model, d, cfg.train, rt)  # FSDP shards `model` in place: build the optimizer after
    optimizer = build_optimizers(model, cfg.optim, rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.needs_grad_scaler)
    loader = build_loader(cfg.data.sampling, train_data, cfg.train.batch_size, cfg.model.block_size, cfg.train.seed,
                          rt.device, d.rank, d.world_size, plan.grad_accum)
    guard = StepGuard(cfg.train, rt.device, scaler.is_enabled())
    start_iter, best_val = 0, math.inf
    if ckpt is not None:
        load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"], Path(cfg.out_dir) / LATEST)
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        guard.load_state_dict(ckpt["guard"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val_loss"]
        if ckpt.get("tokens_per_step", plan.tokens_per_step) != plan.tokens_per_step:
            tqdm.write(f"resume: tokens per step change from {ckpt['tokens_per_step']:,} to {plan.tokens_per_step:,} "
                       f"(set train.tokens_per_step to keep it across world sizes)")
        if d.is_main:
            rewind_run(cfg.out_dir, start_iter)
        tqdm.write(f"resuming {cfg.out_dir} from iter {start_iter}")
    seed_rank_streams(d, cfg.train.seed, start_iter)
    if d.is_main:
        write_config(cfg)
    # Compiling pays on CUDA; small CPU models spend longer compiling than it saves.
    compiling = cfg.train.compile and rt.device.type == "cuda"
    step_model = compile_with_fallback(wrapped, log=tqdm.write) if compiling else wrapped

    def checkpoint(it: int, val_loss: float | None):
        nonlocal best_val
        if val_loss is not None and not math.isfinite(val_loss):
            tqdm.write(f"iter {it}: val loss {val_loss}: not saving over the last good checkpoint")
            return
        is_best = val_loss is not None and val_loss < best_val
        best_val = val_loss if is_best else best_val
        model_state, optim_state = full_state(model, optimizer)  # every rank: a collective under FSDP
        payload = dict(model=model_state, optimizer=optim_state, scaler=scaler.state_dict(),
                       config=cfg.to_dict(), tokenizer=tokenizer.state(), iter=it, best_val_loss=best_val,
                       rng=rng_state(), loader=loader.state(), guard=guard.state_dict(),
                       tokens_per_step=plan.tokens_per_step)
        if d.is_main:
            save_run_checkpoint(payload, Path(cfg.out_dir), is_best, cfg.train.keep_last)

    tokens_per_step = plan.tokens_per_step
    peak = peak_flops(rt.device)
    tqdm.write(f"model: {num_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
               f"device {rt.device}, {str(rt.dtype).removeprefix('torch.')}, parallel {d.parallel}; "
               f"batch {plan.describe()}; train {train_data.num_tokens:,} tokens, val {val_data.num_tokens:,}")
    metrics = MetricsLog(Path(cfg.out_dir) / METRICS) if d.is_main else NullLog()
    bar = closing.enter_context(tqdm(total=cfg.train.max_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                                     disable=not d.is_main))
    run_start = time.perf_counter()
    window_start, window_iters, interval_loss_sum, interval_steps = run_start, 0, 0.0, 0
    paused_s = 0.0  # time spent evaluating and checkpointing, kept out of tokens/s and train_time_s
    loss_acc = torch.zeros((), device=rt.device)  # summed on device: no sync per step
    time_budget, skipped_before = parse_duration(cfg.train.max_time, "train.max_time"), int(guard.skipped)

    it, out_of_time, stopping = start_iter, False, False
    while True:
        # Stop on the budget or a signal; several ranks agree first, at log steps only (a sync).
        if not d.enabled or it % cfg.train.log_interval == 0:
            over_budget = time_budget is not None and time.perf_counter() - run_start >= time_budget
            out_of_time, stopping = agree(d, rt.device, over_budget, bool(stop.reason))
        # Evaluate and checkpoint: every eval_interval steps, and over the whole val split at the end
        # (max_iters or the time budget); only checkpoint every ckpt_interval steps and on a signal.
        last = it == cfg.train.max_iters or out_of_time
        if last or (it % cfg.train.eval_interval == 0 and it > start_iter):
            eval_start = time.perf_counter()
            val_loss = evaluate(model, val_data, cfg, rt, 0 if last else cfg.train.eval_batches, d)
            train_loss = interval_loss_sum / interval_steps if interval_steps else None
            interval_loss_sum, interval_steps = 0.0, 0
            metrics.write(iter=it, val_loss=val_loss, train_loss=train_loss,
                          elapsed_s=round(eval_start - run_start, 3), train_time_s=round(eval_start - run_start - paused_s, 3))
            train_str = f"train {train_loss:.4f}, " if train_loss is not None else ""
            tqdm.write(f"iter {it}: {train_str}val {val_loss:.4f}{' (whole val split)' if last else ''}")
            checkpoint(it, val_loss)
            paused_s += time.perf_counter() - eval_start
            window_start += time.perf_counter() - eval_start
            if val_loss <= cfg.train.stop_at_val_loss:
                tqdm.write(f"val loss {val_loss:.4f} <= train.stop_at_val_loss={cfg.train.stop_at_val_loss}: stopping")
                break
        elif stopping or (cfg.train.ckpt_interval and it % cfg.train.ckpt_interval == 0 and it > start_iter):
            checkpoint(it, None)
        if last or stopping:
            break

        # One optimizer step over grad_accum micro-batches, skipped when its loss or gradient norm
        # is non-finite or spikes (decided on the device; grad_clip=0 still measures the norm).
        optimizer.set_lr_multiplier(lr_multiplier(it, cfg.optim, cfg.train.max_iters))
        step_loss = torch.zeros((), device=rt.device)
        for micro_step in range(plan.grad_accum):
            x, y = loader.next_batch()
            with grad_sync(wrapped, last_micro_step=micro_step == plan.grad_accum - 1):
                with rt.autocast:
                    _, loss = step_model(x, y)
                step_loss += loss.detach()
                scaler.scale(loss / plan.grad_accum).backward()
        all_reduce_sum(d, step_loss)  # every rank must take the same skip decision
        optimizer.unscale_(scaler)
        grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf))
        skip = guard.check(step_loss / (plan.grad_accum * d.world_size), grad_norm)
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
            loss_sum = loss_acc.item() / (plan.grad_accum * d.world_size)  # summed over the window's applied steps
            loss_val = loss_sum / good_iters if good_iters else math.nan
            loss_acc.zero_()
            elapsed = time.perf_counter() - window_start
            tok_s = window_iters * tokens_per_step / elapsed
            mfu = flops_per_token * tok_s / (peak * d.world_size) if peak else None
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
    if stopping or out_of_time:
        why = stop.reason or f"train.max_time={cfg.train.max_time} reached"
        tqdm.write(f"{why}: stopped at iter {it}, checkpoint saved to {Path(cfg.out_dir) / LATEST}; "
                   f"continue with resume=true")
    tqdm.write(f"done: {it} iterations in {time.perf_counter() - run_start:.1f}s; best val {best_val:.4f}; "
               f"checkpoints in {cfg.out_dir}")
    shutdown(d)
    return best_val


@record  # under torchrun: a failing rank's traceback goes into torchrun's failure report
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
