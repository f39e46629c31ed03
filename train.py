"""Train a language model: a GPT by default, or any family `model.arch` names (model/__init__.py).

    python train.py configs/small.yaml [key=value ...] [--debug]
    python train.py configs/small.yaml --dry-run [key=value ...]     # print the plan, train nothing
    python train.py configs/sft.yaml init_from=out/base          # fine-tune from other weights
    torchrun --standalone --nproc_per_node=N train.py CONFIG train.parallel=ddp|fsdp [...]   (see trainer/dist.py)

Reads top to bottom: config -> memory check -> run folder -> data -> model and optimizer -> (resume)
-> loop. The memory check (trainer/plan.py) estimates the run's peak memory before anything is
read or built, and stops a run that cannot fit.
The model is used through the family interface only (model/base.py), and everything a
checkpoint holds is assembled by trainer/state.py.
Every knob is a field in trainer/config.py. The loop never synchronises with the GPU except at
log and eval intervals (reading a loss is a sync), so the host stays ahead of the device; the
numerical-fault guard decides on the device too (trainer/guard.py).

A run stops at `train.max_iters`, at `train.max_time` (evaluating and saving, as at the end), on
SIGTERM/SIGINT (finishing the step and saving; a second signal, or a step that outlasts
`train.signal_grace_s`, aborts at once; trainer/signals.py), or when more than
`train.max_bad_steps` updates in a row had to be skipped (keeping the last good checkpoint).
Checkpoints come at evaluations, every `train.ckpt_interval` steps and every
`train.ckpt_time_interval` of wall-clock time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from common.errors import UserError, report_user_errors
from data.loader import TokenSplit, build_loader, eval_starts, eval_windows, open_split, packed_eval_batches
from data.prepare import prepare_data, read_meta
from data.tokenizer import from_state
from model import IGNORE, build_model, padded_vocab
from model.lora import add_adapters, chat_token_ids, check_adapters
from trainer.checkpoint import LATEST, load_model_state, save_run_checkpoint
from trainer.config import load_config, parse_duration
from trainer.count import fit_counted
from trainer.dist import (NullLog, agree, all_reduce_sum, grad_sync, init_distributed, main_first, open_out_dir,
                          plain_tensor, plan_batches, seed_rank_streams, shard_batches, shutdown, wrap_model)
from trainer.guard import StepGuard, guarded_step
from trainer.init import load_init, resumed_model_config
from trainer.memory import peak_memory_mb
from trainer.metrics import MetricsLog, format_mfu, peak_flops
from trainer.objectives import build_objective
from trainer.optim import build_optimizers, lr_multiplier
from trainer.plan import check_memory, dry_run, planned_model_config
from trainer.rundir import METRICS, check_resume_config, rewind_run, write_config
from trainer.runtime import compile_with_fallback, seed_everything, setup_runtime
from trainer.signals import StopRequest
from trainer.state import TrainingState


def train(cfg, plan_only: bool = False):
    # SIGTERM/SIGINT finish the step, save and exit cleanly; `closing` closes the progress bar on
    # any way out, so an error message starts on a line of its own.
    with StopRequest(cfg.train.signal_grace_s) as stop, contextlib.ExitStack() as closing:
        return _train(cfg, stop, closing, plan_only)


def _train(cfg, stop: StopRequest, closing: contextlib.ExitStack, plan_only: bool = False):
    rt = setup_runtime(cfg.train)
    d = init_distributed(cfg.train, rt)
    # Impossible splits and LoRA targets are refused early; an init_from run's model is its source's.
    planned_model = planned_model_config(cfg)[0]
    plan = plan_batches(cfg.train, planned_model.block_size, d.world_size)
    check_adapters(planned_model, cfg.lora)
    if plan_only:  # --dry-run: print the plan (trainer/plan.py), write nothing to out_dir
        dry_run(cfg, rt, d, plan, log=tqdm.write)
        shutdown(d)
        return None
    if cfg.train.memory_check:  # before the data and the model, so that a run that cannot fit says so first
        check_memory(cfg, rt, d, plan, log=tqdm.write)
    ckpt = open_out_dir(cfg, d)
    # init_from: the source's weights, model config and tokenizer (trainer/init.py); resuming such
    # a run needs only its own checkpoint.
    init = load_init(cfg) if cfg.init_from and ckpt is None else None
    if init is not None:
        cfg.model = init.model_cfg
    elif ckpt is not None and cfg.init_from:
        cfg.model = resumed_model_config(cfg, ckpt)
    if ckpt is not None:
        check_resume_config(cfg, ckpt, log=tqdm.write)
    plan = plan_batches(cfg.train, cfg.model.block_size, d.world_size)  # with init_from's block_size

    # Data: prepared on first use, re-prepared when the inputs or settings change.
    given_tokenizer = init.tokenizer if init else from_state(ckpt["tokenizer"]) if ckpt and cfg.init_from else None
    prepared = main_first(d, prepare_data, cfg.data, log=tqdm.write, tokenizer=given_tokenizer)
    meta = read_meta(prepared)
    tokenizer = from_state(meta["tokenizer"])
    if ckpt is not None and ckpt["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"cannot resume {cfg.out_dir}: its tokenizer differs from the prepared data's")
    cfg.model.vocab_size = cfg.model.vocab_size or padded_vocab(meta["vocab_size"])
    if cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}")
    # Text, or chat conversations packed into windows with targets masked outside assistant turns.
    train_data, val_data = (open_split(prepared, split, cfg.model.block_size) for split in ("train", "val"))

    token_bytes = torch.as_tensor(tokenizer.token_bytes(), device=rt.device)
    token_bytes = torch.cat([token_bytes, token_bytes.new_zeros(cfg.model.vocab_size - len(token_bytes))])

    # Model, optimizer, loader: everything seeded, so a run is a function of its config.
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    if init is not None:
        load_model_state(model, {"model": init.state}, init.source)
        tqdm.write(f"init_from: weights of {init.source}")
    add_adapters(model, cfg.lora, chat_token_ids(tokenizer))  # lora.rank > 0: the base frozen, adapters train
    model.to(rt.device)
    objective = build_objective(cfg, model)  # lm, or dpo with its frozen reference (trainer/objectives.py)

    # What evaluations cover (data/loader.py). Text: a fixed sample of val windows for the periodic
    # estimates; for a full evaluation the whole split, or a fixed sample of train.final_eval_tokens
    # of it; each rank reads only its share of the windows. Conversations and preference pairs are
    # packed alike on every rank, each evaluating its share of the batches (all, or eval_batches).
    T, B, target = cfg.model.block_size, cfg.train.batch_size, cfg.train.stop_at_val_loss
    full_scope = "whole val split"
    if isinstance(val_data, TokenSplit):
        bound = cfg.train.final_eval_tokens
        full_starts = eval_starts(val_data, T, max(1, bound // T) if bound else 0)
        sample_starts = eval_starts(val_data, T, cfg.train.eval_batches * B)
        if len(full_starts) < (val_data.num_tokens - 1) // T:
            full_scope = f"sample of the {val_data.num_tokens:,}-token val split"

    def evaluate(full: bool) -> dict:
        if isinstance(val_data, TokenSplit):
            windows = eval_windows(val_data, full_starts if full else sample_starts, B, T, rt.device, d.rank,
                                   d.world_size, ignore=IGNORE)
            batches = ((batch, 1.0) for batch in windows)
        else:
            packed = packed_eval_batches(val_data, B, T, rt.device, 0 if full else cfg.train.eval_batches)
            batches = shard_batches(packed, d)
        return objective.evaluate(model, batches, rt, d, token_bytes)

    if not model.trainable:  # a counted model (the n-gram): one pass over the train split, no optimizer
        return fit_counted(cfg, model, tokenizer, ckpt, train_data, stop, d.enabled,
                           lambda: tuple(evaluate(full=True)[k] for k in ("val_loss", "val_bpb")))
    num_params, flops_per_token = model.num_params(), model.flops_per_token()
    wrapped = wrap_model(model, d, cfg.train, rt)  # FSDP shards `model` in place: build the optimizer after
    optimizer = build_optimizers(model, cfg.optim, rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.needs_grad_scaler)
    loader = build_loader(cfg.data.sampling, train_data, cfg.train.batch_size, cfg.model.block_size, cfg.train.seed,
                          rt.device, d.rank, d.world_size, plan.grad_accum, warn=tqdm.write)
    guard = StepGuard(cfg.train, rt.device, scaler.is_enabled())
    state = TrainingState(cfg, tokenizer, model, optimizer, scaler, loader, guard, plan.tokens_per_step)
    if ckpt is not None:
        state.load_state_dict(ckpt, Path(cfg.out_dir) / LATEST)
        if ckpt.get("tokens_per_step", plan.tokens_per_step) != plan.tokens_per_step:
            tqdm.write(f"resume: tokens per step change from {ckpt['tokens_per_step']:,} to {plan.tokens_per_step:,} "
                       f"(set train.tokens_per_step to keep it across world sizes)")
        if d.is_main:
            rewind_run(cfg.out_dir, state.iter)
        tqdm.write(f"resuming {cfg.out_dir} from iter {state.iter}")
    start_iter = state.iter
    seed_rank_streams(d, cfg.train.seed, start_iter)
    # Opened before config.yaml is written: a missing tensorboard package stops a run that wrote nothing.
    metrics = MetricsLog(Path(cfg.out_dir) / METRICS, cfg.train.tensorboard, start_iter) if d.is_main else NullLog()
    metrics.write(iter=start_iter, num_params=num_params)
    if d.is_main:
        write_config(cfg)
    # Compiling pays on CUDA; small CPU models spend longer compiling than it saves.
    compiling = cfg.train.compile and rt.device.type == "cuda"
    step_model = compile_with_fallback(wrapped, log=tqdm.write) if compiling else wrapped

    def checkpoint(it: int, val_loss: float | None):
        nonlocal last_save
        if val_loss is not None and not math.isfinite(val_loss):
            tqdm.write(f"iter {it}: val loss {val_loss}: not saving over the last good checkpoint")
            return
        is_best = val_loss is not None and val_loss < state.best_val_loss
        state.iter, state.best_val_loss = it, val_loss if is_best else state.best_val_loss
        payload = state.state_dict()  # every rank: a collective under FSDP
        if d.is_main:
            save_run_checkpoint(payload, Path(cfg.out_dir), is_best, cfg.train.keep_last)
        last_save = time.perf_counter()

    tokens_per_step = plan.tokens_per_step
    peak = peak_flops(rt.device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tqdm.write(f"model: {num_params / 1e6:.2f}M parameters{f' ({trained:,} trained: LoRA)' if cfg.lora.rank else ''}, "
               f"{flops_per_token / 1e6:.1f} MFLOP/token; "
               f"device {rt.device}, {str(rt.dtype).removeprefix('torch.')}, parallel {d.parallel}; "
               f"batch {plan.describe()}; train {train_data.num_tokens:,} tokens, val {val_data.num_tokens:,}")
    bar = closing.enter_context(tqdm(total=cfg.train.max_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                                     disable=not d.is_main))
    run_start = time.perf_counter()
    last_save, ckpt_period = run_start, cfg.train.ckpt_period_s()  # time-based checkpoints
    window_start, window_iters, interval_loss_sum, interval_steps = run_start, 0, 0.0, 0
    paused_s = 0.0  # time spent evaluating and checkpointing, kept out of tokens/s and train_time_s
    loss_acc = torch.zeros((), device=rt.device)  # summed on device: no sync per step
    stats_acc = torch.zeros(len(objective.stats), device=rt.device)  # the objective's statistics (dpo), likewise
    time_budget, skipped_before = parse_duration(cfg.train.max_time, "train.max_time"), int(guard.skipped)

    it, out_of_time, stopping = start_iter, False, False
    while True:
        # Stop on the budget or a signal, checkpoint on the clock: several ranks agree every step
        # (a tiny CPU all-reduce), so a signalled job saves the same step everywhere.
        now = time.perf_counter()
        out_of_time, stopping, save_due = agree(d, time_budget is not None and now - run_start >= time_budget,
                                                bool(stop.reason), ckpt_period is not None and now - last_save >= ckpt_period)
        if stopping:
            stop.step_finished()  # the grace period was for reaching this point; the save is not cut short
        # Evaluate and checkpoint every eval_interval steps: an estimate over a fixed sample of val
        # windows, or a full evaluation (the whole val split, up to final_eval_tokens) at the end
        # (max_iters or the time budget) and when an estimate comes within stop_margin of
        # stop_at_val_loss: only a full evaluation stops a run. Only checkpoint every ckpt_interval
        # steps, on the clock (ckpt_time_interval) and on a signal.
        last = it == cfg.train.max_iters or out_of_time
        if last or (it % cfg.train.eval_interval == 0 and it > start_iter):
            eval_start = time.perf_counter()
            full = last or not cfg.train.eval_batches
            evals = evaluate(full)
            estimate = None
            if not full and target and evals["val_loss"] <= target + cfg.train.stop_margin:
                estimate, full = evals["val_loss"], True
                evals = evaluate(full)
            val_loss = evals["val_loss"]
            counted = evals.get("val_tokens")  # the lm objective's count of evaluated targets
            scope = (f"{full_scope}, {counted:,} tokens" if full else f"estimate on {counted:,} tokens") if counted \
                else full_scope if full else "estimate"
            if estimate is not None:
                scope = f"estimate {estimate:.4f}, then {scope}"
            train_loss = interval_loss_sum / interval_steps if interval_steps else None
            interval_loss_sum, interval_steps = 0.0, 0
            metrics.write(iter=it, **evals, train_loss=train_loss, tokens=it * tokens_per_step,
                          elapsed_s=round(eval_start - run_start, 3), train_time_s=round(eval_start - run_start - paused_s, 3),
                          peak_mem_mb=round(peak_memory_mb(rt.device), 1),
                          **({"val_estimate": estimate} if estimate is not None else {}))
            train_str = f"train {train_loss:.4f}, " if train_loss is not None else ""
            tqdm.write(f"iter {it}: {train_str}{objective.describe(evals)}; {scope}")
            checkpoint(it, val_loss)
            paused_s += time.perf_counter() - eval_start
            window_start += time.perf_counter() - eval_start
            if full and val_loss <= target:
                tqdm.write(f"val loss {val_loss:.4f} ({full_scope}) <= train.stop_at_val_loss={target}: stopping")
                break
        elif stopping or save_due or (cfg.train.ckpt_interval and it % cfg.train.ckpt_interval == 0 and it > start_iter):
            checkpoint(it, None)
        if last or stopping:
            break

        # One optimizer step over grad_accum micro-batches, skipped when its loss or gradient norm
        # is non-finite or spikes (decided on the device; grad_clip=0 still measures the norm).
        optimizer.set_lr_multiplier(lr_multiplier(it, cfg.optim, cfg.train.max_iters))
        # The step's loss is the mean over all its trained tokens (dpo: pairs): each micro-batch's
        # mean weighs its share of them, across ranks (trainer/loss_weights.py; x world_size: DDP
        # averages).
        batches = [loader.next_batch() for _ in range(plan.grad_accum)]
        weights = objective.weights([y for _, y in batches], d)
        step_loss, step_stats = torch.zeros((), device=rt.device), torch.zeros_like(stats_acc)
        for micro_step, ((x, y), weight) in enumerate(zip(batches, weights)):
            with grad_sync(wrapped, last_micro_step=micro_step == plan.grad_accum - 1):
                with rt.autocast:
                    loss, stats = objective.loss(step_model, x, y)
                step_loss += loss.detach() * weight
                step_stats += stats * weight
                scaler.scale(loss * (weight * d.world_size)).backward()
        all_reduce_sum(d, step_loss, *([step_stats] if len(step_stats) else []))  # the same skip decision on every rank
        optimizer.unscale_(scaler)
        grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf))
        skip = guard.check(step_loss, grad_norm)
        guarded_step(optimizer, scaler, skip)
        scaler.update()
        optimizer.zero_grad()
        loss_acc += torch.where(skip, 0.0, step_loss)
        stats_acc += torch.where(skip, 0.0, step_stats)
        it += 1
        window_iters += 1

        if it % cfg.train.log_interval == 0 or it == cfg.train.max_iters:
            skipped = guard.read(it)  # a sync; raises DivergedError after too many skips in a row
            good_iters, skipped_before = window_iters - (skipped - skipped_before), skipped
            if good_iters < window_iters:
                tqdm.write(f"iter {it}: skipped {window_iters - good_iters} update(s) with a non-finite "
                           f"or spiking loss or gradient norm ({skipped} in this run)")
            loss_sum = loss_acc.item()  # summed over the window's applied steps
            loss_val = loss_sum / good_iters if good_iters else math.nan
            loss_acc.zero_()
            stats = dict(zip(objective.stats, (stats_acc / max(good_iters, 1)).tolist()))
            stats_acc.zero_()
            elapsed = time.perf_counter() - window_start
            tok_s = window_iters * tokens_per_step / elapsed
            mfu = flops_per_token * tok_s / (peak * d.world_size) if peak else None
            lr = optimizer.param_groups[0]["lr"]
            interval_loss_sum += loss_sum
            interval_steps += good_iters
            metrics.write(iter=it, train_loss=loss_val, **stats, lr=lr, tokens_per_sec=round(tok_s, 1),
                          mfu=mfu, elapsed_s=round(time.perf_counter() - run_start, 3), tokens=it * tokens_per_step,
                          peak_mem_mb=round(peak_memory_mb(rt.device), 1), **({"skipped_steps": skipped} if skipped else {}))
            bar.set_postfix_str(f"loss {loss_val:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, mfu {format_mfu(mfu)}")
            bar.update(window_iters)
            window_start, window_iters = time.perf_counter(), 0
    bar.close()
    metrics.close()
    if stopping or out_of_time:
        why = stop.reason or f"train.max_time={cfg.train.max_time} reached"
        tqdm.write(f"{why}: stopped at iter {it}, checkpoint saved to {Path(cfg.out_dir) / LATEST}; "
                   f"continue with resume=true")
    tqdm.write(f"done: {it} iterations in {time.perf_counter() - run_start:.1f}s; best val {state.best_val_loss:.4f}; "
               f"peak memory {peak_memory_mb(rt.device):,.0f} MiB ({'allocated' if rt.device.type == 'cuda' else 'RSS'}); "
               f"checkpoints in {cfg.out_dir}")
    shutdown(d)
    return state.best_val_loss


@record  # under torchrun: a failing rank's traceback goes into torchrun's failure report
def main(argv=None):
    ap = argparse.ArgumentParser(description="Train a language model from a YAML config plus key=value overrides.")
    ap.add_argument("config", help="YAML config file, e.g. configs/small.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value pairs, e.g. train.max_iters=200")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (memory, time, data) and train nothing")
    args = ap.parse_intermixed_args(argv)  # flags anywhere among the key=value pairs
    with report_user_errors(args.debug):
        if args.dry_run and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--dry-run plans a run in one process; run it without torchrun")
        train(load_config(args.config, args.overrides), plan_only=args.dry_run)


if __name__ == "__main__":
    main()
