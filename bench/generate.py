"""Generation speed: the KV cache against recomputing the window, and one batch against a loop.

    python bench/generate.py [--tokens 1000] [--device auto] [--pos learned] [--vocab 65] [--quick]

The model is nanoGPT's Shakespeare-char shape (6 layers, 6 heads, 384 wide, 256 context,
65-token vocabulary) with random weights; speed does not depend on what the weights say.
Every run starts from a one-token prompt and samples `--tokens` tokens (temperature 0.8,
top-k 200, as nanoGPT's sample.py), so it runs well past the context window. It reports:

1. tokens/s with the cache (`model.generate.generate`) and without it, where the baseline is
   nanoGPT's loop: crop to the last block_size tokens and run the whole window for every token;
   and their ratio;
2. a batch of 8 samples against 8 samples one after the other (both with the cache);
3. on CUDA, the cached path with its one-token steps replayed from a CUDA graph (sample.py's
   default there), then the same with the model compiled (`sample.py --compile`).

Timing is wall clock around whole generations, after one short warm-up, with the device
synchronised. `--quick` shortens everything for a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python bench/generate.py`

import torch  # noqa: E402

from model import GPT  # noqa: E402
from model.generate import Sampling, generate, sample_next  # noqa: E402
from model import GPTConfig  # noqa: E402
from trainer.runtime import compile_with_fallback, pick_device  # noqa: E402

SAMPLING = Sampling(temperature=0.8, top_k=200)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def nanogpt_loop(model, idx, n, generator):
    """nanoGPT's generate: no cache, the whole (cropped) window recomputed for every token."""
    block = model.cfg.block_size
    for _ in range(n):
        logits, _ = model(idx[:, -block:])
        nxt = sample_next(logits[:, -1], idx, SAMPLING, generator)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
    return idx


def cached(decode="dynamic"):
    def run(model, idx, n, generator):
        for _ in generate(model, idx, n, SAMPLING, generator, decode=decode):
            pass
    return run


def tokens_per_s(fn, model, batch, n, device, repeats=1, warmup=8) -> float:
    """Tokens made per second by `repeats` calls of fn generating n tokens for `batch` rows,
    after a warm-up generation of `warmup` tokens (a compiled model needs all n: its shapes
    change at every cache restart, and compiling is not generating)."""
    generator = torch.Generator(device=device).manual_seed(0)
    idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
    fn(model, idx, min(n, warmup), generator)  # warm-up: allocator, kernels, compilation
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(model, idx, n, generator)
    sync(device)
    return repeats * batch * n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000, help="new tokens per generation")
    ap.add_argument("--batch", type=int, default=8, help="samples in the batched comparison")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pos", default="learned", help="learned (rebuilds the cache) | rope (rolls it)")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (model weights)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run on CUDA")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    ap.add_argument("--quick", action="store_true", help="200 tokens, batch of 2: a smoke test")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.batch = 200, 2
    device = pick_device(args.device)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=6, n_head=6, n_embd=384, pos=args.pos)
    torch.manual_seed(0)
    model = GPT(cfg).to(device, getattr(torch, args.dtype)).eval()
    n = args.tokens
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {model.num_params() / 1e6:.1f}M parameters, "
          f"{args.pos} positions, {args.dtype}, {n} new tokens from a 1-token prompt")

    with_cache = tokens_per_s(cached(), model, 1, n, device)
    without = tokens_per_s(nanogpt_loop, model, 1, n, device)
    print(f"KV cache        {with_cache:10.1f} tokens/s")
    print(f"no cache        {without:10.1f} tokens/s   (nanoGPT: whole window per token)")
    print(f"speed-up        {with_cache / without:10.1f}x")

    batched = tokens_per_s(cached(), model, args.batch, n, device)
    sequential = tokens_per_s(cached(), model, 1, n, device, repeats=args.batch)
    print(f"batch of {args.batch}      {batched:10.1f} tokens/s")
    print(f"{args.batch} sequential    {sequential:10.1f} tokens/s")
    print(f"speed-up        {batched / sequential:10.1f}x")

    if device.type != "cuda":
        return
    graphed = tokens_per_s(cached("graph"), model, 1, n, device)
    graphed_batch = tokens_per_s(cached("graph"), model, args.batch, n, device)
    print(f"CUDA graph      {graphed:10.1f} tokens/s   (batch of 1; {graphed / with_cache:.1f}x eager, "
          f"{graphed / without:.1f}x no cache)")
    print(f"CUDA graph x{args.batch}   {graphed_batch:10.1f} tokens/s   ({graphed_batch / batched:.1f}x eager batch)")
    if not args.no_compile:
        model.forward = compile_with_fallback(model.forward, log=print)
        compiled = tokens_per_s(cached("graph"), model, 1, n, device, warmup=n)
        compiled_batch = tokens_per_s(cached("graph"), model, args.batch, n, device, warmup=n)
        print(f"compiled+graph  {compiled:10.1f} tokens/s   (batch of 1; {compiled / with_cache:.1f}x eager)")
        print(f"compiled+graph x{args.batch} {compiled_batch:10.1f} tokens/s   ({compiled_batch / batched:.1f}x eager batch)")

if __name__ == "__main__":
    main()
