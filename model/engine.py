"""Continuous batching: many requests decoded together, each row joining and leaving at any step.

The server (server/app.py) submits `Request`s; a thread runs `Engine.step` in a loop (`start`;
a caller without threads can submit and call `step` itself, as tests/test_engine.py does). At every step
the requests that arrived are admitted (while rows are free), every running row gets one new
token, and the rows that finished leave; the others never wait for a whole batch to end. Each
row has its own sequence, position, sampling settings, random generator, stop condition and
token budget. A request with n > 1 is n rows admitted together (they share the prompt; GPT's
decoder then sees the same sequence n times).

What a family provides is a `RowsDecoder` (`model.rows_decoder(capacity)`, model/base.py):
`next_logits({row id: its whole sequence so far})` -> one logits row per id, feeding only what
each row has not seen, and `drop(row id)`. The default, `SeparateRows`, keeps one ordinary
`model.decoder()` per row and steps them one after another: every family (LSTM, RWKV,
n-gram) is served correctly with no code of its own, just without batched compute. GPT opts in
with `KVRows` (model/kv_rows.py): one forward per step for all rows, per-row positions and masks.

Design decisions:
- The engine reuses sample.py's generation parts instead of replacing `generate`: `Sampling` and
  `sample_next` draw each token, `TextStream` turns a row's tokens into final text and applies
  its stop strings, and the model's own forward (GPT's blocks, attention, positions) does the
  math. sample.py keeps `generate`: one batch that shares a prompt is its whole job, and that
  loop carries what this one does not need (CUDA graphs of fixed shapes, the CPU fast path of
  model/kv_cache.py). The two agree token for token: a request with seed S draws choice 0 from
  a generator seeded S, as `sample.py --seed S` does (tested).
- Per-row sampling: each row samples from its own logits with its own generator (choice i of a
  request: seed + i), so a request's text does not depend on what else is in the batch.
- Isolation: a row whose sampling or text fails fails its request alone. When a batched step fails, every
  row is retried alone from its whole sequence (the decoder forgets them first); the rows that
  fail again fail their requests, the others go on. An error message names the exception type
  only; the server's log has the traceback.
- Bounded: at most `capacity` rows run and `queue_limit` requests wait; `submit` past that raises
  `Busy` (the server's 429). A request whose n exceeds the capacity could never start: refused.
- Tool calls (issue 17) have a place: a row's sequence may grow by several tokens at once
  (forced tokens, e.g. a tool's output appended to `Row.tokens`) and the decoder feeds them all
  at the next step.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol

import torch

from model.generate import Sampling, TextStream, sample_next


class RowsDecoder(Protocol):
    def next_logits(self, rows: dict[Hashable, torch.Tensor]) -> torch.Tensor:
        """rows: id -> that row's whole sequence so far (1-D) -> logits (len(rows), vocab), in
        order. An id not seen before (or dropped) starts a row from its whole sequence."""

    def drop(self, row_id: Hashable):
        """Forget a row (finished, cancelled, failed); an unknown id is ignored."""


class SeparateRows:
    """Any family's rows: one `model.decoder()` per row, stepped one after another."""

    def __init__(self, model):
        self.model = model
        self.decoders = {}

    def next_logits(self, rows):
        out = []
        for row_id, seq in rows.items():
            decoder = self.decoders.get(row_id)
            if decoder is None:
                decoder = self.decoders[row_id] = self.model.decoder()
            out.append(decoder.next_logits(seq[None])[0])
        return torch.stack(out)

    def drop(self, row_id):
        self.decoders.pop(row_id, None)


class Busy(Exception):
    """The queue is full: try again later."""


class Closed(Exception):
    """The engine is shutting down."""


@dataclass
class Request:
    prompt: list[int]  # token ids, not empty
    max_tokens: int  # new tokens per choice, at least 1
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1  # choices, each a row
    seed: int | None = None  # None: a random one
    stop: tuple[str, ...] = ()  # a choice's text ends before the first of these
    stop_ids: tuple[int, ...] = ()  # tokens that end a choice (end of text, end of turn); not text


@dataclass
class Event:
    """What the engine tells a request's owner, from the engine's thread. A choice's text comes
    in pieces (final: never taken back); its last event has `finish` ("stop": a stop token or
    string; "length": max_tokens). An `error` ends the whole request."""

    index: int = 0  # the choice
    text: str = ""
    finish: str | None = None
    tokens: int = 0  # tokens this choice has generated so far (its stop token included)
    error: str | None = None


class Job:
    """A submitted request: its rows and the owner's callback. `cancel()` is safe from any thread;
    the rows leave at the next step and no more events come."""

    def __init__(self, request: Request, emit: Callable[[Event], None]):
        self.request, self.emit = request, emit
        self.cancelled = False
        self.rows: list[Row] = []

    def cancel(self):
        self.cancelled = True

    @property
    def done(self) -> bool:
        return bool(self.rows) and all(r.finished for r in self.rows)


