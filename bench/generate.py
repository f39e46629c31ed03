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
3. on the CPU in float32, the cached path with its one-token steps replayed from a TorchScript
   trace (sample.py's default there; tracing counted); on CUDA, replayed from a CUDA graph
   (sample.py's default there), then the same with the model compiled (`sample.py --compile`).

Timing is wall clock around whole generations, after one short warm-up, with the device
synchronised. `--quick` shortens everything for a smoke test.

Two more modes, for the CPU:

    python bench/generate.py --sample-py [--rounds 3] [--tokens 1000] [--prompt ROMEO:] [--also '--dtype bfloat16']
    python bench/generate.py --profile [--tokens 200] [--threads 2] [--decode trace]

`--sample-py` times what a user runs: `python sample.py --ckpt RUN --prompt ROMEO:
--max-new-tokens 1000 --temperature 1.0` on a checkpoint of nanoGPT's Shakespeare shape
(`configs/classic-cpu.yaml` at 6 layers, 6 heads, 384 wide, context 256, after one training
step), its speed read from its summary line (everything after the model is loaded, warm-up
included), against nanoGPT's generate on the same checkpoint in a process of its own, timed
the same way (encode, crop to the window, a full forward per token, temperature, top-k 200,
multinomial, decode and print). The two alternate; the median round's ratio is reported.
`--profile` splits what one cached token costs on the CPU: wall time per token, the operators
it runs (count and self time) and what is left for Python between them.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python bench/generate.py`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.harness import REPO, machine  # noqa: E402

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


SAMPLE_LINE = re.compile(r"generated (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)")


@torch.no_grad()
def nanogpt_sample(ckpt: str, prompt: str, n: int, temperature: float, top_k: int, seed: int) -> float:
    """nanoGPT's sample.py on a checkpoint of this trainer: its generate loop, then decode and print;
    tokens/s counted from after the model is loaded, as sample.py's summary line counts."""
    from trainer.checkpoint import load_model

    model, tokenizer, _, _ = load_model(ckpt, "cpu")
    start = time.perf_counter()
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    block = model.cfg.block_size
    for _ in range(n):
        idx_cond = idx if idx.size(1) <= block else idx[:, -block:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / temperature
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
        idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
    sys.stdout.write(tokenizer.decode(idx[0].tolist()) + "\n")
    return n / (time.perf_counter() - start)


def sample_py_vs_recompute(args):
    """The issue-18 claim: sample.py's own tokens/s against nanoGPT's generate, alternating."""
    print(f"machine: {machine()}; {args.tokens} tokens, prompt {args.prompt!r}, temperature 1.0, top-k 200")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shape = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256"]
        subprocess.run([sys.executable, "train.py", "configs/classic-cpu.yaml", *shape, "train.max_iters=1",
                        "train.final_eval_tokens=2560", f"out_dir={run}", f"data.prepared_dir={tmp}/prep"],
                       cwd=REPO, check=True, capture_output=True)
        also = {extra: [] for extra in args.also}
        for r in range(args.rounds):
            def sample_py(*extra):
                proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run), "--prompt", args.prompt,
                                       "--max-new-tokens", str(args.tokens), "--temperature", "1.0", *extra],
                                      cwd=REPO, capture_output=True, text=True, check=True)
                return float(SAMPLE_LINE.search(proc.stderr)[3])

            ours = sample_py()
            variants = {extra: sample_py(*extra.split()) for extra in args.also}
            proc = subprocess.run([sys.executable, __file__, "--nanogpt-child", str(run), "--prompt", args.prompt,
                                   "--tokens", str(args.tokens)], cwd=REPO, capture_output=True, text=True, check=True)
            base = float(proc.stderr.strip().splitlines()[-1])
            ratios.append((ours / base, ours, base))
            for extra, speed in variants.items():
                also[extra].append(speed / base)
            print(f"round {r + 1}: sample.py {ours:.1f} tokens/s, nanoGPT's generate {base:.1f} tokens/s: "
                  f"{ours / base:.1f}x" + "".join(f"; sample.py {extra} {speed:.1f} tokens/s: {speed / base:.1f}x"
                                                 for extra, speed in variants.items()), flush=True)
        for extra, rs in also.items():
            print(f"sample.py {extra} / nanoGPT-style recompute (float32): median {statistics.median(rs):.1f}x "
                  f"(rounds {min(rs):.1f}-{max(rs):.1f}x)")
    ratio, ours, base = sorted(ratios)[len(ratios) // 2]
    print(f"sample.py / nanoGPT-style recompute: {ratio:.1f}x (median round: {ours:.1f} vs {base:.1f} tokens/s; "
          f"rounds {min(r[0] for r in ratios):.1f}-{max(r[0] for r in ratios):.1f}x; target >= 10x)")


def profile(model, n: int, decode: str):
    """Where one cached token's time goes on the CPU: operators (count, self time) and Python."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    generator = torch.Generator().manual_seed(0)
    idx = torch.zeros(1, 1, dtype=torch.long)
    cached(decode)(model, idx, 8, generator)
    start = time.perf_counter()
    cached(decode)(model, idx, n, generator)
    wall = (time.perf_counter() - start) / n
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        cached(decode)(model, idx, n, generator)
    events = prof.key_averages()
    top_level = sum(e.self_cpu_time_total for e in events) / 1e6 / n  # every op's own time, once
    print(f"{wall * 1e3:.2f} ms per token without the profiler; under it, per token: "
          f"{sum(e.count for e in events) / n:.0f} operator calls, {top_level * 1e3:.2f} ms inside operators")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.key:50s} {e.count / n:6.1f} calls {e.self_cpu_time_total / n / 1e3:7.3f} ms")
    print(f"  outside operators (Python, module calls): {max(wall - top_level, 0) * 1e3:.2f} ms "
          f"of the {wall * 1e3:.2f} ms a token takes unprofiled")


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
    ap.add_argument("--sample-py", action="store_true", help="sample.py's summary line against nanoGPT's generate")
    ap.add_argument("--profile", action="store_true", help="what one cached token costs on the CPU")
    ap.add_argument("--decode", default="dynamic",
                    help="with --profile: dynamic | static | trace (sample.py's CPU default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--also", action="append", default=[], metavar="ARGS",
                    help="with --sample-py: also time sample.py with these extra arguments, e.g. '--dtype bfloat16'")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--nanogpt-child", metavar="RUN", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nanogpt_child:
        print(nanogpt_sample(args.nanogpt_child, args.prompt, args.tokens, 1.0, 200, 1337), file=sys.stderr)
        return
    if args.sample_py:
        sample_py_vs_recompute(args)
        return
    if args.quick:
        args.tokens, args.batch = 200, 2
    device = pick_device(args.device)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=256, n_layer=6, n_head=6, n_embd=384, pos=args.pos)
    torch.manual_seed(0)
    model = GPT(cfg).to(device, getattr(torch, args.dtype)).eval()
    n = args.tokens
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {model.num_params() / 1e6:.1f}M parameters, "
          f"{args.pos} positions, {args.dtype}, {n} new tokens from a 1-token prompt")
    if args.profile:
        profile(model, n, args.decode)
        return

    with_cache = tokens_per_s(cached(), model, 1, n, device)
    without = tokens_per_s(nanogpt_loop, model, 1, n, device)
    print(f"KV cache        {with_cache:10.1f} tokens/s")
    print(f"no cache        {without:10.1f} tokens/s   (nanoGPT: whole window per token)")
    print(f"speed-up        {with_cache / without:10.1f}x")
    if device.type == "cpu" and args.dtype == "float32":
        traced = tokens_per_s(cached("trace"), model, 1, n, device)  # tracing counted: each generation traces
        print(f"KV cache, traced{traced:10.1f} tokens/s   ({traced / with_cache:.2f}x eager, {traced / without:.1f}x "
              f"no cache; sample.py's CPU default)")

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
