"""Generate text from a trained checkpoint.

    python sample.py --ckpt out/small --prompt "ROMEO:" [--max-new-tokens 500] [--num-samples 1]

Reads top to bottom: load checkpoint (config + tokenizer + weights) -> encode prompt ->
generate -> stream. The checkpoint carries its tokenizer, so no corpus or network is needed.
Text goes to stdout; everything else to stderr, so the output pipes cleanly.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import torch

from data.tokenizer import from_state
from model import GPT
from model.generate import generate
from trainer.checkpoint import find_checkpoint, load_checkpoint, load_model_state
from trainer.config import Config
from trainer.errors import UserError, report_user_errors
from trainer.runtime import pick_device


def load_model(ckpt_path: str, device: torch.device):
    path = find_checkpoint(ckpt_path)
    ckpt = load_checkpoint(path, map_location=device)
    cfg = Config.from_dict(ckpt["config"], source=f"{path} (config)")
    tokenizer = from_state(ckpt["tokenizer"])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"{path}: its tokenizer ({tokenizer.vocab_size} tokens) does not fit its model "
                        f"(model.vocab_size={cfg.model.vocab_size}); the checkpoint mixes two runs")
    model = GPT(cfg.model)
    load_model_state(model, ckpt, path)
    return model.to(device).eval(), tokenizer, path


def read_prompt(prompt: str) -> str:
    if prompt.startswith("@"):
        try:
            return Path(prompt[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--prompt {prompt}: cannot read {prompt[1:]} ({e.strerror})") from None
    return prompt


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text from a checkpoint.")
    ap.add_argument("--ckpt", default="out", help="run folder (uses best.pt, else latest.pt) or checkpoint file")
    ap.add_argument("--prompt", default="\n", help="text to continue, or @path to read it from a file")
    ap.add_argument("--max-new-tokens", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=200, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 = off")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        for name, ok in (("--max-new-tokens", args.max_new_tokens >= 0), ("--temperature", args.temperature >= 0),
                         ("--top-k", args.top_k >= 0), ("--top-p", 0 < args.top_p <= 1),
                         ("--num-samples", args.num_samples >= 1)):
            if not ok:
                raise UserError(f"{name}={getattr(args, name[2:].replace('-', '_'))} is out of range")
        device = pick_device(args.device)
        model, tokenizer, path = load_model(args.ckpt, device)
        prompt = read_prompt(args.prompt)
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
        if len(ids) > model.cfg.block_size and model.cfg.pos == "learned":
            ids = ids[-model.cfg.block_size:]  # the model cannot see further back than its window
        idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        print(f"sampling from {path}", file=sys.stderr)

        stream = args.num_samples == 1
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(args.num_samples)]
        texts = [prompt] * args.num_samples
        if stream:
            sys.stdout.write(prompt)
        for step in generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             generator, vocab_limit=tokenizer.vocab_size):
            for i, tok in enumerate(step.tolist()):
                piece = decoders[i].decode(tokenizer.decode_bytes([tok]))
                texts[i] += piece
                if stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        if stream:
            sys.stdout.write(decoders[0].decode(b"", final=True) + "\n")
        else:
            for i, text in enumerate(texts):
                sys.stdout.write(text + decoders[i].decode(b"", final=True) + "\n" + "-" * 40 + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
