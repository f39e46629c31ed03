"""Run bookkeeping: the metrics log and the MFU estimate.

`metrics.jsonl` holds one JSON object per line with `iter` and whichever of `train_loss`,
`val_loss`, `val_bpb`, `lr`, `tokens_per_sec`, `mfu`, `elapsed_s`, `tokens` (seen so far) apply to
that line; each training process starts with a line holding `num_params`. Lines are appended and
flushed as they happen, so the file is readable while a run is going and survives a crash.
trainer/runs.py reads it back (compare.py).

`train.tensorboard: true` also writes the scalars to `out_dir/tensorboard` (the optional
`tensorboard` package, through torch.utils.tensorboard), flushed with each line for the same
reasons. The writer marks the step after the one the process starts from (`purge_step`), so
TensorBoard hides what an earlier process logged from there on: the steps a resume redoes, or an
overwritten run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from common.errors import UserError

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity). Matched
# by substring of torch.cuda.get_device_name(); first match wins, so longer names come first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12),
    ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A6000", 155e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of this device, or None where unknown (CPU, MPS, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def format_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


# The metrics.jsonl fields that are also TensorBoard scalars.
SCALARS = ("train_loss", "val_loss", "val_bpb", "lr", "tokens_per_sec", "mfu")


class MetricsLog:
    def __init__(self, path: Path, tensorboard: bool = False, start_iter: int = 0):
        # The writer first: a missing package stops the run before the log file exists.
        self.board = tensorboard_writer(path.parent / "tensorboard", start_iter) if tensorboard else None
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **fields):
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.board is not None:
            for key in SCALARS:
                # An evaluation line's train_loss repeats the interval's mean at a step already logged.
                if clean.get(key) is not None and not (key == "train_loss" and "val_loss" in clean):
                    self.board.add_scalar(key, clean[key], global_step=clean["iter"])
            self.board.flush()

    def close(self):
        self.file.close()
        if self.board is not None:
            self.board.close()


def tensorboard_writer(folder: Path, start_iter: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('train.tensorboard=true needs the tensorboard package: '
                        'pip install -e ".[tensorboard]"') from None
    return SummaryWriter(str(folder), purge_step=start_iter + 1)  # the start step itself was logged before
