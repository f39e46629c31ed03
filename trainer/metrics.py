"""Run bookkeeping: the metrics log and the MFU estimate.

`metrics.jsonl` holds one JSON object per line with `iter` and whichever of `train_loss`,
`val_loss`, `lr`, `tokens_per_sec`, `mfu`, `elapsed_s` apply to that line. Lines are appended and
flushed as they happen, so the file is readable while a run is going and survives a crash.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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


class MetricsLog:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **fields):
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()
