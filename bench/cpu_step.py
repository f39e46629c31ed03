"""In-process A/B timings of the classic CPU shape's forward + backward (4 layers, 4 heads, 128
wide, batch 12 x context 64), for the questions bench/RESULTS.md answers about the CPU step.

    python bench/cpu_step.py [loss|split|compile|attention|workers|nanogpt|profile ...] [--rounds 40]

- loss: the plain cross-entropy against the fused head + loss (model/loss.py) run eagerly, at
  a character vocabulary (65) and GPT-2's (50,304): why eager training keeps the plain loss.
- split: the batch as 1, 2 or 3 sequential micro-batches (a smaller working set, more ops).
- compile: eager against torch.compile of the model, with Inductor's defaults, its C++ wrapper
  (no Python between kernels) and max-autotune (its own C++ GEMM kernels tried against MKL);
  each one's compile time is reported separately.
- attention: one layer's causal attention, forward + backward, through PyTorch's CPU flash
  kernel (what the model uses) against baddbmm + softmax + bmm (the path it used to take for
  contexts up to 64), at contexts 64 and 128.
- workers: the batch split in two halves on two Python threads of one torch thread each,
  against one pass with two torch threads (fork-join parallelism inside each op).
- nanogpt: this trainer's training step (model, clip, fused AdamW) against bench/vs_nanogpt.py's
  nanoGPT-equivalent step on the same batch, in one process (so both get this trainer's malloc
  setting, unlike in vs_nanogpt.py): what the model and optimizer code alone are worth.
- profile: where a training step (forward, backward, clip, fused AdamW) spends its time, by
  operator and shape, and the same matmuls' speed when run alone.

The variants alternate within each round, in one process, and the median per variant is
printed: this shared machine's speed drifts too much between processes for a few percent.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from harness import machine
from model import GPT
from model import GPTConfig
from trainer.runtime import keep_freed_memory

B, T = 12, 64


def classic(vocab: int) -> GPT:
    cfg = GPTConfig(vocab_size=vocab, block_size=T, n_layer=4, n_head=4, n_embd=128, bias=False)
    cfg.validate()
    torch.manual_seed(0)
    return GPT(cfg)


def batch(vocab: int):
    return torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))


def race(variants: dict, rounds: int, warmup: int = 5) -> dict:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def show(medians: dict, digits: int = 1) -> str:
    return ", ".join(f"{name} {ms:.{digits}f}" for name, ms in medians.items())


def loss_variants(vocab: int) -> dict:
    model, (x, y) = classic(vocab), batch(vocab)

    def plain():
        logits, _ = model(x)
        F.cross_entropy(logits.view(-1, vocab), y.view(-1), ignore_index=-1).backward()

    def fused():  # what a compiled forward traces, run eagerly
        is_compiling, torch.compiler.is_compiling = torch.compiler.is_compiling, lambda: True
        try:
            model(x, y)[1].backward()
        finally:
            torch.compiler.is_compiling = is_compiling
    return {"plain loss": plain, "fused loss, eager": fused}


def split_variants() -> dict:
    model, (x, y) = classic(65), batch(65)

    def micro(k):
        def step():
            for xb, yb in zip(x.chunk(k), y.chunk(k)):
                model(xb, yb)[1].backward()
        return step
    return {f"{k} micro-batch(es)": micro(k) for k in (1, 2, 3)}


def compile_variants() -> dict:
    x, y = batch(65)
    settings = {"compiled": {}, "compiled, C++ wrapper": {"options": {"cpp_wrapper": True}},
                "compiled, max-autotune": {"mode": "max-autotune-no-cudagraphs"}}
    variants = {"eager": classic(65)}
    for name, kwargs in settings.items():
        variants[name] = torch.compile(classic(65), **kwargs)
        start = time.perf_counter()
        variants[name](x, y)[1].backward()
        print(f"  {name}: first call (compilation) {time.perf_counter() - start:.1f} s")
    return {name: (lambda m: lambda: m(x, y)[1].backward())(m) for name, m in variants.items()}


def matmul_softmax_attention(q, k, v):
    B, H, T, D = q.shape
    causal = torch.full((T, T), float("-inf")).triu(1)
    scores = torch.baddbmm(causal, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D ** -0.5)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, T, D)).view(B, H, T, D)


def attention_variants(T: int) -> dict:
    qkv = torch.randn(B * 64 // T, T, 3, 4, 32, requires_grad=True)  # 768 tokens, 4 heads of 32
    grad = torch.randn(qkv.shape[0], 4, T, 32)

    def run(attend):
        def step():
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            attend(q, k, v).backward(grad)
            qkv.grad = None
        return step
    return {"flash (SDPA)": run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "baddbmm+softmax+bmm": run(matmul_softmax_attention)}


def worker_variants() -> dict:
    from concurrent.futures import ThreadPoolExecutor
    model, (x, y) = classic(65), batch(65)
    params = list(model.parameters())
    pool = ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,))  # per-thread setting

    def half(i):
        return torch.autograd.grad(model(x.chunk(2)[i], y.chunk(2)[i])[1] * 0.5, params)

    def two_workers():
        g0, g1 = pool.map(half, range(2))
        torch._foreach_add_(g0, g1)
    return {"one pass, 2 torch threads": lambda: torch.autograd.grad(model(x, y)[1], params),
            "2 halves on 2 threads of 1": two_workers}


def nanogpt_variants() -> dict:
    import itertools
    import tempfile
    from pathlib import Path

    import numpy as np

    from trainer.config import OptimConfig
    from trainer.optim import build_optimizers
    from vs_nanogpt import NanoGPTLoop
    tmp = tempfile.TemporaryDirectory()
    data = Path(tmp.name) / "train.bin"
    np.random.default_rng(0).integers(0, 65, 100_000).astype(np.uint16).tofile(data)
    baseline = NanoGPTLoop(data, vocab=65)
    x, y = baseline.get_batch()
    model = classic(65)
    optimizer = build_optimizers(model, OptimConfig(), "cpu")
    iters = itertools.count()

    def nanogpt():  # its per-step batch read included, as in vs_nanogpt.py
        baseline.iteration(next(iters), x, y)
    nanogpt.data_dir = tmp  # the batch file lives as long as the variants do

    def ours():
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return {"nanoGPT-equivalent step": nanogpt, "this trainer's step": ours}


def profile_step(steps: int = 30):
    from torch.profiler import ProfilerActivity, profile

    from trainer.config import OptimConfig
    from trainer.optim import build_optimizers
    model, (x, y) = classic(65), batch(65)
    optimizer = build_optimizers(model, OptimConfig(), "cpu")

    def step():
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    print("step:", show(race({"train step": step}, steps, warmup=10)))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1000
    print(f"profiled step: {total:.1f} ms; by operator and input shapes (ms per step):")
    for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:16]:
        print(f"  {e.self_cpu_time_total / steps / 1000:6.2f}  {e.count // steps:3d} calls  {e.key}  {e.input_shapes}")
    mm = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
    flops = sum(2 * a[0] * a[1] * b[1] * e.count for e in mm for a, b in [e.input_shapes[:2]]) / steps
    mm_ms = sum(e.self_cpu_time_total for e in mm) / steps / 1000
    print(f"aten::mm in the step: {mm_ms:.1f} ms for {flops / 1e9:.2f} GFLOP = {flops / mm_ms / 1e6:.0f} GFLOP/s")
    for e in mm:
        (m, k), (_, n) = e.input_shapes[:2]
        a, b = torch.randn(m, k), torch.randn(k, n)
        alone = race({"mm": lambda: a @ b}, 200)["mm"]
        print(f"  [{m}x{k}] @ [{k}x{n}]: {2 * m * k * n / alone / 1e6:.0f} GFLOP/s alone, "
              f"{2 * m * k * n * e.count / e.self_cpu_time_total / 1e3:.0f} in the step")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", help="which measurements (default: all)")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    choices = ["loss", "split", "compile", "attention", "workers", "nanogpt", "profile"]
    unknown = set(args.what) - set(choices)
    if unknown:
        ap.error(f"unknown measurement(s) {sorted(unknown)}: choose from {', '.join(choices)}")
    keep_freed_memory()  # as train.py does on CPU
    print(f"machine: {machine()}, {torch.get_num_threads()} threads; forward + backward, median ms")
    for what in args.what or choices:
        if what == "loss":
            for vocab, rounds in ((65, args.rounds), (50304, max(3, args.rounds // 8))):
                print(f"loss, vocabulary {vocab}:", show(race(loss_variants(vocab), rounds)))
        elif what == "split":
            print("split:", show(race(split_variants(), args.rounds)))
        elif what == "compile":
            print("compile:", show(race(compile_variants(), args.rounds)))
        elif what == "attention":
            for T in (64, 128):
                print(f"attention, context {T}, one layer:", show(race(attention_variants(T), 3 * args.rounds), 2))
        elif what == "workers":
            print("workers:", show(race(worker_variants(), args.rounds)))
        elif what == "nanogpt":
            base, ours = race(nanogpt_variants(), args.rounds).values()
            print(f"nanogpt: nanoGPT-equivalent step {base:.1f}, this trainer's step {ours:.1f} "
                  f"(ratio {base / ours:.2f}x)")
        else:
            profile_step()


if __name__ == "__main__":
    main()
