"""Train a GPT.

    python train.py configs/small.yaml [key=value ...] [--debug]
    torchrun --standalone --nproc_per_node=N train.py CONFIG train.parallel=ddp|fsdp [...]   (see trainer/dist.py)

Reads top to bottom: config -> run folder -> data -> model and optimizer -> (resume) -> loop.
Every knob is a field in trainer/config.py. The loop never synchronises with the GPU except at
log and eval intervals (reading a loss is a sync), so the host stays ahead of the device.
"""

from __future__ import annotations

import argparse
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
from trainer.checkpoint import BEST, LATEST, save_checkpoint
from trainer.config import load_config
from trainer.dist import (NullLog, all_reduce_sum, full_state, grad_sync, init_distributed, load_full_state,
                          main_first, open_out_dir, plan_batches, seed_rank_streams, shard_batches, shutdown,
                          wrap_model)
from trainer.errors import UserError, report_user_errors
from trainer.metrics import MetricsLog, format_mfu, peak_flops
from trainer.optim import build_optimizers, lr_multiplier
from trainer.rundir import check_resume_config, write_config
from trainer.runtime import rng_state, seed_everything, set_rng_state, setup_runtime


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
    start_iter, best_val = 0, math.inf
    if ckpt is not None:
        load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val_loss"]
        if ckpt.get("tokens_per_step", plan.tokens_per_step) != plan.tokens_per_step:
            tqdm.write(f"resume: tokens per step change from {ckpt['tokens_per_step']:,} to {plan.tokens_per_step:,} "
                       f"(set train.tokens_per_step to keep it across world sizes)")
    seed_rank_streams(d, cfg.train.seed, start_iter)
    if d.is_main:
        write_config(cfg)
    step_model = torch.compile(wrapped) if cfg.train.compile else wrapped

    def checkpoint(it: int, val_loss: float):
        nonlocal best_val
        model_state, optim_state = full_state(model, optimizer)  # every rank: a collective under FSDP
        payload = dict(model=model_state, optimizer=optim_state, scaler=scaler.state_dict(),
                       config=cfg.to_dict(), tokenizer=tokenizer.state(), iter=it,
                       best_val_loss=min(best_val, val_loss), rng=rng_state(), loader=loader.state(),
                       tokens_per_step=plan.tokens_per_step)
        if d.is_main:
            save_checkpoint(payload, Path(cfg.out_dir) / LATEST)
        if val_loss < best_val:
            best_val = val_loss
            if d.is_main:
                save_checkpoint(payload, Path(cfg.out_dir) / BEST)

    tokens_per_step = plan.tokens_per_step
    peak = peak_flops(rt.device)
    tqdm.write(f"model: {num_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
               f"device {rt.device}, {str(rt.dtype).removeprefix('torch.')}, parallel {d.parallel}; "
               f"batch {plan.describe()}; train {train_data.num_tokens:,} tokens, val {val_data.num_tokens:,}")
    metrics = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl") if d.is_main else NullLog()
    bar = tqdm(total=cfg.train.max_iters, initial=start_iter, unit="it", dynamic_ncols=True, disable=not d.is_main)
    run_start = time.perf_counter()
    window_start, window_iters, interval_loss_sum, interval_steps = run_start, 0, 0.0, 0
    paused_s = 0.0  # time spent evaluating and checkpointing, kept out of tokens/s and train_time_s
    loss_acc = torch.zeros((), device=rt.device)  # summed on device: no sync per step

    it = start_iter
    while True:
        # Evaluate and checkpoint: every eval_interval steps, and over the whole val split at the end.
        last = it == cfg.train.max_iters
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
            if val_loss <= cfg.train.stop_at_val_loss and not last:
                tqdm.write(f"val loss {val_loss:.4f} <= train.stop_at_val_loss={cfg.train.stop_at_val_loss}: stopping")
                break
        if last:
            break

        # One optimizer step over grad_accum micro-batches.
        optimizer.set_lr_multiplier(lr_multiplier(it, cfg.optim, cfg.train.max_iters))
        for micro_step in range(plan.grad_accum):
            x, y = loader.next_batch()
            with grad_sync(wrapped, last_micro_step=micro_step == plan.grad_accum - 1):
                with rt.autocast:
                    _, loss = step_model(x, y)
                loss_acc += loss.detach()
                scaler.scale(loss / plan.grad_accum).backward()
        if cfg.train.grad_clip:
            optimizer.unscale_(scaler)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step(scaler)
        scaler.update()
        optimizer.zero_grad()
        it += 1
        window_iters += 1

        if it % cfg.train.log_interval == 0 or it == cfg.train.max_iters:
            all_reduce_sum(d, loss_acc)  # the mean over all ranks' micro-batches
            loss_val = loss_acc.item() / (window_iters * plan.grad_accum * d.world_size)  # the sync point
            loss_acc.zero_()
            elapsed = time.perf_counter() - window_start
            tok_s = window_iters * tokens_per_step / elapsed
            mfu = flops_per_token * tok_s / (peak * d.world_size) if peak else None
            lr = optimizer.param_groups[0]["lr"]
            interval_loss_sum += loss_val * window_iters
            interval_steps += window_iters
            metrics.write(iter=it, train_loss=loss_val, lr=lr, tokens_per_sec=round(tok_s, 1),
                          mfu=mfu, elapsed_s=round(time.perf_counter() - run_start, 3))
            bar.set_postfix_str(f"loss {loss_val:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, mfu {format_mfu(mfu)}")
            bar.update(window_iters)
            window_start, window_iters = time.perf_counter(), 0
    bar.close()
    metrics.close()
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
