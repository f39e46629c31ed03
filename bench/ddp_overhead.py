"""What wrapping costs on one device: training throughput of the same model plain, under DDP
and under FSDP2 (`fully_shard` per block), each in a one-process group.

Run from the repository root:
    python -m bench.ddp_overhead                      # CUDA if present (GPT-2 124M, bf16), else CPU/gloo
    python -m bench.ddp_overhead --device cpu --iters 5   # a smoke check of the CPU/gloo path

With one process there is nothing to communicate with, so the difference from plain is the
wrappers' own cost: DDP's gradient hooks and bucket copies, FSDP2's per-block all-gather and
reduce-scatter calls and (on GPU) the bf16 parameter casts of its mixed-precision policy. Each
mode gets a freshly built model (FSDP2 shards in place), the same random token batches, warmup
steps excluded, and a device synchronisation around the timed steps. The step is train.py's:
autocast forward, backward, gradient clipping, AdamW.
"""

from __future__ import annotations

import argparse
import time

import torch

from model import build_model
from trainer.config import load_config
from trainer.dist import Dist, init_distributed, shutdown, wrap_model
from trainer.metrics import peak_flops
from trainer.optim import build_optimizers
from trainer.runtime import setup_runtime

PRESETS = {  # (n_layer, n_head, n_embd, block_size, batch_size, vocab_size)
    "gpt2": (12, 12, 768, 1024, 16, 50304),  # GPT-2 small, 124M parameters
    "tiny": (2, 2, 64, 64, 8, 256),
}


def measure(mode: str, cfg, rt, iters: int, warmup: int) -> float:
    """Tokens per second of full training steps with the model wrapped as `mode`."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(rt.device)
    wrapped = wrap_model(model, Dist(mode), cfg.train, rt)
    step_model = torch.compile(wrapped) if cfg.train.compile else wrapped
    optimizer = build_optimizers(model, cfg.optim, rt.device.type)
    B, T = cfg.train.batch_size, cfg.model.block_size
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=rt.device)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), device=rt.device)

    def step():
        with rt.autocast:
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return iters * B * T / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: gpt2 on CUDA, tiny on CPU")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    ap.add_argument("--modes", default="none,ddp,fsdp")
    args = ap.parse_args()

    probe = setup_runtime(load_config(None, [f"train.device={args.device}"]).train)
    preset = args.preset or ("gpt2" if probe.device.type == "cuda" else "tiny")
    n_layer, n_head, n_embd, block, batch, vocab = PRESETS[preset]
    cfg = load_config(None, [f"train.device={args.device}", f"model.n_layer={n_layer}", f"model.n_head={n_head}",
                             f"model.n_embd={n_embd}", f"model.block_size={block}", f"model.vocab_size={vocab}",
                             f"train.batch_size={batch}", f"train.compile={str(args.compile).lower()}",
                             "train.parallel=ddp"])
    rt = setup_runtime(cfg.train)
    d = init_distributed(cfg.train, rt)  # a one-process group: DDP and FSDP2 need one
    peak = peak_flops(rt.device)
    flops_per_token = build_model(cfg.model).flops_per_token()
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "CPU"
    print(f"{name}, {preset} ({n_layer}x{n_embd}, context {block}, batch {batch}), "
          f"{str(rt.dtype).removeprefix('torch.')}, compile={args.compile}, torch {torch.__version__}")
    print(f"{'mode':6} {'tokens/s':>12} {'vs plain':>9} {'MFU':>7}")
    base = None
    for mode in args.modes.split(","):
        tok_s = measure(mode, cfg, rt, args.iters, args.warmup)
        base = base or tok_s
        mfu = f"{100 * flops_per_token * tok_s / peak:.1f}%" if peak else "n/a"
        print(f"{'plain' if mode == 'none' else mode:6} {tok_s:12,.0f} {tok_s / base - 1:+9.1%} {mfu:>7}", flush=True)
    shutdown(d)


if __name__ == "__main__":
    main()
