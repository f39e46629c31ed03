"""Measure data prep: the whole pipeline against tiktoken's batch encoder, peak memory, BPE time.

Run from the repository root:  python -m bench.prep [--mb 200] [--workers 0] [--skip-bpe]

1. Generates a multi-file corpus of about `--mb` MB under /tmp (kept for reuse): half as `.txt`
   files of about 100 KB (a file is a document), half as `.jsonl` files of 5 KB documents. The
   text is Tiny Shakespeare's lines, shuffled, with random numbers and made-up words mixed in so
   that the set of distinct words keeps growing, as in real text.
2. Runs the whole prep (`python -m data.prepare --tokenizer gpt2`, reading, splitting, encoding,
   writing shards) in a child process, and reports wall time, MB/s, tokens/s, CPU use (CPU
   seconds over wall seconds: 2.0 means both of 2 cores busy) and the child's peak RSS.
3. The baseline: the same documents already in memory, encoded by tiktoken's
   `encode_ordinary_batch` (its default 8 threads) in this process; wall time and this
   process's peak RSS (the text plus a Python int per token).
4. The BPE trainer: 4,096 tokens learnt from the first 10 MB of the corpus's documents.

Needs GPT-2's vocabulary (offline: TIKTOKEN_CACHE_DIR). Prep runs on the CPU; there is nothing
to measure on a GPU.
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tiktoken

from data.tokenizer import TiktokenTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"


def make_corpus(folder: Path, total_bytes: int, seed: int = 0):
    marker = folder / "COMPLETE"
    if marker.exists() and int(marker.read_text()) == total_bytes:
        return
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "txt").mkdir(parents=True)
    (folder / "jsonl").mkdir()
    rng = random.Random(seed)
    lines = [line for line in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if line.strip()]
    syllables = "ka lo mi ne ru sta tre quo pli an ed ing ous ver ther ment al".split()

    def document(size: int) -> str:
        out, n = [], 0
        while n < size:
            line = rng.choice(lines)
            if rng.random() < 0.2:
                line += f" {rng.randrange(100000)} " + "".join(rng.choices(syllables, k=rng.randint(2, 5)))
            out.append(line)
            n += len(line) + 1
        return "\n".join(out) + "\n"

    half, written, i = total_bytes // 2, 0, 0
    while written < half:
        doc = document(100_000)
        (folder / "txt" / f"{i // 100:03d}-{i:05d}.txt").write_text(doc, encoding="utf-8")
        written, i = written + len(doc.encode()), i + 1
    f, j = None, 0
    while written < total_bytes:
        if f is None or f.tell() > 10_000_000:
            f = open(folder / "jsonl" / f"part-{j:03d}.jsonl", "w", encoding="utf-8")
            j += 1
        doc = document(5_000)
        f.write(json.dumps({"text": doc}) + "\n")
        written += len(doc.encode())
    f.close()
    marker.write_text(str(total_bytes))


def read_documents(folder: Path) -> list[str]:
    docs = [p.read_text(encoding="utf-8") for p in sorted((folder / "txt").rglob("*.txt"))]
    for p in sorted((folder / "jsonl").glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (1e6 bytes)")
    ap.add_argument("--workers", type=int, default=0, help="prep encoding threads; 0 = all cores")
    ap.add_argument("--baseline-threads", type=int, default=8, help="encode_ordinary_batch's num_threads "
                    "(8 is its default; on a loaded machine more threads win a larger share of the CPU)")
    ap.add_argument("--skip-bpe", action="store_true", help="skip the BPE trainer timing")
    args = ap.parse_args()

    folder = Path(f"/tmp/gpt-trainer-bench-corpus-{args.mb:g}mb")
    t0 = time.perf_counter()
    make_corpus(folder, int(args.mb * 1e6))
    n_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl"))
    print(f"corpus: {folder}, {n_bytes / 1e6:.1f} MB in {sum(1 for _ in folder.rglob('*.*')) - 1} files "
          f"(ready in {time.perf_counter() - t0:.1f}s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")

    out = Path("/tmp/gpt-trainer-bench-prepared")
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(folder), "--tokenizer", "gpt2",
                    "--out", str(out), "--workers", str(args.workers)], check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    meta = json.loads((out / "meta.json").read_text())
    n_tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
    print(f"pipeline (read + split + encode + write shards): {wall:.1f}s, {n_bytes / 1e6 / wall:.2f} MB/s, "
          f"{n_tokens / wall:,.0f} tokens/s, CPU use {cpu / wall:.2f} cores, peak RSS {after.ru_maxrss / 1024:.0f} MB")

    docs = read_documents(folder)
    enc = tiktoken.get_encoding("gpt2")
    enc.encode_ordinary("warm up")
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(docs, num_threads=args.baseline_threads)
    base = time.perf_counter() - t0
    base_tokens = sum(map(len, ids))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del ids
    print(f"baseline encode_ordinary_batch, {args.baseline_threads} threads (text already in memory, one "
          f"process): {base:.1f}s, {n_bytes / 1e6 / base:.2f} MB/s, {base_tokens:,} tokens (pipeline: "
          f"{n_tokens:,} with one end-of-text per document), peak RSS {rss:.0f} MB; "
          f"pipeline/baseline speed {base / wall:.2f}x")

    if not args.skip_bpe:
        sample, size = [], 0
        for d in docs:
            sample.append(d)
            size += len(d.encode())
            if size >= 10_000_000:
                break
        t0 = time.perf_counter()
        TiktokenTokenizer.train(sample, 4096)
        print(f"BPE trainer: 4,096 tokens on {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
