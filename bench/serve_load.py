"""Serving under concurrent load: aggregate tokens/s at 1, 4 and 8 streaming clients, time to first
token and per-token latency, failed requests.

    python bench/serve_load.py [--clients 1,4,8] [--requests 2] [--tokens 200] [--rounds 3] [--threads 0] [--ckpt RUN]

Starts `serve.py` on a free loopback port (127.0.0.1 only) and, for each client count C, runs C
clients at once, each sending `--requests` streaming completions one after another (prompt
"ROMEO:", `--tokens` new tokens each, temperature 0.8, no stop, so every request makes exactly
that many tokens). The levels run `--rounds` times, interleaved (1, 4, 8, 1, 4, 8, ...), so a
burst of load from elsewhere on a shared machine hits every level alike. A level stops issuing
requests after `--max-seconds`; the whole run is bounded by count and time and stops by itself.

The model is nanoGPT's Shakespeare-char shape (6 layers, 6 heads, 384 wide, context 256, the
65-character vocabulary of Tiny Shakespeare) with random weights, written to a temporary
checkpoint: speed does not depend on what the weights say. `--ckpt` serves a trained run instead.

Reported per level: aggregate tokens/s (completion tokens of all clients / the level's wall
time; the median over rounds), p50/p99 time to first token (request sent -> first text chunk), p50/p99 per-token latency
(the gaps between a stream's consecutive chunks; a chunk is one token here), failed requests
(not 200, an error event, or fewer tokens than asked). Then the speed-up of the largest level
over one client; the issue's bar is >= 4x at 8 clients. The clients are raw asyncio HTTP in this
process, so what is measured is the server, not a client library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python bench/serve_load.py`

from bench.harness import REPO, machine  # noqa: E402


def random_checkpoint(folder: Path) -> Path:
    import torch

    from data.tokenizer import CharTokenizer
    from model import GPT, GPTConfig
    from trainer.checkpoint import save_checkpoint
    from trainer.config import Config

    tokenizer = CharTokenizer.from_text((REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8"))
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    run = folder / "random-6x384"
    run.mkdir()
    save_checkpoint(dict(model=model.state_dict(), config=cfg.to_dict(), tokenizer=tokenizer.state(), iter=0),
                    run / "latest.pt")
    return run


async def stream_once(port: int, tokens: int) -> dict:
    """One streaming completion over a raw connection: TTFT, the gaps between chunks, tokens, ok."""
    body = json.dumps({"model": "m", "prompt": "ROMEO:", "max_tokens": tokens, "temperature": 0.8, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status = (await reader.readline()).split()[1]
    while (await reader.readline()).strip():  # headers
        pass
    times, made, error = [], 0, None
    while line := await reader.readline():  # chunked transfer: size lines, then one event per chunk
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"]["message"]
            break
        if event.get("usage"):
            made = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            times.append(time.perf_counter())
    writer.close()
    ok = status == b"200" and error is None and made == tokens
    return {"ttft": times[0] - start if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": made, "ok": ok}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(runs: list[dict]) -> dict:
    """One level over its rounds: the median tokens/s, percentiles over every request."""
    results = [r for run in runs for r in run["results"]]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": runs[0]["clients"], "requests": len(results), "failed": sum(not r["ok"] for r in results),
            "tok_s": percentile([run["tok_s"] for run in runs], 0.5),
            "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "tpot_p50": percentile(gaps, 0.5), "tpot_p99": percentile(gaps, 0.99)}


async def level(port: int, clients: int, requests: int, tokens: int, max_seconds: float) -> dict:
    deadline = time.perf_counter() + max_seconds
    results = []

    async def client():
        for _ in range(requests):
            if time.perf_counter() > deadline:
                return
            results.append(await stream_once(port, tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": clients, "results": results, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": percentile(ttft, 0.5), "tpot_p50": percentile([g for r in results for g in r["gaps"]], 0.5),
            "requests": len(results), "failed": sum(not r["ok"] for r in results)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,8", help="concurrent streaming clients per level, comma-separated")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="times each level runs (interleaved); tokens/s: median")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="a level issues no request after this")
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--ckpt", default=None, help="serve this run instead of random weights")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(Path(tmp))
        server = subprocess.Popen([sys.executable, "serve.py", "--ckpt", str(ckpt), "--port", "0",
                                   "--max-batch", str(args.max_batch), "--threads", str(args.threads)],
                                  cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            first = server.stderr.readline()
            match = re.search(r"127\.0\.0\.1:(\d+)", first)
            if not match:
                sys.exit(f"the server did not start: {first}{server.stderr.read()}")
            port = int(match[1])
            asyncio.run(stream_once(port, 16))  # warm-up
            runs = {clients: [] for clients in levels}
            for round in range(args.rounds):
                for clients in levels:
                    r = asyncio.run(level(port, clients, args.requests, args.tokens, args.max_seconds))
                    runs[clients].append(r)
                    print(f"round {round + 1}, {clients} client(s): {r['tok_s']:.0f} tokens/s, TTFT p50 "
                          f"{r['ttft_p50'] * 1e3:.0f} ms, per token p50 {r['tpot_p50'] * 1e3:.1f} ms, "
                          f"{r['requests']} requests, {r['failed']} failed", flush=True)
            rows = [summary(runs[clients]) for clients in levels]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    print(f"\nmachine: {machine()}; load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"model: {'random weights, ' if not args.ckpt else ''}{ckpt.name}; {args.tokens} tokens per request, "
          f"{args.requests} per client, {args.rounds} rounds; server threads {args.threads or 'default'}\n")
    print("| clients | aggregate tokens/s | TTFT p50 / p99 (ms) | per-token p50 / p99 (ms) | requests | failed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['tok_s']:.0f} | {r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | "
              f"{r['tpot_p50'] * 1e3:.1f} / {r['tpot_p99'] * 1e3:.1f} | {r['requests']} | {r['failed']} |")
    base = next((r for r in rows if r["clients"] == 1), None)
    if base:
        top = rows[-1]
        print(f"\n{top['clients']} clients / 1 client: {top['tok_s'] / base['tok_s']:.2f}x aggregate tokens/s")
    if any(r["failed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
