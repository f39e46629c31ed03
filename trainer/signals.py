"""Signals, all in one place: SIGTERM / SIGINT ask the run to stop at the next step boundary; a
second one, or a step that cannot get there in time, ends the process at once.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM and allow a grace period before
SIGKILL; Ctrl-C sends SIGINT. The first signal only sets a request: the loop finishes the step it
is in (a half-applied optimizer step cannot be saved), writes a checkpoint, says so and exits 0,
so a job script can requeue with `resume=true`. Under torchrun the ranks first agree on the step
(trainer/dist.py `agree`, every step), so the checkpoint is one consolidated state.

Two things end the process without saving, with a line saying why and exit status 128 + the
signal's number (as if killed by it); `latest.pt` stays the previous complete checkpoint, since
saves are atomic (trainer/checkpoint.py):
- a second SIGTERM or SIGINT, at least `SAME_REQUEST_S` after the first. A scheduler that signals
  every process of a job while torchrun forwards the same signal to its workers delivers it
  twice within milliseconds: that is still one request.
- the loop not reaching a step boundary within `train.signal_grace_s` of the first signal (a step
  that cannot finish: swapping, a hung device). Once it has, the save is not cut short.

Why a thread: Python runs a signal handler only between bytecodes of the main thread, so while
one long kernel runs, a handler (and any exception it would raise) waits for the kernel to end.
The C-level handler that Python installs runs at once and writes the signal's number to the
wakeup file descriptor (`signal.set_wakeup_fd`); a watcher thread blocks on that pipe and acts on
it. torch's kernels release the GIL, so the watcher runs while the main thread computes, and
`os._exit` ends the whole process from there whatever the main thread is doing. The Python-level
handlers do nothing (they must exist for the C handler to be installed).

The previous handlers and wakeup descriptor are put back on exit, so calling `train()` from
Python or a test leaves the process as it found it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

SAME_REQUEST_S = 1.0  # a repeat of the first signal within this many seconds is the same request


class StopRequest:
    """Context manager; `reason` is None until a signal asks the run to stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = 60.0):
        self.grace_s = grace_s
        self.reason: str | None = None
        self._signum = 0
        self._first_at = 0.0
        self._deadline: float | None = None  # monotonic time by which the step must have finished
        self._previous, self._previous_fd, self._pipe, self._watcher = {}, -1, None, None

    def step_finished(self):
        """The loop reached a step boundary after the request: the grace period is over."""
        self._deadline = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            return self
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._previous = {s: signal.signal(s, _ignore) for s in self.SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        if self._pipe is None:
            return False
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        os.write(self._pipe[1], b"\0")  # tells the watcher to end
        self._watcher.join(5.0)  # a daemon: even a stuck one could not hold the process up
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None
        return False

    def _watch(self):
        while True:
            deadline = self._deadline
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([self._pipe[0]], [], [], timeout)
            if not ready:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    _abort(f"{self.reason}: the step did not finish within train.signal_grace_s={self.grace_s:g} s "
                           f"of the signal", self._signum)
                continue
            for signum in os.read(self._pipe[0], 512):
                if signum == 0:
                    return
                if signum in self.SIGNALS:
                    self._received(signal.Signals(signum))

    def _received(self, sig: signal.Signals):
        now = time.monotonic()
        if self.reason is None:
            self._signum, self._first_at = sig.value, now
            self._deadline = now + self.grace_s
            self.reason = sig.name
            if os.environ.get("RANK", "0") == "0":
                _say(f"{sig.name}: stopping after this step and saving a checkpoint "
                     f"(again, {SAME_REQUEST_S:g} s or more from now: abort without saving)")
        elif now - self._first_at >= SAME_REQUEST_S:
            _abort(f"{sig.name} again", sig.value)


def _ignore(signum, frame):
    """The Python-level handler: the watcher thread does the work (see the module docstring)."""


def _say(line: str):
    os.write(2, (line + "\n").encode())  # unbuffered, takes no lock the main thread could hold


def _abort(why: str, signum: int):
    _say(f"{why}: aborting now, without saving; the last complete checkpoint (latest.pt) is kept")
    flush = threading.Thread(target=_flush_std, daemon=True)  # what was printed before, if it can be had quickly
    flush.start()
    flush.join(1.0)
    os._exit(128 + signum)


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
