"""Muon's choices, measured: the fused QKV matrix whole or as three, and batched Newton-Schulz.

    python bench/muon.py qkv [--seeds 1337 1338] [--configs configs/speedrun-cpu.yaml configs/small.yaml]
    python bench/muon.py step [--configs ...] [--rounds 30] [--threads 2]

qkv: the attention's c_attn weight stacks W_q, W_k and W_v, shape (3C, C). This trainer's Muon
orthogonalises the three blocks separately, as modded-nanogpt does (each block's update then
has unit singular values of its own, instead of sharing one spectrum with the other two), each
at the scale of its own shape; the alternative orthogonalises the stack as one matrix (this
trainer's choice before the measurement in bench/RESULTS.md). Each config trains to its
max_iters with no early stop, once per variant and seed, and the final val loss over the whole
val split is compared at equal steps. The one-matrix variant runs train.py with the model's
`row_blocks()` emptied; nothing else changes.

step: the time to orthogonalise one step's updates of a config's hidden matrices, the way
trainer/muon.py does it (same-shaped matrices as one batch, c_attn as its three blocks, fused
multiply-adds) against one matrix (or block) at a time with separate ops (its previous code),
alternating in one process, median of the rounds; with the largest difference between the two
results.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages first (its common/)
from bench.harness import REPO, machine  # noqa: E402

ONE_MATRIX_TRAIN = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})  # this checkout's packages, not an installed copy's
    from model.gpt import GPT

    GPT.row_blocks = lambda self: {{}}  # c_attn orthogonalised as one (3C, C) matrix
    sys.argv = sys.argv[1:]
    import train
    train.main()
""")


def final_val(script: list[str], config: str, seed: int, tmp: Path) -> float:
    out = tmp / "out"
    cmd = [sys.executable, *script, config, f"out_dir={out}", "overwrite=true", f"train.seed={seed}",
           "train.stop_at_val_loss=0", f"data.prepared_dir={tmp}/prep"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r][-1]["val_loss"]


def one_at_a_time(G, steps=5):
    """trainer/muon.py's Newton-Schulz before batching: one matrix, separate ops."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.mT if G.size(0) > G.size(1) else G
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if G.size(0) > G.size(1) else X


def step_times(config: str, rounds: int, threads: int):
    import torch

    from model import build_model
    from trainer.config import load_config
    from trainer.muon import Muon

    torch.set_num_threads(threads)
    cfg = load_config(str(REPO / config), ["model.vocab_size=65"])
    model = build_model(cfg.model)
    matrices, blocks = model.param_groups()["matrix"], model.row_blocks()  # c_attn as its three maps
    updates = [torch.randn_like(p) for p in matrices]
    muon = Muon(matrices, row_blocks=blocks)

    def separately():
        return [torch.cat([one_at_a_time(piece) * Muon._scale(piece.shape, "original")
                           for piece in (u.split(blocks[id(p)]) if id(p) in blocks else [u])])
                for p, u in zip(matrices, updates)]

    variants = {"batched": lambda: muon._orthogonalised(matrices, updates, 5, "original"),
                "one at a time": separately}
    diff = max((a - b).abs().max().item() for a, b in zip(*(fn() for fn in variants.values())))
    for fn in 2 * list(variants.values()):  # warm-up: the first calls in a process pay for allocations
        fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    shapes = sorted({tuple(p.shape) for p in matrices})
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{config} ({len(matrices)} matrices of shapes {shapes}), {threads} threads: " +
          ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items()) +
          f": {medians['one at a time'] / medians['batched']:.2f}x; results differ by at most {diff:.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["qkv", "step"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--configs", nargs="+", default=["configs/speedrun-cpu.yaml", "configs/small.yaml"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if args.what == "step":
        for config in args.configs:
            step_times(config, args.rounds, args.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "one_matrix_train.py"
        wrapper.write_text(ONE_MATRIX_TRAIN)
        variants = {"one matrix": [str(wrapper), "train.py"], "three matrices": ["train.py"]}
        for config in args.configs:
            results = {name: [] for name in variants}
            for seed in args.seeds:
                for name, script in variants.items():
                    results[name].append(final_val(script, config, seed, Path(tmp)))
                    print(f"{config} seed {seed}, c_attn as {name}: val {results[name][-1]:.4f}", flush=True)
            means = {name: statistics.mean(vals) for name, vals in results.items()}
            print(f"{config}: mean final val loss (whole val split), " +
                  ", ".join(f"{name} {mean:.4f}" for name, mean in means.items()) +
                  f"; three - one = {means['three matrices'] - means['one matrix']:+.4f}", flush=True)


if __name__ == "__main__":
    main()
