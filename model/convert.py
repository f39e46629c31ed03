"""Convert checkpoints.

    python -m model.convert merge RUN_DIR --out RUN_DIR2    # fold LoRA adapters into plain weights

`merge` reads a LoRA run's checkpoint (its best.pt, else latest.pt, or a checkpoint file), folds
the adapters into the weights (model/lora.py `merge_adapters`) and writes `RUN_DIR2/latest.pt`:
a plain model of its family (config `lora.rank: 0`) with the same logits, which samples,
evaluates and fine-tunes (`init_from`) as any other checkpoint. It holds no optimizer state, so
it cannot be resumed. An existing checkpoint in RUN_DIR2 is never overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, report_user_errors
from trainer.checkpoint import LATEST, load_checkpoint, load_model, save_checkpoint


def merge(run: str, out: str) -> Path:
    model, tokenizer, cfg, path = load_model(run)
    if not cfg.lora.rank:
        raise UserError(f"{path} has no LoRA adapters (lora.rank=0): nothing to merge")
    target = Path(out) / LATEST
    if target.exists():
        raise UserError(f"{target} exists; merge writes a new run folder and never overwrites a checkpoint")
    from model.lora import merge_adapters

    merge_adapters(model)
    cfg.lora.rank = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint({"model": state, "config": cfg.to_dict(), "tokenizer": tokenizer.state(),
                     "iter": load_checkpoint(path, mmap=True)["iter"], "merged_from": str(path)}, target)
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert checkpoints.")
    commands = ap.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="fold a LoRA run's adapters into plain weights")
    m.add_argument("run", help="the LoRA run folder or checkpoint file")
    m.add_argument("--out", required=True, help="the run folder to write latest.pt into")
    m.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        if args.command == "merge":
            print(f"merged: {merge(args.run, args.out)}")


if __name__ == "__main__":
    main()
