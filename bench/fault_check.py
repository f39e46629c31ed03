"""Check issue 4's guarantees on a GPU (runs on CPU too, where it is mostly a smoke test).

    python -m bench.fault_check [--device cuda] [--steps 50]

1. Resume: a short bf16 run (dtype auto) stopped with SIGTERM and resumed, compared step for step
   with the same run uninterrupted: bit-identical, or how far apart (bf16 kernels with atomics,
   such as the embedding backward, need not be deterministic on a GPU).
2. Skipped updates on the device: fused AdamW given NaN gradients and skip=True leaves parameters,
   moments and step count bit-identical, with no host sync (checked with CUDA's sync debug
   mode); fp16 with a GradScaler (the path that syncs) skips too.
3. What the guard costs: ms per optimizer step of a small GPT with the plain step
   (clip + optimizer.step) and with the guarded one (clip + guard.check + guarded_step), same
   model, same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import build_model  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.guard import StepGuard, guarded_step  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["train_loss"] for r in rows if "lr" in r}


def check_resume(device: str, tmp: Path):
    args = [sys.executable, "train.py", "configs/small.yaml", f"train.device={device}", "train.max_iters=300",
            "train.eval_interval=100", "train.log_interval=1", "train.eval_batches=2", "model.dropout=0.1",
            f"data.prepared_dir={tmp / 'prep'}"]
    if device == "cpu":  # a smoke test only: a model small enough for a busy CPU
        args += ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.threads=1"]
    subprocess.run(args + [f"out_dir={tmp / 'ref'}"], cwd=REPO, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(args + [f"out_dir={tmp / 'cut'}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (tmp / "cut" / "metrics.jsonl").is_file() or len(losses(tmp / "cut")) < 120:
        if proc.poll() is not None:
            sys.exit(f"the run to be interrupted ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    subprocess.run(args + [f"out_dir={tmp / 'cut'}", "resume=true"], cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    ref, cut = losses(tmp / "ref"), losses(tmp / "cut")
    diffs = [abs(ref[i] - cut[i]) for i in ref]
    print(f"resume ({device}): exit {proc.returncode} on SIGTERM; {len(cut)} steps logged of {len(ref)}; "
          f"bit-identical: {ref == cut}; max |loss diff| {max(diffs):.3g}")


def check_skip(device: str):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256, 256, device=device))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)
    p.grad = torch.randn_like(p)
    guarded_step(opt, scaler, torch.tensor(False, device=device))
    before = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    p.grad = torch.full_like(p, math.nan)
    skip = torch.isnan(p.grad).any()
    if device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    guarded_step(opt, scaler, skip)
    if device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode(0)
    same = all(torch.equal(a, b) for a, b in zip(before, [p.detach()] + list(opt.state[p].values())))
    print(f"skip on device ({device}, fused AdamW): state untouched: {same}; no host sync: "
          f"{'checked' if device.startswith('cuda') else 'n/a on cpu'}")
    if device.startswith("cuda"):
        scaler = torch.amp.GradScaler("cuda")
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        p.grad = torch.randn_like(p)
        scaler.scale(p.sum()).backward()  # any graph will do: we only need scaled grads
        scaler.unscale_(opt)
        before = p.detach().clone()
        guarded_step(opt, scaler, torch.tensor(True, device=device))
        scaler.update()
        print(f"skip with fp16 GradScaler (sync path): parameters untouched: {torch.equal(before, p.detach())}")


def time_steps(device: str, steps: int):
    size = (["model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.block_size=256", "train.batch_size=32"]
            if device != "cpu" else ["model.n_layer=2", "model.n_embd=64", "model.block_size=64", "train.batch_size=8"])
    cfg = load_config(str(REPO / "configs/small.yaml"), size + ["model.vocab_size=128"])
    if device == "cpu":
        torch.set_num_threads(1)
    model = build_model(cfg.model).to(device)
    opt = build_optimizers(model, cfg.optim, device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)
    guard = StepGuard(cfg.train, torch.device(device), scaler_enabled=False)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    x = torch.randint(0, 65, (cfg.train.batch_size, cfg.model.block_size), device=device)

    def step(guarded: bool):
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, x)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guarded:
            guarded_step(opt, scaler, guard.check(loss.detach(), norm))
        else:
            opt.step()
        opt.zero_grad()

    for guarded in (False, True, False, True):
        for _ in range(5):
            step(guarded)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step(guarded)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"step ({device}, {'guarded' if guarded else 'plain  '}): {(time.perf_counter() - t) / steps * 1e3:.2f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    with tempfile.TemporaryDirectory() as tmp:
        check_resume(args.device, Path(tmp))
    check_skip(args.device)
    time_steps(args.device, args.steps)


if __name__ == "__main__":
    main()
