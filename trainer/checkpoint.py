"""One checkpoint format, written so that a crash at any moment never loses the last good one.

A checkpoint is a dict of tensors and plain Python values, loadable with
`torch.load(weights_only=True)` (which refuses pickled code):
    format, model (uncompiled parameter names), optimizer, scaler, config (resolved, as a dict),
    tokenizer (plain-data state), iter, best_val_loss, rng, loader

Files in a run folder: `latest.pt` (the newest), `best.pt` (lowest val loss so far).
Saving writes `<name>.tmp`, flushes and fsyncs it, renames it into place and fsyncs the folder,
so `latest.pt` is always either the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from trainer.errors import UserError

FORMAT_VERSION = 1
LATEST, BEST = "latest.pt", "best.pt"


def save_checkpoint(payload: dict, path: str | Path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; "
                        f"the previous checkpoint is untouched") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def find_checkpoint(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file, or the preferred one (then latest.pt) inside a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in dict.fromkeys((prefer, LATEST, BEST)):
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint in {path} (expected {LATEST} or {BEST})")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        raise UserError(f"{path}: corrupt or truncated checkpoint (not a torch archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" ({culprit.group(1)})" if culprit else ""
        raise UserError(f"{path}: refused to load: it holds objects other than tensors and plain data{what}, "
                        f"which could run code") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "model" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this trainer (format {FORMAT_VERSION})")
    return ckpt
