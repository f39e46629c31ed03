"""Peak memory of a CPU training run against a plain PyTorch loop of the same shape, in one run.

    python bench/memory.py [--iters 100] [--configs configs/classic-cpu.yaml configs/small.yaml] [--python PY]

For each config, two processes on the same torch build, one after the other:
- this trainer: `python train.py CONFIG train.max_iters=N` (its periodic estimates, the final
  evaluation over the whole val split and its checkpoints included);
- a plain loop (`--plain`, below): the same model class and shape, torch.optim.AdamW, a fresh
  np.memmap and torch.stack per batch, `loss.item()` every step, then nanoGPT's estimate_loss
  (20 val batches) and a torch.save of model and optimizer: what a nanoGPT-style script holds.

Both peaks are the children's peak resident set size as the kernel reports it (`os.wait4`'s
ru_maxrss), the torch runtime included; the trainer's own report (`peak_mem_mb` in metrics.jsonl
and its final line) is printed beside it. Data is prepared first, outside both.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages first (its common/)
from bench.harness import REPO, machine  # noqa: E402


def peak_rss_mb(cmd: list[str]) -> tuple[float, str]:
    """Run cmd to completion; its peak RSS in MiB and its output."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{log[-3000:]}")
    return usage.ru_maxrss / 1024, log


def plain_loop(config: str, prepared: str, iters: int):
    """nanoGPT's loop around this project's model, nothing else (runs in a child process)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from model import build_model
    from trainer.config import load_config

    meta = json.loads((Path(prepared) / "meta.json").read_text())
    cfg = load_config(config, [f"model.vocab_size={meta['vocab_size']}"])
    B, T = cfg.train.batch_size, cfg.model.block_size
    files = {split: Path(prepared) / meta["splits"][split][0]["file"] for split in ("train", "val")}
    torch.manual_seed(1337)
    model = build_model(cfg.model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def get_batch(split):
        data = np.memmap(files[split], dtype=np.dtype(meta["dtype"]), mode="r")
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    for _ in range(iters):
        x, y = get_batch("train")
        logits, _ = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
                  for x, y in (get_batch("val") for _ in range(20))]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, Path(tmp) / "ckpt.pt")
    print(f"val {sum(losses) / len(losses):.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--configs", nargs="+", default=["configs/classic-cpu.yaml", "configs/small.yaml"])
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter both sides run with, e.g. a venv with another torch build")
    ap.add_argument("--plain", nargs=2, metavar=("CONFIG", "PREPARED"), help=argparse.SUPPRESS)  # the child
    args = ap.parse_args()
    if args.plain:
        plain_loop(*args.plain, args.iters)
        return
    build = subprocess.run([args.python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True).stdout.strip()
    print(f"machine: {machine()}; both sides run torch {build} ({args.python}); {args.iters} iterations")
    with tempfile.TemporaryDirectory() as tmp:
        from data.prepare import prepare_data
        from trainer.config import load_config

        for config in args.configs:
            cfg = load_config(str(REPO / config), [f"data.prepared_dir={tmp}/prep"])
            prepared = str(prepare_data(cfg.data, log=lambda *a: None))
            start = time.perf_counter()
            ours, log = peak_rss_mb([args.python, "train.py", config, f"out_dir={tmp}/out", "overwrite=true",
                                     f"train.max_iters={args.iters}", f"data.prepared_dir={prepared}"])
            ours_s = time.perf_counter() - start
            reported = [json.loads(line) for line in Path(f"{tmp}/out/metrics.jsonl").read_text().splitlines()]
            start = time.perf_counter()
            plain, _ = peak_rss_mb([args.python, __file__, f"--iters={args.iters}", "--plain", config, prepared])
            plain_s = time.perf_counter() - start
            print(f"{config}: this trainer {ours:.0f} MB ({ours_s:.0f} s; it reports {reported[-1]['peak_mem_mb']} MB), "
                  f"plain loop {plain:.0f} MB ({plain_s:.0f} s): {ours / plain:.2f}x (target <= 1.25x)", flush=True)


if __name__ == "__main__":
    main()
