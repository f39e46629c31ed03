"""One checkpoint format, written so that a crash at any moment never loses the last good one.

A checkpoint is a flat dict of tensors and plain Python values, loadable with
`torch.load(weights_only=True)` (which refuses pickled code). Its contents are assembled in one
place, `trainer/state.py`'s `TrainingState`; other tools read the top-level `model` (weights,
uncompiled names), `config` (resolved, as a dict), `tokenizer` (plain-data state) and `iter`.
`load_model` here rebuilds a model and its tokenizer from a checkpoint alone, for every tool
that only needs the weights (sampling, evaluation, serving, conversion): it maps the file into
memory and reads just the model's tensors, never the optimizer state.

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

from common.errors import UserError
from common.files import atomic_file, publish, temporary_path

FORMAT_VERSION = 1
LATEST, BEST = "latest.pt", "best.pt"
HISTORY = re.compile(r"ckpt-(\d+)\.pt")
REQUIRED = ("model", "config", "tokenizer", "iter")  # what sampling needs; resuming needs TRAINING too
TRAINING = ("rng", "best_val_loss")  # and the parts the family has (trainer/state.py)


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


def _write_error(path: Path, e: BaseException) -> UserError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return UserError(f"could not write checkpoint {path}: {reason}; the previous checkpoint is untouched")


def save_checkpoint(payload: dict, path: str | Path):
    path = Path(path)
    recorder = None
    try:
        with atomic_file(path) as f:
            recorder = _WriteRecorder(f)
            torch.save({"format": FORMAT_VERSION, **payload}, recorder)
    except OSError as e:
        raise _write_error(path, e) from None
    except RuntimeError:
        if recorder is None or recorder.error is None:
            raise  # not a failed write: a bug, keep its traceback
        raise _write_error(path, recorder.error) from None


def link_checkpoint(src: Path, dst: Path):
    """Make dst the same complete file as src, atomically (a hard link, else a copy)."""
    tmp = temporary_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        publish(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(dst, e) from None


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


def load_checkpoint(path: str | Path, map_location="cpu", for_training: bool = False, mmap: bool = False) -> dict:
    """The checkpoint's dict. mmap=True maps the file instead of reading it: tensors are read
    when touched, so a caller that needs only the weights never reads the optimizer state."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut-off one lacks its directory
        raise UserError(f"{path}: corrupt or truncated checkpoint (not a complete torch.save archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    if missing and "converted_from" in ckpt and all(k in ckpt for k in REQUIRED):
        raise UserError(f"{path}: a model imported from {ckpt['converted_from']} has no training state to resume; "
                        f"start a run from it with init_from={path.parent}")
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


def load_model(ckpt_path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode on device, tokenizer, config, checkpoint path) from a run folder (its
    best.pt, else latest.pt) or a checkpoint file. Only the weights are read."""
    from data.tokenizer import from_state
    from model import build_model
    from trainer.config import Config

    path = find_checkpoint(ckpt_path)
    ckpt = load_checkpoint(path, mmap=True)
    cfg = Config.from_dict(ckpt["config"], source=f"{path} (config)")
    tokenizer = from_state(ckpt["tokenizer"])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"{path}: its tokenizer ({tokenizer.vocab_size} tokens) does not fit its model "
                        f"(model.vocab_size={cfg.model.vocab_size}); the checkpoint mixes two runs")
    model = build_model(cfg.model)
    load_model_state(model, ckpt, path)
    return model.to(device).eval(), tokenizer, cfg, path
