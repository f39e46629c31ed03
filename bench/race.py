"""The CPU race as a user runs it: whole commands, from start to exit, in fresh folders.

    python bench/race.py [--rounds 3] [--target 1.88]

- This trainer: `python train.py configs/speedrun-cpu.yaml` in a fresh clone of this
  repository's HEAD (commit first: uncommitted changes are not in a clone), so the data is
  prepared, every module is imported and every evaluation runs inside the timed command. It
  stops at the first full evaluation (the whole val split) at or below the target; the periodic
  estimates in between cover a fixed sample of val windows (`train.eval_batches`) and trigger
  the full check when within `train.stop_margin`.
- nanoGPT's documented CPU run, both of its commands (`data/shakespeare_char/prepare.py`, then
  `train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
  --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
  --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`), as re-implemented in
  bench/nanogpt_cpu.py, in a fresh folder holding Tiny Shakespeare's input.txt: 2,001 steps and
  nine evaluations of 20 train and 20 val batches, to about 1.88-1.89 (its 20-batch estimate).

The two alternate, and the order flips every round (the shared machine's speed drifts from
minute to minute); each round's ratio is taken between its two neighbouring runs, and the
median round is reported. Cloning and copying are not timed.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages first (its common/)
from bench.harness import REPO, machine  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def ours(tmp: Path, target: float) -> dict:
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    wall, log = timed([sys.executable, "train.py", "configs/speedrun-cpu.yaml"], clone)
    rows = [json.loads(line) for line in (clone / "out/speedrun-cpu/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    stop = evals[-1]
    whole = f"val loss {stop['val_loss']:.4f} (whole val split) <= train.stop_at_val_loss={target}: stopping" in log
    done = re.search(r"done: .* in ([\d.]+)s", log)
    return {"wall_s": wall, "iter": stop["iter"], "val": stop["val_loss"], "val_tokens": stop["val_tokens"],
            "reached": whole and stop["val_loss"] <= target, "evaluations": len(evals),
            "full_evaluations": log.count("whole val split,"), "train_time_s": stop["train_time_s"],
            "loop_s": float(done[1]) if done else float("nan"), "peak_mem_mb": stop.get("peak_mem_mb"),
            "checks": ", ".join(f"iter {r['iter']}: estimate {r['val_estimate']:.4f}, whole split {r['val_loss']:.4f}"
                                for r in evals if "val_estimate" in r)}


def nanogpt(tmp: Path) -> dict:
    folder = tmp / "nanogpt"
    folder.mkdir()
    shutil.copy(REPO / "bench/nanogpt_cpu.py", folder)
    shutil.copy(REPO / "data/tinyshakespeare/input.txt", folder)
    prep_s, _ = timed([sys.executable, "nanogpt_cpu.py", "prepare"], folder)
    train_s, log = timed([sys.executable, "nanogpt_cpu.py", "train"], folder)
    last = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", log)[-1]
    return {"wall_s": prep_s + train_s, "prep_s": prep_s, "iter": int(last[0]), "val": float(last[2])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", type=float, default=1.88, help="configs/speedrun-cpu.yaml's stop_at_val_loss")
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    print(f"machine: {machine()}; this trainer at {head.strip()}")
    ratios = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"ours": lambda: ours(Path(tmp), args.target), "nanogpt": lambda: nanogpt(Path(tmp))}
            res = {name: runs[name]() for name in (["ours", "nanogpt"] if r % 2 == 0 else ["nanogpt", "ours"])}
        a, b = res["ours"], res["nanogpt"]
        ratios.append(a["wall_s"] / b["wall_s"])
        status = "reached" if a["reached"] else "NOT reached"
        print(f"round {r + 1}: speedrun {a['wall_s']:.1f} s ({status} at iter {a['iter']}: val {a['val']:.4f} over "
              f"{a['val_tokens']:,} tokens; training {a['train_time_s']:.1f} s, loop {a['loop_s']:.1f} s, "
              f"{a['evaluations']} evaluations of which {a['full_evaluations']} full; peak {a['peak_mem_mb']} MB) | "
              f"nanoGPT-equivalent {b['wall_s']:.1f} s (prepare {b['prep_s']:.1f} s; iter {b['iter']}, "
              f"20-batch val {b['val']:.4f}) | ratio {ratios[-1]:.3f}", flush=True)
        print(f"  stop checks: {a['checks']}", flush=True)
    print(f"whole-command time, speedrun / nanoGPT-equivalent: {statistics.median(ratios):.3f} (median of "
          f"{len(ratios)} rounds; rounds {min(ratios):.3f}-{max(ratios):.3f}; target <= 0.40)")


if __name__ == "__main__":
    main()
