"""Training speed of a config: ms/iter, tokens/s and MFU over N steps after warm-up.

    python bench/speed.py CONFIG [key=value ...] [--iters 50] [--warmup 10] [--log-every 5]

Runs train.py itself (so what is measured is what users run) with logging every `--log-every`
steps, drops the warm-up steps (compilation, allocator, caches) and reports the median over the
remaining logged intervals. Evaluations are excluded: the only one is after the last step.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from harness import machine, train_run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--iters", type=int, default=50, help="measured steps after warm-up")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--log-every", type=int, default=5)
    args = ap.parse_args()
    total = args.warmup + args.iters
    with tempfile.TemporaryDirectory() as tmp:
        run = train_run(args.config, Path(tmp) / "out", *args.overrides, f"train.max_iters={total}",
                        f"train.log_interval={args.log_every}", f"train.eval_interval={total + 1}",
                        "train.eval_batches=1")
        cfg = yaml.safe_load((Path(tmp) / "out" / "config.yaml").read_text())
    # One process: a set tokens_per_step is the step; otherwise batch x context x accumulation.
    train_cfg = cfg["train"]
    tokens_per_step = train_cfg["tokens_per_step"] or (
        train_cfg["batch_size"] * cfg["model"]["block_size"] * train_cfg["grad_accum"])
    rows = [r for r in run["rows"] if "tokens_per_sec" in r and r["iter"] > args.warmup]
    tok_s = statistics.median(r["tokens_per_sec"] for r in rows)
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
    print(f"machine: {machine()}")
    print(f"{args.config} {' '.join(args.overrides)}".strip())
    print(f"{1000 * tokens_per_step / tok_s:.1f} ms/iter, {tok_s:,.0f} tokens/s, MFU {mfu} "
          f"(median of {len(rows)} intervals of {args.log_every} steps after {args.warmup} warm-up steps)")


if __name__ == "__main__":
    main()
