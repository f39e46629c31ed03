"""Prepare a corpus: text -> tokenizer -> memory-mapped token shards + meta.json, streaming.

    python -m data.prepare --input PATH [PATH ...] --tokenizer NAME [--out DIR]

Inputs are files, folders, globs and `hf:NAME` datasets (see data/sources.py); tokenizers are
`char`, OpenAI's tiktoken encodings and `bpe`, trained here (see data/tokenizer.py). `train.py`
prepares through the same `prepare` on first use and whenever the inputs or settings change.

Output folder (self-describing; `np.memmap` opens each shard directly, as nanoGPT's train.bin):
    train_000000.bin ...  raw little-endian token ids, uint16 when the vocabulary fits, else
    val_000000.bin ...    uint32; at most `shard_tokens` tokens per shard
    meta.json             format version, tokenizer state, vocab size, dtype, per-split shard
                          list with token counts, document counts, how the split was made, and
                          every source's size and sha256
    bpe.tiktoken          the trained ranks, for `bpe` (the state in meta.json also holds them)

Design decisions:
- Flat memory whatever the corpus size: documents stream in pieces of about 1 MB (text files
  are read in chunks, records one at a time), are grouped into batches of about 1 MB, and at
  most `workers + 2` batches are in flight. Shards go to disk as they fill.
- Encoding runs on every core: batches are encoded on a thread pool, as tiktoken's encoder
  (Rust) and numpy release the GIL; `encode_to_numpy` hands tokens over in one buffer rather
  than a Python int per token. Results are written in submission order, so the output is a
  function of the inputs alone, whatever the number of workers.
- Documents end with the end-of-text token (`<|endoftext|>` for BPE; for `char`, the separator
  character that meta.json records), so the model learns where documents stop.
- The split is by document and deterministic: a document is in val when the first 64 bits of
  the sha256 of its content, as a fraction of 2^64, fall below val_fraction. Adding files never
  moves an old document between splits, and duplicates land together. A corpus of one text file
  (Tiny Shakespeare) is split by position instead, as nanoGPT does: its last val_fraction of
  bytes is val (cut at a character boundary), decided while it streams, before anything is
  encoded, so a tokenizer learnt from the corpus (`bpe`) never sees the val text.
- The `char` tokenizer's vocabulary is the corpus's character set, so it costs one extra,
  cheap pass over the corpus before encoding; `bpe` learns its merges from the first
  `bpe_sample_mb` MB of the train split (the whole split when 0) before encoding.
- Interrupted preps never look complete: a shard is written as `<name>.tmp`, fsynced, then
  renamed; meta.json is removed when a prep starts and written last, atomically. A folder
  without meta.json is incomplete, and the next run deletes its shards and starts over.
- A prepared folder is stale when its fingerprint (format, tokenizer settings, split, text
  field, and every source's sha256) differs from the current one. A source whose path, size and
  modification time match meta.json reuses the recorded sha256, so checking a large corpus on
  every `train.py` start does not re-read it.
- Several processes may prepare the same folder at once (every rank of a distributed run calls
  `prepare`): a lock file serialises them, and the later ones find the folder up to date.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.sources import Source, Utf8Errors, read_records, read_text_pieces, resolve_sources
from data.tokenizer import (CHAR_SEPARATOR, EOT, TIKTOKEN_ENCODINGS, TOKENIZERS, CharTokenizer,
                            TiktokenTokenizer, check_tokenizer_name)
from common.errors import UserError, report_user_errors
from common.files import atomic_write, publish, temporary_path

FORMAT_VERSION = 3  # 3: a one-file corpus is cut by bytes before encoding (BPE learns from train only)
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard: few files, each quick to rewrite
BATCH_CHARS = 1 << 20
_SHARD_FILE = re.compile(r"(train|val)_\d{6}\.bin(\.tmp)?")


def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository when it is not found from here."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p


def tokenizer_label(tokenizer) -> str:
    """A tokenizer's name in folder names and fingerprints: the config name, or for a given
    tokenizer (init_from's) its name and a hash of its whole state, so two bases with different
    vocabularies never share a prepared folder."""
    if isinstance(tokenizer, str):
        return tokenizer
    digest = hashlib.sha256(json.dumps(tokenizer.state(), sort_keys=True).encode()).hexdigest()
    return f"{tokenizer.name}-{digest[:12]}"


def default_prepared_dir(inputs: list[str], tokenizer: str) -> Path:
    first = inputs[0]
    if first.startswith("hf:"):
        name = re.sub(r"[^\w.-]+", "-", first[3:]).strip("-")
    else:
        p = resolve_path(first.split("*")[0].rstrip("/") or ".").resolve()
        name = f"{p.parent.name}-{p.stem}" if p.is_file() else p.name
    if len(inputs) > 1:  # another input list must not share (and keep re-preparing) the folder
        name += "-" + hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:8]
    return REPO_ROOT / "data" / "prepared" / f"{name}-{tokenizer}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def prepare_data(data, log=print, tokenizer=None) -> Path:
    """`prepare` from a config's `data` section (trainer.config.DataConfig); `tokenizer`, when
    given, replaces `data.tokenizer` (init_from's)."""
    return prepare(data.input, tokenizer or data.tokenizer, data.prepared_dir or None, data.val_fraction, log=log,
                   text_field=data.text_field, bpe_vocab_size=data.bpe_vocab_size,
                   bpe_sample_mb=data.bpe_sample_mb, workers=data.prep_workers)


def prepare(inputs: list[str], tokenizer="char", out_dir: str | Path | None = None,
            val_fraction: float = 0.1, log=print, *, text_field: str = "text", bpe_vocab_size: int = 4096,
            bpe_sample_mb: float = 100.0, workers: int = 0, shard_tokens: int = SHARD_TOKENS) -> Path:
    """Prepare `inputs` into `out_dir` unless an up-to-date preparation is already there.
    `tokenizer` is a name (data.tokenizer) or a tokenizer object to encode with as it is."""
    if isinstance(tokenizer, str):
        check_tokenizer_name(tokenizer)
    label = tokenizer_label(tokenizer)
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    sources = resolve_sources(list(inputs), resolve_path, warn=log)
    out_dir = Path(out_dir) if out_dir else default_prepared_dir(list(inputs), label)
    settings = {"tokenizer": label, "val_fraction": val_fraction}
    if any(s.kind != "text" for s in sources):
        settings["text_field"] = text_field
    if tokenizer == "bpe":
        settings.update(bpe_vocab_size=bpe_vocab_size, bpe_sample_mb=bpe_sample_mb)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data.prepared_dir: cannot create {out_dir} ({e.strerror})") from None

    with _locked(out_dir):
        old = read_meta(out_dir)
        fp, described = fingerprint(sources, settings, old)
        if old and old.get("fingerprint") == fp and _is_complete(out_dir, old):
            return out_dir
        reason = "missing" if old is None else "stale (inputs or settings changed)"
        log(f"preparing {', '.join(map(str, inputs))} with the {label} tokenizer into {out_dir} "
            f"(prepared data {reason})")
        if all(s.size == 0 for s in sources):
            raise UserError(f"data.input: the corpus is empty ({', '.join(inputs)})")
        _clear(out_dir, old)
        corpus = Corpus(sources, described, val_fraction, text_field)
        workers = workers or _usable_cpus()
        tok = _build_tokenizer(tokenizer, corpus, bpe_vocab_size, bpe_sample_mb, workers, out_dir, log)
        meta = _encode(corpus, tok, out_dir, workers, shard_tokens, log)
        meta.update(settings=settings, sources=described, fingerprint=fp)
        atomic_write(out_dir / "meta.json", json.dumps(meta, indent=1))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Fingerprint and folder state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(sources: list[Source], settings: dict, previous: dict | None = None) -> tuple[str, list[dict]]:
    known = {d.get("path"): d for d in (previous or {}).get("sources", [])}
    described = []
    for src in sources:
        if src.path is None:  # a streamed dataset: known by name only
            described.append({"name": src.name})
            continue
        st = src.path.stat()
        d = {"path": str(src.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = known.get(d["path"], {})
        same = old.get("bytes") == d["bytes"] and old.get("mtime_ns") == d["mtime_ns"] and "sha256" in old
        d["sha256"] = old["sha256"] if same else _sha256(src.path)
        described.append(d)
    key = json.dumps([FORMAT_VERSION, settings, [d.get("sha256", d.get("name")) for d in described]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest(), described


def _is_complete(out_dir: Path, meta: dict) -> bool:
    if meta.get("format_version") != FORMAT_VERSION:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for shards in meta["splits"].values():
        for shard in shards:
            f = out_dir / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


@contextmanager
def _locked(out_dir: Path):
    with open(out_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear(out_dir: Path, old_meta: dict | None):
    """Remove the previous preparation: meta.json first (the folder is incomplete from here on),
    then the shards it listed and any shard or temporary file of an interrupted prep."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    listed = {s["file"] for shards in (old_meta or {}).get("splits", {}).values() for s in shards}
    for f in out_dir.iterdir():
        if f.name in listed or _SHARD_FILE.fullmatch(f.name):
            f.unlink()


# ---------------------------------------------------------------------------------------------
# The document stream


def content_split(digest: bytes, val_fraction: float) -> str:
    """train or val from a document's sha256: a function of its content alone."""
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


class Corpus:
    """The corpus as a stream of (piece, split, ends_document), re-readable for each pass."""

    def __init__(self, sources: list[Source], described: list[dict], val_fraction: float, text_field: str):
        self.sources, self.described, self.val_fraction, self.text_field = sources, described, val_fraction, text_field
        self.by_position = len(sources) == 1 and sources[0].kind == "text"
        self.total_bytes = sum(s.size for s in sources) if all(s.path for s in sources) else None
        self.utf8 = Utf8Errors()

    def pieces(self, progress=lambda n: None) -> Iterator[tuple[str, str, bool]]:
        self.utf8.by_source.clear()  # each pass counts afresh
        if self.by_position:
            yield from self._split_by_position(progress)
            return
        for src, d in zip(self.sources, self.described):
            if src.kind == "text":
                split = content_split(bytes.fromhex(d["sha256"]), self.val_fraction)
                previous = None  # hold one piece back to know which piece ends the document
                for text in read_text_pieces(src.path, self.utf8, progress):
                    if previous is not None:
                        yield previous, split, False
                    previous = text
                if previous is not None:
                    yield previous, split, True
            else:
                for text in read_records(src, self.text_field, self.utf8, progress):
                    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
                    yield text, content_split(digest, self.val_fraction), True

    def _split_by_position(self, progress) -> Iterator[tuple[str, str, bool]]:
        """The one document's pieces: train up to its last val_fraction of bytes, val after (the
        piece that spans the cut is cut at the character boundary there)."""
        size = self.sources[0].size
        cut = size - int(size * self.val_fraction)
        seen = 0
        for text in read_text_pieces(self.sources[0].path, self.utf8, progress):
            data = text.encode("utf-8", "surrogatepass")
            if seen < cut < seen + len(data):
                head = len(data[:cut - seen].decode("utf-8", "ignore"))  # whole characters before the cut
                yield text[:head], "train", False
                yield text[head:], "val", False
            else:
                yield text, "train" if seen + len(data) <= cut else "val", False
            seen += len(data)

    def progress_bar(self, desc: str):
        return tqdm(total=self.total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    dynamic_ncols=True, disable=None, leave=False)


def _build_tokenizer(name, corpus: Corpus, bpe_vocab_size: int, bpe_sample_mb: float, workers: int,
                     out_dir: Path, log):
    if not isinstance(name, str):  # given, as it is
        return name
    if name in TIKTOKEN_ENCODINGS:
        return TiktokenTokenizer.openai(name)
    if name == "char":
        present = np.zeros(0x110000, dtype=bool)
        with corpus.progress_bar("char vocabulary pass") as bar:
            for text, _, _ in corpus.pieces(bar.update):
                present[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)] = True
        if not present.any():
            raise UserError("data.input: the corpus is empty (no characters)")
        return CharTokenizer.from_code_points(present, None if corpus.by_position else CHAR_SEPARATOR)

    limit = bpe_sample_mb * 1e6 if bpe_sample_mb else float("inf")

    def sample() -> Iterator[str]:
        size = 0
        for text, split, _ in corpus.pieces():
            if split == "train" and text:
                yield text
                size += len(text)
                if size >= limit:
                    return

    t0 = time.perf_counter()
    tok = TiktokenTokenizer.train(sample(), bpe_vocab_size, num_proc=workers, progress=sys.stderr.isatty())
    from data.bpe import save_tiktoken_bpe

    save_tiktoken_bpe(tok.ranks, out_dir / "bpe.tiktoken")
    log(f"trained a {tok.vocab_size}-token BPE in {time.perf_counter() - t0:.1f}s")
    return tok


# ---------------------------------------------------------------------------------------------
# Encoding and writing


class ShardWriter:
    """Appends one split's tokens to shards of at most `shard_tokens`, each written under a
    temporary name and renamed once complete and fsynced."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file, self._count = None, 0

    def _path(self) -> Path:
        return self.out_dir / f"{self.split}_{len(self.shards):06d}.bin"

    def write(self, ids: np.ndarray):
        while len(ids):
            if self._file is None:
                self._file, self._count = open(temporary_path(self._path()), "wb"), 0
            take = min(len(ids), self.shard_tokens - self._count)
            ids[:take].tofile(self._file)
            self._count += take
            ids = ids[take:]
            if self._count == self.shard_tokens:
                self._close()

    def _close(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._path()
        publish(temporary_path(final), final)
        self.shards.append({"file": final.name, "tokens": self._count})
        self._file = None

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self):
        if self._file is not None:
            self._file.close()
            temporary_path(self._path()).unlink(missing_ok=True)
            self._file = None


def _batches(pieces: Iterator[tuple[str, str, bool]], max_chars: int) -> Iterator[list]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_batch(tok, batch: list[tuple[str, str, bool]], eot_id: int | None, dtype: np.dtype):
    out = []
    for text, split, ends_document in batch:
        ids = tok.encode_array(text).astype(dtype)
        if ends_document and eot_id is not None:
            ids = np.append(ids, np.array([eot_id], dtype=dtype))
        out.append((split, ids))
    return out


def _encode(corpus: Corpus, tok, out_dir: Path, workers: int, shard_tokens: int, log) -> dict:
    dtype = token_dtype(tok.vocab_size)
    eot_id = None if corpus.by_position else tok.eot_id
    writers = {split: ShardWriter(out_dir, split, dtype, shard_tokens) for split in ("train", "val")}
    tokens, documents = Counter(), Counter()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(workers) as pool, corpus.progress_bar("tokenizing") as bar:
            pending = deque()

            def drain():
                for split, ids in pending.popleft().result():
                    writers[split].write(ids)
                    tokens[split] += len(ids)
                bar.set_postfix_str(f"{sum(tokens.values()) / (time.perf_counter() - t0):,.0f} tok/s", refresh=False)

            for batch in _batches(corpus.pieces(bar.update), BATCH_CHARS):
                documents.update(split for _, split, ends in batch if ends)
                pending.append(pool.submit(_encode_batch, tok, batch, eot_id, dtype))
                if len(pending) >= workers + 2:  # bounded: memory stays flat
                    drain()
            while pending:
                drain()
        splits = {split: w.finish() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    seconds = time.perf_counter() - t0
    total = sum(tokens.values())
    if total == 0:
        raise UserError("data.input: the corpus is empty (no text in any document)")
    if corpus.utf8.total:
        worst = ", ".join(f"{name}: {n}" for name, n in corpus.utf8.by_source.most_common(3))
        log(f"warning: replaced {corpus.utf8.total} invalid UTF-8 sequences with U+FFFD ({worst})")
    if not corpus.by_position and (not tokens["val"] or not tokens["train"]):
        empty = "val" if not tokens["val"] else "train"
        log(f"warning: the {empty} split is empty: no document of {sum(documents.values())} fell in it "
            f"with val_fraction={corpus.val_fraction}; use more documents or another val_fraction")
    mb = (corpus.total_bytes or 0) / 1e6
    log(f"prepared {total:,} tokens (train {tokens['train']:,}, val {tokens['val']:,}) from "
        + ("1 document split by position" if corpus.by_position else f"{sum(documents.values()):,} documents")
        + f", vocabulary {tok.vocab_size}, {dtype.name}, "
        f"{sum(map(len, splits.values()))} shards; {seconds:.1f}s"
        + (f", {mb / seconds:.1f} MB/s" if mb else "") + f", {total / seconds:,.0f} tokens/s")
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.state(),
        "vocab_size": tok.vocab_size,
        "eot_id": eot_id,
        "document_separator": None if corpus.by_position else (EOT if tok.name != "char" else CHAR_SEPARATOR),
        "dtype": dtype.name,
        "splits": splits,
        "tokens": {"train": tokens["train"], "val": tokens["val"]},
        "documents": None if corpus.by_position else {"train": documents["train"], "val": documents["val"]},
        "split_by": "position" if corpus.by_position else "document",
        "invalid_utf8": dict(corpus.utf8.by_source),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True,
                    help="files, folders, globs (.txt .md .jsonl .jsonl.gz .parquet) or hf:NAME[:SPLIT]")
    ap.add_argument("--tokenizer", default="char", help=f"one of {', '.join(TOKENIZERS)}")
    ap.add_argument("--out", default=None, help="output folder (default data/prepared/<input>-<tokenizer>)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--text-field", default="text", help="the text field of JSONL/Parquet/HF records")
    ap.add_argument("--bpe-vocab-size", type=int, default=4096, help="vocabulary of the trained bpe tokenizer")
    ap.add_argument("--bpe-sample-mb", type=float, default=100.0,
                    help="MB of training text the bpe tokenizer learns from; 0 = all")
    ap.add_argument("--workers", type=int, default=0, help="encoding threads; 0 = all cores")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="most tokens per shard")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        for flag, ok in (("--bpe-vocab-size", args.bpe_vocab_size >= 257), ("--workers", args.workers >= 0),
                         ("--shard-tokens", args.shard_tokens >= 1), ("--bpe-sample-mb", args.bpe_sample_mb >= 0)):
            if not ok:
                raise UserError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))} is out of range")
        out = prepare(args.input, args.tokenizer, args.out, args.val_fraction, text_field=args.text_field,
                      bpe_vocab_size=args.bpe_vocab_size, bpe_sample_mb=args.bpe_sample_mb,
                      workers=args.workers, shard_tokens=args.shard_tokens)
        print(f"ready: {out}")


if __name__ == "__main__":
    sys.exit(main())