class Row:
    def __init__(self, job: Job, index: int, tokenizer, device):
        req = job.request
        self.job, self.index = job, index
        self.tokens = torch.empty(len(req.prompt) + req.max_tokens, dtype=torch.long, device=device)
        self.tokens[:len(req.prompt)] = torch.tensor(req.prompt)
        self.length = len(req.prompt)
        self.generated = 0
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(device=device).manual_seed(seed + index)
        self.stream = TextStream(tokenizer, req.stop)
        self.finished = False

    @property
    def sequence(self) -> torch.Tensor:
        return self.tokens[:self.length]

    def take(self, token: int):
        """Append a sampled token; emit its text, and the finish when it ends the choice."""
        req = self.job.request
        self.tokens[self.length] = token
        self.length += 1
        self.generated += 1
        finish, text = None, ""
        if token in req.stop_ids:
            finish = "stop"
        else:
            text = self.stream.feed(token)
            if self.stream.done:
                finish = "stop"
        if finish is None and self.generated >= req.max_tokens:
            finish = "length"
        if finish is not None:
            text += self.stream.close()
            self.finished = True
        if text or finish:
            self.job.emit(Event(self.index, text, finish, self.generated))


class Engine:
    def __init__(self, model, tokenizer, capacity: int = 8, queue_limit: int = 64,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.capacity, self.queue_limit = capacity, queue_limit
        self.autocast = autocast
        self.device = next(itertools.chain(model.parameters(), model.buffers())).device  # a counted model has only buffers
        self.decoder: RowsDecoder = model.rows_decoder(capacity)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.lock = threading.Condition()
        self.closing = False  # no new requests; the running ones go on
        self.stopping = False  # the running ones end too
        self.thread: threading.Thread | None = None

    # The owner's side (any thread) ------------------------------------------------------------

    def submit(self, request: Request, emit: Callable[[Event], None]) -> Job:
        if request.n > self.capacity:
            raise ValueError(f"n={request.n} is more than the {self.capacity} rows this engine runs at once")
        job = Job(request, emit)
        with self.lock:
            if self.closing:
                raise Closed()
            if len(self.waiting) >= self.queue_limit:
                raise Busy()
            self.waiting.append(job)
            self.lock.notify()
        return job

    @property
    def load(self) -> dict:
        return dict(running=sum(len(j.rows) for j in self.running), waiting=len(self.waiting),
                    capacity=self.capacity, queue_limit=self.queue_limit)

    def start(self):
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def close(self, grace: float = 0.0):
        """Stop: waiting requests fail at once; running ones may finish within `grace` seconds,
        then fail with an error event."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(grace)
        with self.lock:
            self.stopping = True
        if self.thread is not None:
            self.thread.join()

    # The engine's thread ------------------------------------------------------------------------

    def _loop(self):
        with torch.inference_mode(), self.autocast():
            while True:
                with self.lock:
                    if self.closing:
                        for job in self.waiting:
                            job.emit(Event(error="the server is shutting down"))
                        self.waiting.clear()
                        if self.stopping or not self.running:
                            for job in self.running:
                                if not job.cancelled:
                                    job.emit(Event(error="the server is shutting down"))
                            self.running = []
                            return
                    elif not self.running and not self.waiting:
                        self.lock.wait()
                        continue
                try:
                    self.step()
                except Exception as e:  # a bug outside any one row: the running requests fail, serving goes on
                    for job in list(self.running):
                        self._fail(job, e)

    def step(self):
        """Admit what fits, give every running row one token, let the finished rows leave."""
        self._admit()
        for job in [j for j in self.running if j.cancelled]:
            self._end(job)
        rows = [r for j in self.running for r in j.rows if not r.finished]
        if not rows:
            return
        for row, logits in zip(rows, self._logits(rows)):
            if logits is None or row.job.cancelled or row.finished:
                continue
            try:
                row.take(int(sample_next(logits[None], row.sequence[None], row.job.request.sampling, row.generator)))
            except Exception as e:
                self._fail(row.job, e)
                continue
            if row.finished:
                self.decoder.drop(row)
        for job in [j for j in self.running if j.done]:
            self._end(job)

    def _admit(self):
        with self.lock:
            if any(j.cancelled for j in self.waiting):  # clients gone before their turn: free their places
                self.waiting = deque(j for j in self.waiting if not j.cancelled)
            free = self.capacity - sum(len(j.rows) for j in self.running)
            while self.waiting and not self.closing and self.waiting[0].request.n <= free:
                job = self.waiting.popleft()
                job.rows = [Row(job, i, self.tokenizer, self.device) for i in range(job.request.n)]
                self.running.append(job)
                free -= job.request.n

    def _logits(self, rows: list[Row]) -> list[torch.Tensor | None]:
        """Each row's next logits; None for a row whose request failed."""
        try:
            return list(self.decoder.next_logits({r: r.sequence for r in rows}))
        except Exception:
            pass
        out = []
        for r in rows:  # the batch failed: find the culprits, each row alone from its whole sequence
            self.decoder.drop(r)
        for r in rows:
            if r.job.cancelled or r.finished:
                out.append(None)
                continue
            try:
                out.append(self.decoder.next_logits({r: r.sequence})[0])
            except Exception as e:
                self._fail(r.job, e)
                out.append(None)
        return out

    def _fail(self, job: Job, e: Exception):
        print(f"generation failed for one request:\n{traceback.format_exc()}", file=sys.stderr, end="")
        job.emit(Event(error=f"generation failed ({type(e).__name__}); the server's log has the details"))
        for r in job.rows:
            r.finished = True
        self._end(job)

    def _end(self, job: Job):
        for r in job.rows:
            self.decoder.drop(r)
        if job in self.running:
            self.running.remove(job)
