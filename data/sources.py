"""Reading a corpus: input paths -> sources -> a stream of documents, in bounded pieces.

An input is a file, a directory (read recursively, in sorted order, hidden entries skipped), a
glob (`data/**/*.jsonl`), or `hf:NAME[:SPLIT]` for a Hugging Face dataset. Formats by name:
- `.txt`, `.md` (and any other file that is not binary): one file is one document.
- `.jsonl`, `.jsonl.gz`: one JSON object per line; its `text_field` is a document.
- `.parquet` (needs the optional `pyarrow`): the `text_field` column, one row per document.
- `hf:NAME`: streamed with the optional `datasets` package; needs the network.

Design decisions:
- Memory stays flat whatever the corpus size: a text file is read in `CHUNK_BYTES` chunks and
  yielded as pieces of one document; records are yielded one at a time. A piece ends after a
  newline that sits between two non-space characters, where GPT-style pre-tokenization cuts
  anyway, so encoding pieces gives the tokens encoding the whole file would. Text without such
  a newline is cut at the last whitespace, or anywhere in a long run of none: the tokens may
  then differ slightly at the cut, and decoding still gives the text back exactly.
- Invalid UTF-8 is replaced with U+FFFD, never fatal; every replacement is counted per file so
  prep can report it.
- A file found inside a directory that looks binary (a NUL byte in its first 8 KiB, or a
  compressed format other than `.jsonl.gz`) is skipped with a warning; a binary file named
  explicitly is an error, since the user asked for it.
- Bad records stop prep with the file and line: a JSONL line that is not JSON, is not an object,
  or lacks the text field. Silently dropping them would train on less than the user thinks.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

CHUNK_BYTES = 1 << 20
HF_PREFIX = "hf:"
BINARY_SUFFIXES = (".gz", ".zip", ".bz2", ".xz", ".zst", ".7z", ".tar", ".png", ".jpg", ".jpeg", ".gif",
                   ".pdf", ".bin", ".npy", ".pt", ".pyc", ".so", ".exe")
_CUT_SEARCH = 1 << 16  # look for a safe cut in the last 64 Ki characters of a piece


@dataclass(frozen=True)
class Source:
    kind: str  # text | jsonl | parquet | hf
    path: Path | None  # None for hf
    name: str  # as shown to the user: a path, or hf:NAME[:SPLIT]

    @property
    def size(self) -> int | None:
        return self.path.stat().st_size if self.path else None


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def looks_binary(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(BINARY_SUFFIXES) and not name.endswith(".jsonl.gz"):
        return True
    if _kind_of(path) != "text":
        return False
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def resolve_sources(inputs: list[str], resolve_path: Callable[[str], Path], warn=print) -> list[Source]:
    """Expand files, directories, globs and hf: names into sources, in order, each once."""
    sources, seen = [], set()

    def add(path: Path, explicit: bool, given: str):
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        if looks_binary(path):
            if explicit:
                raise UserError(f"data.input: {given} looks binary (not text, JSONL or Parquet)")
            warn(f"warning: skipping {path}: looks binary")
            return
        sources.append(Source(_kind_of(path), path, str(path)))

    for given in inputs:
        if given.startswith(HF_PREFIX):
            sources.append(Source("hf", None, given))
            continue
        if any(c in given for c in "*?["):  # a glob
            matches = sorted(glob.glob(str(Path(given).expanduser()), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise UserError(f"data.input: no file matches {given}")
            for f in files:
                add(f, False, given)
            continue
        path = resolve_path(given)
        if path.is_file():
            add(path, True, given)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise UserError(f"data.input: the folder {given} holds no files")
            for f in files:
                add(f, False, given)
        else:
            raise UserError(f"data.input: no such file or folder: {given}")
    if not sources:
        raise UserError(f"data.input: no text found in {', '.join(inputs)} (every file was skipped)")
    return sources


class Utf8Errors:
    """Counts invalid UTF-8 sequences replaced with U+FFFD, per source."""

    def __init__(self):
        self.by_source: Counter[str] = Counter()
        self._current = ""
        codecs.register_error("gpt_trainer_count", self._handle)

    def _handle(self, err: UnicodeDecodeError):
        self.by_source[self._current] += 1
        return "\ufffd", err.end

    def decoder(self, source_name: str):
        self._current = source_name
        return codecs.getincrementaldecoder("utf-8")(errors="gpt_trainer_count")

    def decode(self, data: bytes, source_name: str) -> str:
        self._current = source_name
        return data.decode("utf-8", errors="gpt_trainer_count")

    @property
    def total(self) -> int:
        return sum(self.by_source.values())


def read_text_pieces(path: Path, utf8: Utf8Errors,
                     progress: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """Yield a text file in pieces of about CHUNK_BYTES, cut where `_safe_cut` says."""
    decoder = utf8.decoder(str(path))
    carry = ""
    with open(path, "rb") as f:
        while data := f.read(CHUNK_BYTES):
            progress(len(data))
            text = carry + decoder.decode(data)
            cut = _safe_cut(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]
    if text := carry + decoder.decode(b"", final=True):
        yield text


def _safe_cut(text: str) -> int:
    """Where to end a piece: just after the last newline between two non-space characters in
    the last _CUT_SEARCH characters (where pre-tokenization cuts anyway); failing that, after the
    last newline or space; failing that (a long run with no whitespace), at the end."""
    stop = max(len(text) - _CUT_SEARCH, 1)
    p = text.rfind("\n", stop, len(text) - 1)
    while p > 0:
        if not text[p - 1].isspace() and not text[p + 1].isspace():
            return p + 1
        p = text.rfind("\n", stop, p)
    return max(text.rfind("\n"), text.rfind(" ")) + 1 or len(text)


def read_records(source: Source, text_field: str, utf8: Utf8Errors,
                 progress: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """Yield one document per record of a JSONL, Parquet or Hugging Face source."""
    if source.kind == "jsonl":
        yield from _read_jsonl(source.path, text_field, utf8, progress)
    elif source.kind == "parquet":
        yield from _read_parquet(source.path, text_field, progress)
    elif source.kind == "hf":
        yield from _read_hf(source.name, text_field, progress)
    else:
        raise ValueError(f"not a record source: {source}")


def read_jsonl(path: Path, utf8: Utf8Errors, progress=lambda n: None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a .jsonl or .jsonl.gz file."""
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        last_pos = 0
        try:
            for lineno, line in enumerate(f, 1):
                if lineno % 1024 == 0:
                    progress(raw.tell() - last_pos)
                    last_pos = raw.tell()
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(utf8.decode(line, str(path)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz
            raise UserError(f"{path}: cannot read ({e})") from None
        progress(raw.tell() - last_pos)


def _read_jsonl(path: Path, text_field: str, utf8: Utf8Errors, progress) -> Iterator[str]:
    for lineno, record in read_jsonl(path, utf8, progress):
        if not isinstance(record, dict) or text_field not in record:
            found = f"keys: {', '.join(list(record)[:8])}" if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{lineno}: no {text_field!r} field ({found}); "
                            f"set the field with --text-field / data.text_field")
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not text")
        yield text


def _read_parquet(path: Path, text_field: str, progress) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs the optional pyarrow package "
                        f"(pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names[:8])}); "
                        f"set it with --text-field / data.text_field")
    size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):  # bounded, whatever the row groups
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}: row {row}: column {text_field!r} is not text")
            if text:
                yield text
        progress(size * batch.num_rows // rows)


def _read_hf(name: str, text_field: str, progress) -> Iterator[str]:
    dataset, _, split = name[len(HF_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.input: {name} needs the optional datasets package (pip install datasets)") from None
    try:
        stream = datasets.load_dataset(dataset, split=split or "train", streaming=True)
        for i, record in enumerate(stream):
            if text_field not in record:
                raise UserError(f"{name}: record {i} has no {text_field!r} field (keys: {', '.join(list(record)[:8])}); "
                                f"set it with --text-field / data.text_field")
            if record[text_field]:
                progress(len(record[text_field]))  # characters, for the MB/s of the progress bar
                yield record[text_field]
    except UserError:
        raise
    except Exception as e:  # offline, unknown dataset, gated dataset: many exception types
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"data.input: cannot stream the Hugging Face dataset {dataset!r} "
                        f"({type(e).__name__}: {first_line}); it needs the network") from None
