"""The n-gram family's orders, measured: val bits per byte of orders 1-8 on Tiny Shakespeare
(char-level, the standard 90/10 split by position), and what counting, evaluating and sampling
cost.

    python -m bench.ngram_orders [--orders 1,2,...] [key=value ...]   (overrides of configs/ngram.yaml)

Per order: count the whole train split (trainer/count.py's loop), evaluate over the whole val split
with train.py's `evaluate` (the val_loss / val_bpb every run reports), and generate 500 tokens
from the decoder. Prints a markdown table for bench/RESULTS.md. The whole-command figure for the
default order is `time python train.py configs/ngram.yaml`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import train
from bench.harness import REPO, machine
from data.loader import TokenSplit
from data.prepare import prepare_data, read_meta
from data.tokenizer import from_state
from model import build_model, padded_vocab
from model.generate import Sampling, generate
from trainer.config import load_config
from trainer.count import CountStream, count
from trainer.dist import Dist
from trainer.runtime import seed_everything, setup_runtime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", default="1,2,3,4,5,6,7,8")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print("| order | distinct n-grams (orders 1-n) | count s | eval s (whole val split) | val loss | val bpb "
          "| 500 tokens s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for order in map(int, args.orders.split(",")):
        cfg = load_config(str(REPO / "configs/ngram.yaml"), [f"model.ngram_order={order}", *args.overrides])
        rt = setup_runtime(cfg.train)
        prepared = prepare_data(cfg.data, log=lambda *a: None)
        meta = read_meta(prepared)
        tokenizer = from_state(meta["tokenizer"])
        cfg.model.vocab_size = padded_vocab(meta["vocab_size"])
        train_data, val_data = TokenSplit(prepared, "train"), TokenSplit(prepared, "val")
        token_bytes = torch.as_tensor(tokenizer.token_bytes(), device=rt.device)
        token_bytes = torch.cat([token_bytes, token_bytes.new_zeros(cfg.model.vocab_size - len(token_bytes))])
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model).to(rt.device)

        t0 = time.perf_counter()
        count(model, CountStream(train_data, model.span - 1))
        t1 = time.perf_counter()
        val_loss, val_bpb = train.evaluate(model, val_data, cfg, rt, 0, Dist(), token_bytes)
        t2 = time.perf_counter()
        prompt = torch.tensor([tokenizer.encode("ROMEO:")], device=rt.device)
        generator = torch.Generator(device=rt.device).manual_seed(1337)
        made = sum(1 for _ in generate(model, prompt, 500, Sampling(0.8, 200), generator))
        t3 = time.perf_counter()
        assert made == 500
        assert math.isclose(val_bpb, val_loss / math.log(2), rel_tol=1e-6)  # ASCII: one byte per char
        print(f"| {order} | {model.num_params():,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {val_loss:.4f} | {val_bpb:.4f} "
              f"| {t3 - t2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
