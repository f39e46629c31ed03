"""Time BPE training on ~10 MB of deterministic, varied English-like text.

Run from the repository root:  python -m bench.bpe_train [--mb 10] [--vocab-size 4096]

Repeating Tiny Shakespeare would leave only ~25k distinct words and flatter
the trainer, so each copy shuffles the words of every line and mutates a share
of them (letter swaps, digits, case changes, joins) to keep the set of distinct
pre-tokens growing with the corpus, as it does in real data.
"""

import argparse
import random
import time
from pathlib import Path

import regex

from data.bpe import GPT4_SPLIT_PATTERN, make_encoding, train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"


def mutate(word: str, rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0 and len(word) > 1:
        i = rng.randrange(len(word))
        return word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i + 1:]
    if kind == 1:
        return word + str(rng.randrange(1000))
    if kind == 2:
        return word.swapcase()
    return word + rng.choice(("ness", "ly", "ing", "ed", "er", "s", "ful"))


def make_corpus(n_chars: int, seed: int = 0, mutate_p: float = 0.15) -> list[str]:
    rng = random.Random(seed)
    speeches = [s.splitlines() for s in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")]
    docs, total = [], 0
    while total < n_chars:
        for lines in speeches:
            out = []
            for line in lines:
                words = line.split()
                rng.shuffle(words)
                out.append(" ".join(mutate(w, rng) if rng.random() < mutate_p else w for w in words))
            doc = "\n".join(out)
            docs.append(doc)
            total += len(doc)
            if total >= n_chars:
                break
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=10.0, help="corpus size in millions of characters")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args()

    docs = make_corpus(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    split = regex.compile(GPT4_SPLIT_PATTERN)
    n_unique = len({w for d in docs for w in split.findall(d)})
    print(f"corpus: {len(docs)} docs, {n_bytes / 1e6:.1f} MB, {n_unique} distinct pre-tokens")

    t0 = time.perf_counter()
    ranks = train_bpe(docs, args.vocab_size, num_proc=args.num_proc)
    seconds = time.perf_counter() - t0

    enc = make_encoding("bench", ranks)
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(docs))
    print(f"train_bpe vocab_size={args.vocab_size}: {seconds:.1f} s "
          f"({n_bytes / n_tokens:.2f} bytes/token on the training text)")


if __name__ == "__main__":
    main()
