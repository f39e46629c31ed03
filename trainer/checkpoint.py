"""One checkpoint format, written so that a crash at any moment never loses the last good one.

A checkpoint is a dict of tensors and plain Python values, loadable with
`torch.load(weights_only=True)` (which refuses pickled code):
    format, model (uncompiled parameter names), optimizer, scaler, config (resolved, as a dict),
    tokenizer (plain-data state), iter, best_val_loss, rng, loader, guard

Files in a run folder: `latest.pt` (the newest), `best.pt` (lowest val loss so far) and, with
`train.keep_last: N`, the newest N as `ckpt-<iter>.pt`.

Design decisions:
- Saving writes `<name>.tmp`, flushes and fsyncs it, renames it into place and fsyncs the folder,
  so `latest.pt` is always either the previous complete checkpoint or the new complete one:
  SIGKILL, power loss or a full disk in the middle of a save leaves the previous one.
- `best.pt` and the history are hard links to the file just written (then renamed into place),
  not second copies: one serialisation per save, no extra disk, and still atomic. Where the
  filesystem has no hard links they are copied.
- torch.save reports a failed write (a full disk) as an opaque RuntimeError from its zip writer,
  so the file it writes through records the OSError underneath and the error names it.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch

from trainer.errors import UserError

FORMAT_VERSION = 1
LATEST, BEST = "latest.pt", "best.pt"
HISTORY = re.compile(r"ckpt-(\d+)\.pt")
REQUIRED = ("model", "config", "tokenizer", "iter")  # what sampling needs; resuming needs TRAINING too
TRAINING = ("optimizer", "scaler", "rng", "loader", "best_val_loss")


class _WriteRecorder:
    """A write-only file that remembers the OSError behind a failed write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def _write_error(path: Path, e: BaseException) -> UserError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return UserError(f"could not write checkpoint {path}: {reason}; the previous checkpoint is untouched")


def save_checkpoint(payload: dict, path: str | Path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            torch.save({"format": FORMAT_VERSION, **payload}, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except RuntimeError:
        if recorder is None or recorder.error is None:
            raise  # not a failed write: a bug, keep its traceback
        tmp.unlink(missing_ok=True)
        raise _write_error(path, recorder.error) from None
    _fsync_dir(path.parent)


def link_checkpoint(src: Path, dst: Path):
    """Make dst the same complete file as src, atomically (a hard link, else a copy)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(dst, e) from None
    _fsync_dir(dst.parent)


def history(folder: Path) -> list[Path]:
    """The ckpt-<iter>.pt files in a run folder, oldest first."""
    found = [(int(m[1]), p) for p in folder.glob("ckpt-*.pt") if (m := HISTORY.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_run_checkpoint(payload: dict, folder: Path, is_best: bool, keep_last: int):
    """latest.pt, plus best.pt when is_best, plus the history trimmed to keep_last files."""
    latest = folder / LATEST
    save_checkpoint(payload, latest)
    if is_best:
        link_checkpoint(latest, folder / BEST)
    if keep_last:
        link_checkpoint(latest, folder / f"ckpt-{payload['iter']:07d}.pt")
        for old in history(folder)[:-keep_last]:
            old.unlink()


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


def load_checkpoint(path: str | Path, map_location="cpu", for_training: bool = False) -> dict:
    path = Path(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut-off one lacks its directory
        raise UserError(f"{path}: corrupt or truncated checkpoint (not a complete torch.save archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming what was refused is the useful one
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise UserError(f"{path}: refused to load: not a plain checkpoint ({culprit[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: not a checkpoint of this trainer (format {FORMAT_VERSION})")
    missing = [k for k in REQUIRED + (TRAINING if for_training else ()) if k not in ckpt]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return ckpt


def load_model_state(model: torch.nn.Module, ckpt: dict, path: str | Path):
    """Load weights, refusing (one line) weights that do not fit the model's architecture."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()  # the first line only says "Error(s) in loading"
        raise UserError(f"{path}: weights do not fit the model's architecture ({detail[:200]})") from None
