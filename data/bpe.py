"""Byte-level BPE tokenizer training (GPT-2 style), producing tiktoken encodings.

Design decisions:

- Output format is tiktoken's: ``mergeable_ranks`` maps token bytes to rank, the
  256 single bytes take ranks 0..255 (rank == byte value) and every merge takes
  the next rank. Encoding at run time is then done by tiktoken's Rust core, so a
  trained tokenizer is as fast as GPT-2's. Special tokens are not ranks; they
  take the ids right after the ranks (``make_encoding``).
- Pre-tokenization uses the same split patterns as tiktoken (copied verbatim
  from ``tiktoken_ext.openai_public``) so training sees the same chunks that
  encoding will. They need ``\\p{L}`` and possessive quantifiers, which the
  standard ``re`` module lacks; the ``regex`` package supports both and is a
  hard dependency of tiktoken, so no fallback is needed.
- Special tokens are cut out of the text before pre-tokenization, so no merge
  ever learns a piece of ``<|endoftext|>``.
- Training runs on unique pre-tokens ("words") with their counts, not on the
  corpus: natural text has few distinct words, so this shrinks the work by
  orders of magnitude. Counting is the only pass over the raw text and is
  spread over processes when the input is large.
- Merging keeps incremental state: pair -> count, pair -> indices of words that
  contain it, and a max-heap of pairs. A merge only rewrites the words holding
  the chosen pair. Heap entries are invalidated lazily: when a popped entry's
  count is out of date it is pushed back with the current count. Existing
  pairs only ever lose count, and pairs gaining count all contain the new
  token and are pushed after each merge, so the heap always holds an entry at
  least as large as every pair's true count and the first up-to-date entry
  popped is the true best pair.
- Ties between equally frequent pairs go to the lowest (left bytes, right
  bytes), which makes the ranks a pure function of the word counts: the same
  input always gives the same tokenizer, whatever the process count or order.
- Every merge yields bytes that are not yet a token, so ranks stay unique, as
  tiktoken requires: a span that is a whole number of tokens is split as it
  would be on its own, so wherever the bytes of an earlier merge (L, R) occur
  as whole tokens they were already merged into one token at that step and
  cannot reappear as another pair.
"""

import base64
import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from multiprocessing import get_context

import regex
import tiktoken
from tqdm import tqdm

from common.files import atomic_write

GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# cl100k: case-insensitive contractions, digits in groups of at most 3, and
# newlines kept apart from other whitespace; compresses code and numbers better.
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)

# Characters of text per counting task: large enough that pickling and the
# Counter merge are negligible next to the regex work, small enough to balance.
_BATCH_CHARS = 1 << 20


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    progress: bool = False,
    num_proc: int | None = None,
) -> dict[bytes, int]:
    """Learn byte-level BPE ranks from ``texts``.

    Each text is pre-tokenized on its own, exactly as it would be encoded, so
    pass documents rather than arbitrary slices. ``vocab_size`` includes the
    special tokens, which are not in the returned ranks. ``num_proc`` caps the
    counting processes (default: all CPUs; inputs under one batch stay in
    process).
    """
    special_tokens = tuple(special_tokens)
    n_ranks = vocab_size - len(special_tokens)
    if n_ranks < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 byte tokens "
                         f"and {len(special_tokens)} special tokens")
    if isinstance(texts, str):  # a lone string would otherwise iterate as characters
        texts = [texts]
    word_counts = _count_words(texts, pattern, special_tokens, num_proc or os.cpu_count() or 1, progress)
    return _learn_merges(word_counts, n_ranks, progress)


