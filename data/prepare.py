"""Prepare a corpus: text files -> tokenizer -> memory-mapped token arrays + meta.json.

    python -m data.prepare --input data/tinyshakespeare/input.txt --tokenizer char --out data/prepared/x

Output folder (self-describing; `np.memmap` opens each array directly, as nanoGPT's train.bin):
    train.bin, val.bin   raw little-endian token ids, uint16 when the vocabulary fits, else uint32
    meta.json            format version, tokenizer state, vocab size, dtype, per-split shard list
                         with token counts, and the sources' sizes and sha256

Design decisions:
- meta.json is written last and atomically, so a folder with a meta.json is complete; an
  interrupted prep leaves no meta and is simply redone.
- A prepared folder is stale when its fingerprint (format version, tokenizer, split fraction and
  every source's sha256) differs from the current inputs'. `train.py` checks this on every start
  and re-prepares, saying so; hashing is cheap next to tokenizing.
- The split is by position: the first (1 - val_fraction) of the token stream trains, the rest
  validates, as nanoGPT does for a single document such as Tiny Shakespeare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from data.tokenizer import TOKENIZERS, build_tokenizer
from trainer.errors import UserError, report_user_errors

FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository when it is not found from here."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p


def default_prepared_dir(inputs: list[str], tokenizer: str) -> Path:
    first = resolve_path(inputs[0]).resolve()
    return REPO_ROOT / "data" / "prepared" / f"{first.parent.name}-{first.stem}-{tokenizer}"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _sources(inputs: list[str]) -> list[Path]:
    paths = [resolve_path(p) for p in inputs]
    for given, p in zip(inputs, paths):
        if not p.is_file():
            raise UserError(f"data.input: no such file: {given}")
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(sources: list[Path], tokenizer: str, val_fraction: float) -> tuple[str, list[dict]]:
    described = [{"path": str(p), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sources]
    key = json.dumps([FORMAT_VERSION, tokenizer, val_fraction, [d["sha256"] for d in described]])
    return hashlib.sha256(key.encode()).hexdigest(), described


def read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for shards in meta["splits"].values():
        for shard in shards:
            f = out_dir / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(inputs: list[str], tokenizer: str, out_dir: str | Path | None = None,
            val_fraction: float = 0.1, log=print) -> Path:
    """Prepare `inputs` into `out_dir` unless an up-to-date preparation is already there."""
    if tokenizer not in TOKENIZERS:
        raise UserError(f"data.tokenizer={tokenizer!r} is not one of: {', '.join(TOKENIZERS)}")
    sources = _sources(inputs)
    out_dir = Path(out_dir) if out_dir else default_prepared_dir(inputs, tokenizer)
    fp, described = fingerprint(sources, tokenizer, val_fraction)
    meta = read_meta(out_dir)
    if meta and meta.get("fingerprint") == fp and _is_complete(out_dir, meta):
        return out_dir
    reason = "missing" if meta is None else "stale (inputs or settings changed)"
    log(f"preparing {', '.join(map(str, inputs))} with the {tokenizer} tokenizer into {out_dir} "
        f"(prepared data {reason})")

    raw = b"".join(p.read_bytes() for p in sources)
    text = raw.decode("utf-8", errors="replace")
    if not text:
        raise UserError(f"data.input: the corpus is empty ({', '.join(inputs)})")
    tok = build_tokenizer(tokenizer, text)
    ids = tok.encode_array(text)
    dtype = token_dtype(tok.vocab_size)
    n_val = int(len(ids) * val_fraction)
    splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val:]}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until meta returns
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.state(),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "splits": {},
        "val_fraction": val_fraction,
        "sources": described,
        "fingerprint": fp,
    }
    for split, arr in splits.items():
        _write_atomic(out_dir / f"{split}.bin", arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
        meta["splits"][split] = [{"file": f"{split}.bin", "tokens": int(len(arr))}]
    _write_atomic(out_dir / "meta.json", json.dumps(meta, indent=1).encode())
    log(f"prepared {len(ids):,} tokens (train {len(splits['train']):,}, val {len(splits['val']):,}), "
        f"vocabulary {tok.vocab_size}, {meta['dtype']}")
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="text files")
    ap.add_argument("--tokenizer", default="char", help=f"one of {', '.join(TOKENIZERS)}")
    ap.add_argument("--out", default=None, help="output folder (default data/prepared/<folder>-<file>-<tokenizer>)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        if not 0 < args.val_fraction < 1:
            raise UserError(f"--val-fraction={args.val_fraction} must be in (0, 1)")
        out = prepare(args.input, args.tokenizer, args.out, args.val_fraction)
        print(f"ready: {out}")


if __name__ == "__main__":
    sys.exit(main())
