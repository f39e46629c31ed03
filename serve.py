"""Serve a checkpoint over OpenAI's HTTP API, with a chat page (needs `pip install -e ".[serve]"`).

    python serve.py --ckpt out/small [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 8]

Reads top to bottom: check the extra is installed -> load the checkpoint (a bad one: one line,
exit 2, before any port is taken) -> take the port (in use: one line naming it) -> start the
engine (model/engine.py: continuous batching in its own thread) -> serve with uvicorn until
Ctrl-C or SIGTERM. On that signal new requests are refused (503), running ones get --grace
seconds to finish, then end with an error event; a second Ctrl-C exits at once.

The endpoints and their formats are in server/app.py and the README's "Serving" section. The
key may come from SERVE_API_KEY instead of --api-key, which keeps it out of `ps` listings.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from common.errors import UserError, report_user_errors
from trainer.runtime import Runtime, pick_device, pick_dtype


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    except (socket.gaierror, OverflowError) as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e})") from None
    sock.listen(128)
    return sock


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a checkpoint over OpenAI's HTTP API, with a chat page.")
    ap.add_argument("--ckpt", default="out", help="run folder (uses best.pt, else latest.pt) or checkpoint file")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    ap.add_argument("--api-key", default=os.environ.get("SERVE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/... (default: $SERVE_API_KEY; none: open)")
    ap.add_argument("--max-batch", type=int, default=8, help="rows decoded together (a request's n counts n)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; past it: 429")
    ap.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens one choice may ask for")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, in bytes")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--dtype", default="auto", help="auto (bf16/fp16 autocast on GPU, fp32 elsewhere) | float32 | bfloat16 | float16")
    ap.add_argument("--grace", type=float, default=5.0,
                    help="seconds running requests get to finish after Ctrl-C / SIGTERM before they are ended")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        try:
            import uvicorn

            from server.app import Limits, Server
        except ImportError as e:
            raise UserError(f"serving needs the serve extra ({e.name} is missing): pip install -e \".[serve]\"") from None
        for name, ok in (("--port", 0 <= args.port <= 65535), ("--max-batch", args.max_batch >= 1),
                         ("--max-queue", args.max_queue >= 0), ("--max-tokens", args.max_tokens >= 1),
                         ("--max-body", args.max_body >= 1024), ("--threads", args.threads >= 0),
                         ("--grace", args.grace >= 0)):
            if not ok:
                raise UserError(f"{name}={getattr(args, name[2:].replace('-', '_'))} is out of range")
        if args.api_key is not None and not args.api_key.strip():
            raise UserError("--api-key (or SERVE_API_KEY) is empty")
        if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype={args.dtype} is not one of: auto, float32, bfloat16, float16")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        rt = Runtime(device, pick_dtype(args.dtype, device))

        from chat.template import ChatTemplate, has_chat_tokens
        from model.engine import Engine
        from trainer.checkpoint import load_model

        model, tokenizer, cfg, path = load_model(args.ckpt, device)
        sock = bind(args.host, args.port)
        model_id = Path(args.ckpt).resolve().name if Path(args.ckpt).is_dir() else path.parent.name
        engine = Engine(model, tokenizer, args.max_batch, args.max_queue, autocast=lambda: rt.autocast)
        limits = Limits(cfg.model.block_size, args.max_tokens, args.max_body, args.max_batch)
        template = ChatTemplate(tokenizer) if has_chat_tokens(tokenizer) else None  # else chat is refused
        app = Server(engine, tokenizer, model_id, limits, args.api_key, template).app()

        class Uvicorn(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn's own re-raises the signal once it has shut down: the process would die
                # of it (SIGTERM) or raise KeyboardInterrupt instead of exiting cleanly.
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            def handle_exit(self, sig, frame):
                if self.should_exit:  # a second signal: stop now
                    self.force_exit = True
                    return
                self.should_exit = True  # stop listening; running requests get --grace seconds to end
                threading.Thread(target=engine.close, args=(args.grace,), daemon=True).start()

        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {path} as {model_id!r} on http://{shown}:{port} (max batch {args.max_batch}, "
              f"queue {args.max_queue}{', API key required' if args.api_key else ''}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        engine.start()
        server = Uvicorn(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        server.run(sockets=[sock])
        engine.close()
        print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
