"""Measure weight conversion: import and export time and peak memory for a 124M-parameter
GPT-2-shaped model, and how far each exported format and dtype moves the logits.

Run from the repository root:  python -m bench.convert [--work /tmp/bench-convert] [--only timings|logits|tokenizers]

1. Builds GPT-2 small's shape (12 layers, 768 wide, 12 heads, context 1024, GPT-2's 50,257-token
   vocabulary) with transformers' own random initialisation (no pretrained weights are reachable
   here) and saves it as a Hugging Face folder (model.safetensors + vocab.json/merges.txt).
2. Times `python -m model.convert import` and every `export` (hf in float32 / bfloat16 / float16,
   gguf in float32 / float16 / bfloat16 / q8_0), each in a fresh child process: the conversion's
   own time (after `import torch`), the whole command's, and the child's peak RSS. A child that
   only imports torch and the converter gives the baseline RSS.
3. Logits, on 4 sequences of 256 tokens (the end-of-text id and the last id included): the
   imported model against the transformers original, and each export loaded back by transformers
   (hf folders upcast to float32; GGUF files dequantised by transformers' GGUF reader), against
   the imported model. Reports the largest absolute difference, the mean one, the logits' own
   standard deviation for scale, and how often the top-1 token agrees.
4. The exact-GELU note on GGUF GPT-2 exports: the same weights with `model.mlp: gelu` against
   `gelu_tanh` (what llama.cpp's GPT-2 computes).
5. Tokenizer files at scale: GPT-2's vocab.json/merges.txt and cl100k_base's tokenizer.json, loaded
   by transformers' AutoTokenizer, against tiktoken on 1 MB of Tiny Shakespeare plus multilingual
   text with emoji; and the time to write each.

Needs the [hf] extra and transformers + accelerate (the test extra), and GPT-2's and cl100k_base's
vocabularies (offline: TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("Hello world!  It's 2026: 1234567 tokens, naïve café.\n\nПривет, мир! 你好，世界。 こんにちは 🤖🚀👩‍👩‍👧 "
        "مرحبا   \t tabs\r\n  trailing   \n\n\n  x's 'll  ")
EXPORTS = [("hf", "float32"), ("hf", "bfloat16"), ("hf", "float16"),
           ("gguf", "float32"), ("gguf", "float16"), ("gguf", "bfloat16"), ("gguf", "q8_0")]

# Peak RSS is /proc's VmHWM, not getrusage's ru_maxrss, which keeps the parent's high-water mark
# across fork + exec (this process holds a 124M model and transformers).
CHILD = """
import json, runpy, sys, time
import torch, model.convert
imported = time.perf_counter()
sys.argv = ["model.convert", *ARGS]
if ARGS:
    runpy.run_module("model.convert", run_name="__main__")
