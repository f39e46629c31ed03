"""RWKV's WKV in training: the chunked parallel form against a loop over the tokens.

    python -m bench.wkv [--batch 16] [--context 128] [--width 128] [--head-size 32] [--threads 0]

Times forward + backward of one layer's WKV (model/rwkv.py) at the shape `configs/rwkv.yaml`
trains (batch 16, context 128, 4 heads of 32), random inputs with decays spread over the
allowed range and a zero incoming state, as in training: `wkv_chunked` at chunk sizes 4, 8 and
16, and the recurrent step (`wkv_step`) called once per token, which is what a plain RNN
implementation does. Reports the median of 7 timed rounds after a warm-up (the forms
alternate within a round, so a change in machine load hits all of them alike), and the largest
difference of each chunked output from the loop's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import machine
from model.rwkv import LOG_DECAY_MIN, wkv_chunked, wkv_step


def token_loop(r, k, v, logw, u, state):
    ys = []
    for t in range(r.size(2)):
        y, state = wkv_step(r[:, :, t], k[:, :, t], v[:, :, t], logw[:, :, t], u, state)
        ys.append(y)
    return torch.stack(ys, dim=2), state


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--head-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, H, T, K = args.batch, args.width // args.head_size, args.context, args.head_size
    r, k, v = (torch.randn(B, H, T, K, generator=g) for _ in range(3))
    logw = torch.rand(B, H, T, K, generator=g) * LOG_DECAY_MIN
    u, state = torch.randn(H, K, generator=g), torch.zeros(B, H, K, K)

    forms = {f"chunked, chunk {c}": (lambda *a, c=c: wkv_chunked(*a, chunk=c)) for c in (4, 8, 16)}
    forms["loop over tokens"] = token_loop

    def run(form):
        inputs = [t.clone().requires_grad_() for t in (r, k, v, logw, u)] + [state]
        start = time.perf_counter()
        y, final = form(*inputs)
        (y.square().sum() + final.square().sum()).backward()
        return time.perf_counter() - start, y.detach()

    times = {name: [] for name in forms}
    outputs = {name: run(form)[1] for name, form in forms.items()}  # warm-up
    for _ in range(7):
        for name, form in forms.items():
            times[name].append(run(form)[0])
    print(f"machine: {machine()}, {torch.get_num_threads()} threads")
    print(f"WKV forward + backward, batch {B}, context {T}, {H} heads of {K}:")
    loop = statistics.median(times["loop over tokens"])
    for name in forms:
        t = statistics.median(times[name])
        diff = (outputs[name] - outputs["loop over tokens"]).abs().max().item()
        print(f"  {name:<18} {t * 1000:8.1f} ms  ({loop / t:5.1f}x the loop)  max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
