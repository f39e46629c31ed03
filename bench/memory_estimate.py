"""The pre-flight memory estimate against measured peaks (trainer/footprint.py, trainer/plan.py).

    python bench/memory_estimate.py [shape ...] [--device cpu|cuda]

Runs each shape as a real training process (data prepared beforehand, so preparation does not
set the peak) and reads two lines of its output: the estimate it printed before starting
(`memory: estimated peak ...`) and the peak it measured (`done: ... peak memory N MiB`: on CPU the
process's peak resident memory, the torch runtime included; on CUDA max_memory_allocated).
The estimate should be within 25% of the measurement.

Shapes: small (configs/small.yaml), classic (configs/classic-cpu.yaml), 124m (configs/gpt2-124m.yaml
with micro-batch 2 at context 1024, a few steps: what a CPU can run), 124m-lora (the same with
rank-16 LoRA adapters: only they train, so gradients and optimizer state are theirs alone).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO, machine, train_run

SHAPES = {
    "small": ("configs/small.yaml", ["train.max_iters=30", "train.eval_interval=10", "train.eval_batches=2"]),
    "classic": ("configs/classic-cpu.yaml", ["train.max_iters=30", "train.eval_interval=10", "train.eval_batches=2"]),
    "124m": ("configs/gpt2-124m.yaml", ["train.batch_size=2", "train.grad_accum=1", "train.max_iters=4",
                                        "train.eval_interval=1000", "train.log_interval=1"]),
    "124m-lora": ("configs/gpt2-124m.yaml", ["lora.rank=16", "train.batch_size=2", "train.grad_accum=1",
                                             "train.max_iters=4", "train.eval_interval=1000", "train.log_interval=1"]),
}


def prepare(config: str, overrides: list[str]):
    """Prepare the shape's data in a process of its own (its memory must not count)."""
    code = ("import sys; from data.prepare import prepare_data; from trainer.config import load_config; "
            "prepare_data(load_config(sys.argv[1], sys.argv[2:]).data, log=lambda *a: None)")
    subprocess.run([sys.executable, "-c", code, str(REPO / config), *overrides], cwd=REPO, check=True)


def main(argv: list[str]):
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    names = [a for a in argv if a in SHAPES] or list(SHAPES)
    print(f"machine: {machine()}")
    print("| shape | command | estimate (GB) | measured peak (GB) | estimate / measured |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        config, overrides = SHAPES[name]
        overrides = [*overrides, f"train.device={device}"]
        prepare(config, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            run = train_run(str(REPO / config), Path(tmp) / "out", *overrides)
        estimate = re.search(r"memory: estimated peak ([\d.]+) GB \(([^)]*)\)", run["stdout"])
        measured = float(re.search(r"peak memory ([\d,]+) MiB", run["stdout"])[1].replace(",", "")) * 2**20 / 1e9
        print(f"| {name} | `python train.py {config} {' '.join(overrides)}` | {estimate[1]} ({estimate[2]}) | "
              f"{measured:.2f} | {float(estimate[1]) / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
