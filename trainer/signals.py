"""Signals, all in one place: SIGTERM / SIGINT become a request to stop at the next step boundary.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM and allow a grace period before
SIGKILL; Ctrl-C sends SIGINT. Either one only sets a flag: the loop finishes the step it is in
(a half-applied optimizer step cannot be saved), writes a checkpoint, says so and exits 0, so a
job script can requeue with `resume=true`. A second SIGINT means "now": it raises
KeyboardInterrupt at once (exit 130, nothing saved; `latest.pt` is still the previous complete
checkpoint, as after any kill). A second SIGTERM changes nothing: the save is already coming.

The previous handlers are put back on exit, so calling `train()` from Python or a test leaves
the process as it found it.

Under torchrun, SIGTERM is how the launcher stops the survivors of a failed rank, where a save
would wait on the dead peer: `exit_on_sigterm` makes it end the process at once, with a line.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """Context manager; `reason` is None until a signal asks the run to stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.reason: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort without waiting
        self.reason = self.reason or signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def exit_on_sigterm(rank: int):
    """A distributed rank: SIGTERM ends the process at once, saying why instead of vanishing."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(
        f"rank {rank}: stopped: another process of the job failed or the job was cancelled "
        f"(torchrun's report names the failed rank)"))
