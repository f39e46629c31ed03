"""Train a GPT.

    python train.py configs/small.yaml [key=value ...] [--debug]

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
from tqdm import tqdm

from data.loader import TokenSplit, build_loader, eval_windows
from data.prepare import prepare_data, read_meta
from data.tokenizer import from_state
from model import GPT
from trainer.checkpoint import BEST, LATEST, save_checkpoint
from trainer.config import load_config
from trainer.errors import UserError, report_user_errors
from trainer.metrics import MetricsLog, format_mfu, peak_flops
from trainer.optim import build_optimizers, lr_multiplier
from trainer.rundir import check_resume_config, claim_out_dir, write_config
from trainer.runtime import rng_state, seed_everything, set_rng_state, setup_runtime


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
    rt = setup_runtime(cfg.train)
    ckpt = claim_out_dir(cfg)
    if ckpt is not None:
        check_resume_config(cfg, ckpt, log=tqdm.write)

    # Data: prepared on first use, re-prepared when the inputs or settings change.
    prepared = prepare_data(cfg.data, log=tqdm.write)
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
    optimizer = build_optimizers(model, cfg.optim, rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.needs_grad_scaler)
    loader = build_loader(cfg.data.sampling, train_data, cfg.train.batch_size, cfg.model.block_size, cfg.train.seed,
                          rt.device)
    start_iter, best_val = 0, math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val_loss"]
    write_config(cfg)
    step_model = torch.compile(model) if cfg.train.compile else model

    def checkpoint(it: int, val_loss: float):
        nonlocal best_val
        payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                       config=cfg.to_dict(), tokenizer=tokenizer.state(), iter=it,
                       best_val_loss=min(best_val, val_loss), rng=rng_state(), loader=loader.state())
        save_checkpoint(payload, Path(cfg.out_dir) / LATEST)
        if val_loss < best_val:
            best_val = val_loss
            save_checkpoint(payload, Path(cfg.out_dir) / BEST)

    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
    peak = peak_flops(rt.device)
    tqdm.write(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.1f} MFLOP/token; "
               f"device {rt.device}, {str(rt.dtype).removeprefix('torch.')}; {tokens_per_step:,} tokens/step; "
               f"train {train_data.num_tokens:,} tokens, val {val_data.num_tokens:,}")
    metrics = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl")
    bar = tqdm(total=cfg.train.max_iters, initial=start_iter, unit="it", dynamic_ncols=True)
    run_start = time.perf_counter()
    window_start, window_iters, interval_loss_sum, interval_steps = run_start, 0, 0.0, 0
    loss_acc = torch.zeros((), device=rt.device)  # summed on device: no sync per step

    it = start_iter
    while True:
        # Evaluate and checkpoint: every eval_interval steps, and over the whole val split at the end.
        last = it == cfg.train.max_iters
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
        if last:
            break

        # One optimizer step over grad_accum micro-batches.
        optimizer.set_lr_multiplier(lr_multiplier(it, cfg.optim, cfg.train.max_iters))
        for _ in range(cfg.train.grad_accum):
            x, y = loader.next_batch()
            with rt.autocast:
                _, loss = step_model(x, y)
            loss_acc += loss.detach()
            scaler.scale(loss / cfg.train.grad_accum).backward()
        if cfg.train.grad_clip:
            optimizer.unscale_(scaler)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step(scaler)
        scaler.update()
        optimizer.zero_grad()
        it += 1
        window_iters += 1

        if it % cfg.train.log_interval == 0 or it == cfg.train.max_iters:
            loss_val = loss_acc.item() / (window_iters * cfg.train.grad_accum)  # the sync point
            loss_acc.zero_()
            elapsed = time.perf_counter() - window_start
            tok_s = window_iters * tokens_per_step / elapsed
            mfu = model.flops_per_token() * tok_s / peak if peak else None
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
