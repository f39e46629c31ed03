"""Run several variants of one config at once and tabulate their val-loss curves.

    python bench/sweep.py SWEEP.yaml [--parallel N] [--out DIR]

SWEEP.yaml: {config: PATH, common: [key=value, ...], runs: {name: [key=value, ...], ...}}.
Each run is a real train.py process; the table shows, per run, the val loss at each
evaluation, the final whole-split val loss, and wall time. Used to tune configs on a fast
machine before timing the chosen ones where they matter.
"""

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from harness import REPO


def run_one(config, name, overrides, out_root):
    out = Path(out_root) / name
    cmd = [sys.executable, str(REPO / "train.py"), config, f"out_dir={out}", "overwrite=true", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return name, wall, None, proc.stderr.strip().splitlines()[-1:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return name, wall, [(r["iter"], r["val_loss"]) for r in rows if r.get("val_loss") is not None], None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", default="/tmp/sweep")
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.sweep).read_text())
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, spec["config"], name, spec.get("common", []) + extra, args.out)
                   for name, extra in spec["runs"].items()]
        for f in futures:
            name, wall, curve, err = f.result()
            if err:
                print(f"{name}: FAILED {err}")
                continue
            points = " ".join(f"{it}:{loss:.3f}" for it, loss in curve)
            print(f"{name}: final {curve[-1][1]:.4f} wall {wall:.0f}s | {points}", flush=True)


if __name__ == "__main__":
    main()
