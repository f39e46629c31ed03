"""Classic-shape speed against a nanoGPT-equivalent training loop, in one run on one machine.

    python bench/vs_nanogpt.py [--iters 300] [--threads 2] [--rounds 3]

The shape is nanoGPT's documented CPU run on Tiny Shakespeare (char): 4 layers, 4 heads, 128
wide, context 64, batch 12, AdamW lr 1e-3, no dropout. Both sides are timed the same way:
the median wall time of one training iteration (forward, backward, clip, optimizer step,
reading the loss) over `--iters` iterations, no evaluation.

- Baseline: `NanoGPTLoop` below re-implements nanoGPT's train.py/model.py step for this shape
  (bias-free LayerNorm and Linear, SDPA attention, tied head, `torch.optim.AdamW` with
  nanoGPT's CPU arguments, i.e. no `fused`, a fresh np.memmap and torch.stack per batch,
  `loss.item()` every iteration as its `--log_interval=1` does). nanoGPT itself is not vendored.
- This trainer: `train.py configs/classic-cpu.yaml` as a subprocess with `log_interval=1`, its
  per-iteration tokens/s read from metrics.jsonl (bench/speed.py's method).

Each side runs in a fresh process, alternating, for `--rounds` rounds: on a shared machine the
speed drifts by tens of percent from minute to minute, so the ratio is taken within each round
(two neighbouring runs) and the median round is reported.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import REPO, machine, train_run

B, T, L, H, C = 12, 64, 4, 4, 128


class NanoGPTLoop:
    def __init__(self, train_bin: Path, vocab: int):
        torch.manual_seed(1337)
        self.train_bin, self.vocab = train_bin, vocab
        self.wte = nn.Embedding(vocab, C)
        self.wpe = nn.Embedding(T, C)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln_1=nn.LayerNorm(C, bias=False), c_attn=nn.Linear(C, 3 * C, bias=False),
                               attn_proj=nn.Linear(C, C, bias=False), ln_2=nn.LayerNorm(C, bias=False),
                               c_fc=nn.Linear(C, 4 * C, bias=False), mlp_proj=nn.Linear(4 * C, C, bias=False)))
            for _ in range(L))
        self.ln_f = nn.LayerNorm(C, bias=False)
        self.params = nn.ModuleList([self.wte, self.wpe, self.blocks, self.ln_f])
        for p in self.params.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
        decay = [p for p in self.params.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.params.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=1e-3, betas=(0.9, 0.99))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.blocks:
            q, k, v = b.c_attn(b.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
            x = x + b.attn_proj(y)
            x = x + b.mlp_proj(F.gelu(b.c_fc(b.ln_2(x))))
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def get_batch(self):
        data = np.memmap(self.train_bin, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def iteration(self, it: int, X, Y):
        lr = 1e-3 * (it + 1) / 101 if it < 100 else 1e-4 + 0.5 * (1 + math.cos(math.pi * (it - 100) / 1900)) * 9e-4
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = self.forward(X, Y)
        X, Y = self.get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        return X, Y


def baseline_ms(prepared: Path, iters: int, threads: int) -> list[float]:
    """Per-iteration milliseconds of the nanoGPT-equivalent loop, after 10 warm-up iterations."""
    torch.set_num_threads(threads)
    meta = json.loads((prepared / "meta.json").read_text())
    loop = NanoGPTLoop(prepared / meta["splits"]["train"][0]["file"], vocab=meta["vocab_size"])
    X, Y = loop.get_batch()
    times = []
    for it in range(iters):
        t0 = time.perf_counter()
        X, Y = loop.iteration(it, X, Y)
        times.append(1000 * (time.perf_counter() - t0))
    return times[10:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-in", type=Path, help=argparse.SUPPRESS)  # the child process running the baseline
    args = ap.parse_args()
    if args.baseline_in:
        print(json.dumps(baseline_ms(args.baseline_in, args.iters, args.threads)))
        return
    print(f"machine: {machine()}, {args.threads} threads")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            run = train_run(str(REPO / "configs/classic-cpu.yaml"), Path(tmp) / "out", f"train.max_iters={args.iters}",
                            "train.log_interval=1", f"train.eval_interval={args.iters + 1}", "train.eval_batches=1",
                            f"train.threads={args.threads}", f"data.prepared_dir={tmp}/prep")
            ours = statistics.median(1000 * B * T / row["tokens_per_sec"] for row in run["rows"]
                                     if "tokens_per_sec" in row and row["iter"] > 10)
            child = subprocess.run([sys.executable, __file__, f"--baseline-in={tmp}/prep", f"--iters={args.iters}",
                                    f"--threads={args.threads}"], capture_output=True, text=True, check=True)
            base = statistics.median(json.loads(child.stdout))
            rounds.append((base, ours))
            print(f"round {r + 1}: nanoGPT-equivalent {base:.1f} ms/iter, this trainer {ours:.1f} ms/iter, "
                  f"ratio {base / ours:.2f}x", flush=True)
    base, ours = sorted(rounds, key=lambda r: r[0] / r[1])[len(rounds) // 2]
    print(f"nanoGPT-equivalent loop: {base:.1f} ms/iter ({B * T / base * 1000:,.0f} tokens/s)")
    print(f"this trainer:            {ours:.1f} ms/iter ({B * T / ours * 1000:,.0f} tokens/s)")
    print(f"tokens/s ratio (this / nanoGPT-equivalent): {base / ours:.2f}x (median of {args.rounds} rounds; "
          f"each side the median of {args.iters - 10} iterations after 10 warm-up)")
    ratios = sorted(b / o for b, o in rounds)
    fastest = min(b for b, _ in rounds) / min(o for _, o in rounds)
    print(f"spread: rounds from {ratios[0]:.2f}x to {ratios[-1]:.2f}x; fastest round of each side: {fastest:.2f}x")

if __name__ == "__main__":
    main()
