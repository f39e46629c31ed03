"""Generate text from a trained checkpoint, of any model family.

    python sample.py --ckpt out/small --prompt "ROMEO:" [--max-new-tokens 500] [--num-samples 1]
    python sample.py --ckpt out/small --interactive      # one prompt per line; Ctrl-D exits
    python sample.py --ckpt out/sft --chat [--system TEXT]   # chat with a fine-tuned model (chat/repl.py)

Reads top to bottom: load checkpoint (config + tokenizer + weights) -> encode prompt ->
generate -> stream. The checkpoint carries its tokenizer, so no corpus or network is needed.
Text goes to stdout; everything else (the summary `generated N tokens in T s (R tokens/s)`,
errors, the REPL's `> `) to stderr, so the output pipes cleanly.

Each new token's step is captured at the first one and replayed (GPT's decoder,
model/kv_cache.py DecodeStep): as a CUDA graph on CUDA, as a TorchScript trace on the CPU in
float32, where it saves the Python around every operator. `--no-capture` runs the steps op by
op from Python instead.

Several samples run as one batch. The first one streams as it is produced (someone is
watching); the others are printed whole after it, in order, once the batch is done, each
sample followed by a dashed line. Interleaving them live would make the output unreadable.

`--interactive` answers each line of stdin (a terminal or a pipe) with its continuation only,
and reseeds for every prompt, so an answer is the same as `--prompt` with that line gives. A
bad prompt there prints its error and the REPL goes on; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from chat.repl import chat_repl
from common.errors import UserError, report_user_errors
from model.generate import Sampling, TextStream, generate
from trainer.checkpoint import load_model
from trainer.runtime import Runtime, compile_with_fallback, pick_device, pick_dtype


def read_prompt(prompt: str) -> str:
    if prompt.startswith("@"):
        try:
            return Path(prompt[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--prompt {prompt}: cannot read {prompt[1:]} ({e.strerror})") from None
    return prompt


def unescape(text: str) -> str:
    r"""Python-style escapes, so `--stop '\n\n'` means two newlines (non-ASCII text passes)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def decode_mode(device: torch.device, args) -> str:
    """How one-token steps run (GPT's decoder, model/kv_cache.py): replayed from a CUDA graph on
    CUDA; with fixed shapes when compiled (one compiled step serves every position); replayed
    from a trace on the CPU (float32 only: under autocast the decoder runs the steps eagerly);
    else over the cache's valid slots, the least work for eager steps."""
    if device.type == "cuda" and not args.no_capture:
        return "graph"
    if args.compile:
        return "static"
    return "trace" if device.type == "cpu" and not args.no_capture else "dynamic"


def answer(prompt: str, echo_prompt: bool, model, tokenizer, args, rt: Runtime) -> int:
    """Generate args.num_samples continuations of prompt to stdout; returns the tokens made."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                        vocab_limit=tokenizer.vocab_size)
    streams = [TextStream(tokenizer, tuple(unescape(s) for s in args.stop)) for _ in range(args.num_samples)]
    finished = torch.zeros(args.num_samples, dtype=torch.bool, device=rt.device)
    out = sys.stdout
    head = prompt if echo_prompt else ""
    out.write(head)
    made = 0
    with rt.autocast:
        for step in generate(model, idx, args.max_new_tokens, sampling, generator, tokenizer.eot_id,
                             use_cache=not args.kv_cache_off, finished=finished,
                             decode=decode_mode(rt.device, args)):
            for i, tok in enumerate(step.tolist()):
                if tok < 0:
                    continue
                made += 1
                if tok == tokenizer.eot_id:
                    continue  # the row is finished; end-of-text is not text
                piece = streams[i].feed(tok)
                if streams[i].done:
                    finished[i] = True
                if i == 0:
                    out.write(piece)
                    out.flush()
    out.write(streams[0].close() + "\n")
    separator = "-" * 40 + "\n"
    if args.num_samples > 1:
        out.write(separator)
        for s in streams[1:]:
            out.write(head + s.text + s.close() + "\n" + separator)
    out.flush()
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text from a checkpoint.")
    ap.add_argument("--ckpt", default="out", help="run folder (uses best.pt, else latest.pt) or checkpoint file")
    ap.add_argument("--prompt", default="\n", help="text to continue, or @path to read it from a file")
    ap.add_argument("--interactive", action="store_true", help="read prompts line by line from stdin (Ctrl-D exits)")
    ap.add_argument("--chat", action="store_true",
                    help="chat with a model fine-tuned on chat data: one user turn per line; /reset, /exit, Ctrl-D")
    ap.add_argument("--system", default=None, help="with --chat: a system message that opens the conversation")
    ap.add_argument("--no-tools", action="store_true", help="with --chat: do not run the model's tool calls")
    ap.add_argument("--max-new-tokens", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=200, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 = off")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats; 1.0 = off")
    ap.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help=r"stop a sample where its text contains TEXT (cut there; repeatable; escapes like \n work)")
    ap.add_argument("--num-samples", type=int, default=1, help="generated together as one batch")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--dtype", default="auto", help="auto (bf16/fp16 autocast on GPU, fp32 elsewhere) | float32 | bfloat16 | float16")
    ap.add_argument("--no-kv-cache", dest="kv_cache_off", action="store_true",
                    help="recompute the whole context for every token (slow; for checking the cache)")
    ap.add_argument("--no-capture", "--no-cuda-graph", dest="no_capture", action="store_true",
                    help="run each token's step op by op from Python instead of replaying the captured step "
                         "(a CUDA graph on CUDA, a TorchScript trace on the CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (pays on CUDA; on CPU only for long generations, see README)")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        for name, ok in (("--max-new-tokens", args.max_new_tokens >= 0), ("--temperature", args.temperature >= 0),
                         ("--top-k", args.top_k >= 0), ("--top-p", 0 < args.top_p <= 1),
                         ("--repetition-penalty", args.repetition_penalty > 0),
                         ("--num-samples", args.num_samples >= 1)):
            if not ok:
                raise UserError(f"{name}={getattr(args, name[2:].replace('-', '_'))} is out of range")
        device = pick_device(args.device)
        if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype={args.dtype} is not one of: auto, float32, bfloat16, float16")
        rt = Runtime(device, pick_dtype(args.dtype, device))
        if args.system is not None and not args.chat:
            raise UserError("--system is for --chat")
        if args.chat and (args.interactive or args.num_samples > 1):
            raise UserError("--chat is a REPL of its own; --interactive and --num-samples do not apply to it")
        model, tokenizer, cfg, _ = load_model(args.ckpt, device)
        if args.compile:
            # Dynamic shapes: the prefill length and the cache length change from call to call.
            log = lambda message: print(message, file=sys.stderr)  # noqa: E731
            model.forward = compile_with_fallback(model.forward, log=log, dynamic=True)

        def run(prompt: str, echo_prompt: bool):
            t0 = time.perf_counter()
            made = answer(prompt, echo_prompt, model, tokenizer, args, rt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"generated {made} tokens in {dt:.2f} s ({made / dt:.1f} tokens/s)", file=sys.stderr)

        if args.chat:
            chat_repl(model, tokenizer, cfg.model.block_size, args, rt)
            return
        if not args.interactive:
            run(read_prompt(args.prompt), echo_prompt=True)
            return
        failed = False
        while True:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:  # end of input: Ctrl-D or the end of a pipe
                break
            try:
                run(line.rstrip("\r\n"), echo_prompt=False)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                failed = True
        if failed:
            sys.exit(2)


if __name__ == "__main__":
    main()
