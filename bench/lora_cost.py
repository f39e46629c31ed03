"""LoRA against full fine-tuning: memory and speed of a training step on the same model.

    python -m bench.lora_cost [--n-layer 8] [--n-embd 512] [--vocab 512] [--batch 8] [--block 128]
                              [--rank 8] [--targets attn,mlp] [--steps 6] [--device cpu]

Each variant runs in a fresh process (so its peak resident memory is its own): build the model,
add adapters (LoRA), build the optimizer as train.py does (trainer/optim.py, AdamW), then run
`--steps` training steps (forward, backward, optimizer step) on random tokens. Prints, per
variant: trainable parameters; the bytes of gradients and optimizer state (counted from the
tensors: what LoRA saves by construction); the process's peak resident memory; and the median
seconds per step after the first (which warms up allocators and kernels). On CUDA the peak is
torch's allocator peak instead of the process's.

Why the model is larger than the demo's: at 1M parameters PyTorch's own ~300 MB of resident
memory hides every difference; at 25M the optimizer state is the largest buffer, as in any model
worth fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.harness import REPO, machine


def one(args) -> dict:
    import torch

    from model import GPT, GPTConfig
    from model.lora import add_adapters
    from trainer.config import LoraConfig, OptimConfig
    from trainer.optim import build_optimizers

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer, n_head=args.n_embd // 64,
                    n_embd=args.n_embd, bias=False, tie_weights=False)
    model = GPT(cfg)
    if args.variant == "lora":
        add_adapters(model, LoraConfig(rank=args.rank, targets=args.targets.split(",")))
    model.to(device)
    opt = build_optimizers(model, OptimConfig(optimizer="adamw", warmup_iters=0), device.type)
    opt.set_lr_multiplier(1.0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.block + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        for o in opt.optimizers:
            o.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = sum(t.numel() * t.element_size() for o in opt.optimizers for s in o.state.values()
                for t in s.values() if torch.is_tensor(t))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in trainable),
            "grad_bytes": sum(p.numel() * p.element_size() for p in trainable), "optimizer_bytes": state,
            "peak_bytes": peak, "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attn,mlp")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 on a busy machine, where every small op of a "
                         "multi-threaded step can wait a scheduler slice for a descheduled thread")
    ap.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)  # one measurement, in-process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    rows = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, "-m", "bench.lora_cost", *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.splitlines()[-1]))
    mb = 1 / 2**20
    print(f"machine: {machine()}")
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, vocab {args.vocab}, batch {args.batch} x {args.block}; "
          f"LoRA rank {args.rank} on {args.targets}; AdamW; median of {args.steps - 1} steps after the first; "
          f"threads {args.threads or 'default'}; load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| variant | parameters | trained | gradients | optimizer state | peak memory | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['trainable'] / 1e6:.3f}M | {r['grad_bytes'] * mb:.1f} MB "
              f"| {r['optimizer_bytes'] * mb:.1f} MB | {r['peak_bytes'] * mb:.0f} MB | {r['step_s']:.3f} |")
    full, lora = rows
    saved = full["grad_bytes"] + full["optimizer_bytes"] - lora["grad_bytes"] - lora["optimizer_bytes"]
    print(f"LoRA: {saved * mb:.0f} MB less in gradients and optimizer state; peak memory {lora['peak_bytes'] * mb:.0f} "
          f"vs {full['peak_bytes'] * mb:.0f} MB ({1 - lora['peak_bytes'] / full['peak_bytes']:.0%} less); "
          f"a step takes {lora['step_s'] / full['step_s']:.2f}x the time of full fine-tuning's")


if __name__ == "__main__":
    main()