done = time.perf_counter()
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"convert_s": done - imported, "peak_rss_mb": hwm / 1024}))
"""


def child(args: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD.replace("ARGS", repr(args))], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "command_s": time.perf_counter() - start}


def make_source(folder: Path):
    import torch
    import transformers

    from data.hf_tokenizer import write_hf_tokenizer
    from data.tokenizer import TiktokenTokenizer

    if (folder / "COMPLETE").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())  # GPT-2 small's shape, random
    model.save_pretrained(folder)
    write_hf_tokenizer(TiktokenTokenizer.openai("gpt2"), folder, 1024)
    (folder / "COMPLETE").write_text("")


def export_path(work: Path, fmt: str, dtype: str) -> Path:
    return work / (f"export-{dtype}.gguf" if fmt == "gguf" else f"export-hf-{dtype}")


def compare(ref, other) -> dict:
    diff = (ref - other).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "logit_std": ref.std().item(),
            "top1_agree": (ref.argmax(-1) == other.argmax(-1)).float().mean().item()}


def logits_section(work: Path, batch) -> list[tuple[str, dict]]:
    import torch
    import transformers

    from trainer.checkpoint import load_model

    ours, _, cfg, _ = load_model(work / "run")
    vocab = 50257
    with torch.no_grad():
        base = ours(batch)[0][..., :vocab].float()
        rows = [("import vs transformers original",
                 compare(base, transformers.AutoModelForCausalLM.from_pretrained(work / "src").eval()(batch).logits))]
        for fmt, dtype in EXPORTS:
            path = export_path(work, fmt, dtype)
            if fmt == "hf":
                theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            else:
                # transformers reads gpt2.context_length into n_ctx, not n_positions: say it
                theirs = transformers.AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=torch.float32, n_positions=cfg.model.block_size)
            rows.append((f"{fmt} {dtype}", compare(base, theirs.eval()(batch).logits.float())))
            del theirs
        from model import build_model

        exact = build_model(type(cfg.model)(**{**vars(cfg.model), "mlp": "gelu"}))
        exact.load_state_dict(ours.state_dict())
        rows.append(("mlp gelu vs gelu_tanh, same weights", compare(base, exact.eval()(batch)[0][..., :vocab])))
    return rows


def tokenizer_section(work: Path) -> list[tuple[str, bool, float, int]]:
    import transformers

    from data.hf_tokenizer import write_hf_tokenizer
    from data.tokenizer import TiktokenTokenizer

    text = (ROOT / "data/tinyshakespeare/input.txt").read_text()[:1_000_000] + TEXT * 20
    rows = []
    for name in ("gpt2", "cl100k_base"):
        tok = TiktokenTokenizer.openai(name)
        folder = work / f"tok-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        start = time.perf_counter()
        write_hf_tokenizer(tok, folder, 1024)
        write_s = time.perf_counter() - start
        ids = tok.encode(text)
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        rows.append((name, hf.encode(text, add_special_tokens=False) == ids and hf.decode(ids) == text, write_s,
                     len(ids)))
    return rows


def timings(work: Path):
    base = child([])
    print(f"baseline child (python, torch, model.convert imported): peak RSS {base['peak_rss_mb']:.0f} MB, "
          f"{base['command_s']:.1f} s\n")
    print("| step | conversion time | whole command | peak RSS | output size |\n| --- | --- | --- | --- | --- |")
    r = child(["import", str(work / "src"), "--out", str(work / "run"), "--overwrite"])
    size = (work / "run" / "latest.pt").stat().st_size / 1e6
    print(f"| import (safetensors, 124M) | {r['convert_s']:.2f} s | {r['command_s']:.2f} s | {r['peak_rss_mb']:.0f} MB "
          f"| {size:.0f} MB |")
    for fmt, dtype in EXPORTS:
        out = export_path(work, fmt, dtype)
        r = child(["export", str(work / "run"), "--out", str(out), "--format", fmt, "--dtype", dtype, "--overwrite"])
        size = (sum(f.stat().st_size for f in out.iterdir()) if fmt == "hf" else out.stat().st_size) / 1e6
        print(f"| export {fmt} {dtype} | {r['convert_s']:.2f} s | {r['command_s']:.2f} s | {r['peak_rss_mb']:.0f} MB "
              f"| {size:.0f} MB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench-convert", help="working folder (the source model is kept)")
    ap.add_argument("--only", choices=("timings", "logits", "tokenizers"),
                    help="one part (logits needs the exports of a timings run in --work)")
    args = ap.parse_args()
    parts = {args.only} if args.only else {"timings", "logits", "tokenizers"}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from bench.harness import machine

    make_source(work / "src")
    print(f"machine: {machine()}\n")
    if "timings" in parts:
        timings(work)
    if "logits" in parts:
        torch.manual_seed(0)
        batch = torch.randint(0, 50257, (4, 256))
        batch[:, 0], batch[:, 100], batch[:, -1] = 50256, 50256, 50256
        batch[:, 50] = 50255  # the last ordinary id
        print("\n| logits | max abs diff | mean abs diff | logit std | top-1 agreement |\n"
              "| --- | --- | --- | --- | --- |")
        for name, c in logits_section(work, batch):
            print(f"| {name} | {c['max_abs']:.2e} | {c['mean_abs']:.2e} | {c['logit_std']:.3f} | "
                  f"{100 * c['top1_agree']:.2f}% |")
    if "tokenizers" in parts:
        print("\n| tokenizer files | ids equal tiktoken's (1 MB + multilingual) | write time | tokens |\n"
              "| --- | --- | --- | --- |")
        for name, same, write_s, n in tokenizer_section(work):
            print(f"| {name} | {same} | {write_s:.1f} s | {n:,} |")


if __name__ == "__main__":
    main()
