"""Shared helpers for the benchmarks: run a training config as a real process and read its
metrics, and describe the machine a figure was measured on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}{gpu}"


def train_run(config: str, out_dir: Path, *overrides: str) -> dict:
    """Run train.py as a subprocess; return wall time and the parsed metrics rows."""
    cmd = [sys.executable, str(REPO / "train.py"), config, f"out_dir={out_dir}", "overwrite=true", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "rows": rows, "stdout": proc.stdout, "stderr": proc.stderr}


def run_repo(cmd: list[str], log) -> float:
    """Run a repo command (`python` + cmd, printed first through log) from the repo root; exits
    with its stderr's tail if it fails; returns its wall time in seconds."""
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0
