"""The run folder (`out_dir`): claiming it for a fresh run, or reopening it to resume.

A fresh run into a folder that already holds one is refused unless `overwrite=true`, so a
repeated command never destroys a trained model. `resume=true` reloads `latest.pt` and refuses a
config that differs from the checkpoint's, except in keys that cannot change the result or are
knobs one turns exactly when resuming (`RESUME_SAFE_KEYS`), which are allowed and reported.

Resuming rewinds `metrics.jsonl` to the checkpoint's iteration: lines a killed process wrote
after its last checkpoint describe steps that are about to be redone, and keeping them would
show every such step twice. Leftover `*.tmp` files (a save cut short) are removed. Both happen
only once the resume has been accepted, so a refused one leaves the folder as it was.
Writability is probed by creating a file, not by `os.access`, which says yes to root on a
read-only mount.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from trainer.checkpoint import BEST, LATEST, history, load_checkpoint
from trainer.config import Config
from common.errors import UserError
from common.files import atomic_write

METRICS = "metrics.jsonl"
RUN_FILES = (LATEST, BEST, METRICS, "config.yaml")
RESUME_SAFE_KEYS = {
    "train.max_iters", "train.eval_interval", "train.eval_batches", "train.final_eval_tokens", "train.stop_margin",
    "train.log_interval",
    "train.compile", "train.attention", "train.threads", "train.device", "train.stop_at_val_loss", "data.prepared_dir",
    "data.prep_workers", "out_dir", "resume", "overwrite",
    "train.parallel", "train.activation_checkpointing", "train.dist_timeout_s",  # same math, other layout
    "train.ckpt_interval", "train.keep_last", "train.max_time", "train.max_bad_steps", "train.spike_z",
    "train.spike_window", "train.tensorboard", "train.ckpt_time_interval", "train.signal_grace_s",
    "train.memory_check",
}


def claim_out_dir(cfg: Config) -> dict | None:
    """Make out_dir ready for this run; return the checkpoint to resume from, if resuming."""
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out_dir={cfg.out_dir!r}: cannot create it ({e.strerror})") from None
    try:
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"out_dir={cfg.out_dir!r} is not writable ({e.strerror})") from None
    existing = [out / name for name in RUN_FILES if (out / name).exists()] + history(out)
    if cfg.resume:
        if not (out / LATEST).is_file():
            raise UserError(f"resume=true but {out / LATEST} does not exist")
        return load_checkpoint(out / LATEST, for_training=True)
    if existing and not cfg.overwrite:
        raise UserError(f"out_dir={cfg.out_dir!r} already holds a run ({', '.join(p.name for p in existing)}); "
                        f"pass resume=true to continue it or overwrite=true to start over")
    for path in existing:
        path.unlink()
    return None


def rewind_run(out_dir: str, last_iter: int):
    """Once a resume is accepted: drop leftover temporary files, and metrics lines past last_iter
    (and a line torn by a kill), rewriting metrics.jsonl atomically."""
    out = Path(out_dir)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    path = out / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iter"] <= last_iter:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
    atomic_write(path, "".join(kept))


def flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        if isinstance(v, dict):
            items.update(flat(v, f"{prefix}{k}."))
        else:
            items[prefix + k] = v
    return items


def check_resume_config(cfg: Config, ckpt: dict, log=print):
    """Refuse a resume whose config changes anything but the safe keys, or that has nothing left
    to do; log the safe changes."""
    # Through the schema, so a key added since the checkpoint was written reads as its default.
    saved = flat(Config.from_dict(ckpt["config"], source=f"{cfg.out_dir} (checkpoint config)").to_dict())
    wanted = flat(cfg.to_dict())
    if wanted.get("model.vocab_size") == 0:  # unresolved: the checkpoint's resolution stands
        wanted["model.vocab_size"] = saved.get("model.vocab_size")
    changed = sorted(k for k in wanted.keys() | saved.keys() if wanted.get(k) != saved.get(k))
    unsafe = [k for k in changed if k not in RESUME_SAFE_KEYS]
    if "model.arch" in unsafe:  # another family: every model key differs, and only this one matters
        unsafe = ["model.arch"]
    if unsafe:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in unsafe)
        raise UserError(f"cannot resume {cfg.out_dir}: config differs from its checkpoint in {diffs}")
    if ckpt["iter"] >= cfg.train.max_iters:
        raise UserError(f"cannot resume {cfg.out_dir}: it is at iter {ckpt['iter']} and train.max_iters="
                        f"{cfg.train.max_iters}; raise train.max_iters to train further")
    for k in changed:
        if k not in ("resume", "overwrite"):
            log(f"resume: {k} changed from {saved.get(k)!r} to {wanted.get(k)!r}")


def write_config(cfg: Config):
    atomic_write(Path(cfg.out_dir) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