def _count_words(texts: Iterable[str], pattern: str, special_tokens: tuple[str, ...],
                 num_proc: int, progress: bool) -> Counter[bytes]:
    batches = _batched_by_size(texts, _BATCH_CHARS)
    head = list(islice(batches, 2))  # one batch or less is not worth starting processes
    jobs = ((batch, pattern, special_tokens) for batch in chain(head, batches))

    counts: Counter[str] = Counter()
    with tqdm(desc="counting words", unit="batch", disable=not progress) as bar:
        if len(head) < 2 or num_proc == 1:
            for job in jobs:
                counts.update(_count_batch(job))
                bar.update()
        else:
            with get_context().Pool(num_proc) as pool:
                for batch_counts in pool.imap_unordered(_count_batch, jobs):
                    counts.update(batch_counts)
                    bar.update()
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def _batched_by_size(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _count_batch(job: tuple[list[str], str, tuple[str, ...]]) -> Counter[str]:
    texts, pattern, special_tokens = job
    split = regex.compile(pattern)
    special = regex.compile("|".join(map(regex.escape, special_tokens))) if special_tokens else None
    counts: Counter[str] = Counter()
    for text in texts:
        for part in special.split(text) if special else (text,):
            counts.update(split.findall(part))
    return counts


def _learn_merges(word_counts: Counter[bytes], n_ranks: int, progress: bool) -> dict[bytes, int]:
    vocab = [bytes([b]) for b in range(256)]  # token id == rank
    ranks = {token: rank for rank, token in enumerate(vocab)}

    # Single-byte words hold no pair and can never change.
    kept = [(word, n) for word, n in word_counts.items() if len(word) > 1]
    words = [list(word) for word, _ in kept]
    counts = [n for _, n in kept]
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    # Indices are only ever added; a word that lost the pair is detected when
    # merging it changes nothing, which is cheaper than keeping the sets exact.
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (word, n) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += n
            where[pair].add(i)

    heap = [(-n, vocab[a], vocab[b], (a, b)) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)

    with tqdm(total=n_ranks, initial=len(vocab), desc="merging", unit="tok", disable=not progress) as bar:
        while len(vocab) < n_ranks:
            if not heap:
                raise ValueError(f"corpus too small: only {len(vocab)} of {n_ranks} ranks learnable")
            neg_count, left, right, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg_count:
                if count > 0:
                    heapq.heappush(heap, (-count, left, right, pair))
                continue

            new_id = len(vocab)
            vocab.append(left + right)
            ranks[left + right] = new_id
            bar.update()

            grown = set()
            for i in where.pop(pair):
                old = words[i]
                new = _merge(old, pair, new_id)
                if len(new) == len(old):
                    continue
                n = counts[i]
                for p in zip(old, old[1:]):
                    pair_counts[p] -= n
                for p in zip(new, new[1:]):
                    pair_counts[p] += n
                    if new_id in p:
                        where[p].add(i)
                        grown.add(p)
                words[i] = new
            del pair_counts[pair]
            for p in grown:
                heapq.heappush(heap, (-pair_counts[p], vocab[p[0]], vocab[p[1]], p))
    return ranks


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    a, b = pair
    out = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """tiktoken's ranks-file format, ``base64(token) rank`` per line, as one string."""
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda item: item[1]))


def ranks_from_text(text: str) -> dict[bytes, int]:
    ranks = {}
    for line in text.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def save_tiktoken_bpe(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``ranks`` in tiktoken's format (``base64(token) rank`` per line), atomically."""
    atomic_write(path, ranks_to_text(ranks))


def load_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file.

    Not ``tiktoken.load.load_tiktoken_bpe``: it caches contents keyed by the
    path string, so a file retrained in place would load stale ranks.
    """
    with open(path, encoding="ascii") as f:
        return ranks_from_text(f.read())


def make_encoding(
    name: str,
    ranks: dict[bytes, int],
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
) -> tiktoken.Encoding:
    """Build a tiktoken Encoding; special tokens get ids ``len(ranks)``, ``len(ranks) + 1``, ..."""
    special = {token: len(ranks) + i for i, token in enumerate(special_tokens)}
    return tiktoken.Encoding(
        name,
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens=special,
        # Makes tiktoken check that ranks and special ids are contiguous.
        explicit_n_vocab=len(ranks) + len(special),
    )
