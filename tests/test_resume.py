"""Never lose a run, tested on real training processes: exact resume, SIGTERM/SIGINT, the time
budget, and SIGKILL at random moments (saves included) followed by a resume each time.

Every process trains the same tiny model (trainrun.TINY: dropout on, so the torch RNG matters;
grad_accum 2; a loss logged every step), so each run's metrics.jsonl can be compared, loss for
loss, with one uninterrupted reference run: equality of floats read back from JSON is
bit-for-bit equality.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trainer.checkpoint import BEST, LATEST, history, load_checkpoint
from trainrun import REPO, Forker, make_data, metrics, popen_train, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def forker():
    return Forker()


@pytest.fixture(scope="module")
def reference(data, forker, tmp_path_factory):
    """The uninterrupted run's metrics."""
    folder = tmp_path_factory.mktemp("reference")
    proc = forker.start(train_args(data, folder / "run"), folder / "log")
    proc.join(300)
    assert proc.exitcode == 0, (folder / "log").read_text()
    return metrics(folder / "run")


def load_checkpoint_bytes(blob: bytes) -> dict:
    import torch
    return torch.load(io.BytesIO(blob), weights_only=True)


def wait_for_iter(out_dir, n: int, alive, timeout: float = 120):
    """Block until metrics.jsonl shows iteration >= n (the process is inside its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out_dir / "metrics.jsonl"
        if path.is_file() and any(f'"iter": {i},' in path.read_text() for i in range(n, n + 40)):
            return
        assert alive(), "the training process ended before reaching the iteration"
        time.sleep(0.01)
    raise AssertionError(f"no iteration {n} within {timeout}s")


def test_sigterm_then_resume_reproduces_the_uninterrupted_run_bit_for_bit(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = popen_train(train_args(data, out))
    wait_for_iter(out, 15, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    stopped_at = load_checkpoint(out / LATEST, for_training=True)["iter"]
    assert 15 <= stopped_at < 60
    assert f"SIGTERM: stopped at iter {stopped_at}, checkpoint saved" in stdout

    proc = popen_train(train_args(data, out, "resume=true"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"resuming {out} from iter {stopped_at}" in stdout
    assert metrics(out) == reference  # every step's train loss and every val loss, bit for bit


def test_sigint_finishes_the_step_saves_and_exits_cleanly(data, forker, tmp_path):
    out = tmp_path / "run"
    proc = forker.start(train_args(data, out), tmp_path / "log")
    wait_for_iter(out, 5, proc.is_alive)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(60)
    log = (tmp_path / "log").read_text()
    assert proc.exitcode == 0, log
    ckpt = load_checkpoint(out / LATEST, for_training=True)
    assert f"SIGINT: stopped at iter {ckpt['iter']}, checkpoint saved" in log
    assert "Traceback" not in log


def _abort_in_slow_step(data, forker, tmp_path, *overrides, second_signal: bool):
    """A run that checkpoints every step and whose fourth step runs one long kernel (minutes): signal
    it once inside that kernel (and again after 1.2 s when second_signal). Returns (seconds from
    the last signal to the process's end, exit code, log, the checkpoint before and after)."""
    out, marker = tmp_path / "run", tmp_path / "slow-kernel-started"
    args = train_args(data, out, "train.ckpt_interval=1", *overrides)
    proc = forker.start_slow(args, tmp_path / "log", slow_from_call=7, marker=marker)  # grad_accum 2: step 3
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.is_alive() and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.01)
    before = (out / LATEST).read_bytes()
    time.sleep(0.3)  # inside the kernel
    os.kill(proc.pid, signal.SIGTERM)
    if second_signal:
        time.sleep(1.2)  # more than SAME_REQUEST_S: a new request, not the same one delivered twice
        os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    proc.join(15)
    took = time.monotonic() - sent
    if proc.is_alive():
        proc.kill()
    return took, proc.exitcode, (tmp_path / "log").read_text(), before, (out / LATEST).read_bytes()


def test_a_second_sigterm_aborts_within_a_long_kernel_and_keeps_the_checkpoint(data, forker, tmp_path):
    took, code, log, before, after = _abort_in_slow_step(data, forker, tmp_path, second_signal=True)
    assert took < 5 and code == 128 + signal.SIGTERM, (took, code, log)
    assert "SIGTERM again: aborting now, without saving" in log
    assert after == before and load_checkpoint_bytes(after)["iter"] == 3


def test_a_step_that_outlasts_the_grace_period_is_aborted(data, forker, tmp_path):
    took, code, log, before, after = _abort_in_slow_step(data, forker, tmp_path, "train.signal_grace_s=2",
                                                         second_signal=False)
    assert 1.5 < took < 5 and code == 128 + signal.SIGTERM, (took, code, log)
    assert "SIGTERM: the step did not finish within train.signal_grace_s=2 s of the signal" in log
    assert after == before


def test_the_same_signal_delivered_twice_at_once_is_one_request():
    # A scheduler signalling every process while torchrun forwards the signal: two SIGTERMs within
    # milliseconds must not abort the save they ask for. (A subprocess: an abort ends the process.)
    code = textwrap.dedent("""
        import os, signal, time
        from trainer.signals import StopRequest
        before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the parent runs in the background
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print(stop.reason)
        assert signal.getsignal(signal.SIGINT) is before  # handlers put back
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "SIGTERM", result.stdout + result.stderr


def test_max_time_stops_at_the_budget_evaluates_and_saves(data, forker, tmp_path):
    out = tmp_path / "run"
    proc = forker.start(train_args(data, out, "train.max_iters=100000", "train.max_time=1s"), tmp_path / "log")
    proc.join(120)
    log = (tmp_path / "log").read_text()
    assert proc.exitcode == 0, log
    it = load_checkpoint(out / LATEST)["iter"]
    assert 0 < it < 100000
    assert f"train.max_time=1s reached: stopped at iter {it}" in log
    assert f"iter {it}: " in log and "; whole val split, " in log  # evaluated at the stop
    assert it in metrics(out)[1]


def test_sigkill_at_random_moments_never_loses_the_run(data, reference, forker, tmp_path):
    """Kill a training process that checkpoints every step, many times, half of the kills aimed
    at the moment a save is under way; each time latest.pt must load, and resuming from it must
    end exactly where the uninterrupted run ended."""
    out, rng = tmp_path / "run", random.Random(0)
    args = train_args(data, out, "train.ckpt_interval=1", "train.keep_last=3")
    kills_mid_save, last_iter = 0, -1
    for attempt in range(16):
        resume = "resume=true" if (out / LATEST).exists() else "overwrite=true"
        proc = forker.start(args + [resume], tmp_path / f"log{attempt}")
        if attempt % 2 == 0:  # aimed, first: the moment a temporary checkpoint file appears
            deadline = time.monotonic() + 5
            while not (out / (LATEST + ".tmp")).exists() and proc.is_alive() and time.monotonic() < deadline:
                pass
        else:
            time.sleep(rng.uniform(0.1, 0.8))  # short: a fast machine finishes 60 steps in ~2 s
        proc.kill()
        proc.join(30)
        assert proc.exitcode in (-signal.SIGKILL, 0), (tmp_path / f"log{attempt}").read_text()
        if proc.exitcode == 0:  # it finished before the kill
            break
        kills_mid_save += any(out.glob("*.pt.tmp"))
        if (out / LATEST).exists():
            it = load_checkpoint(out / LATEST, for_training=True)["iter"]
            assert it >= last_iter  # never goes back
            last_iter = it
    assert kills_mid_save >= 1, "no kill landed during a save"

    if proc.exitcode != 0:
        proc = forker.start(args + ["resume=true" if (out / LATEST).exists() else "overwrite=true"], tmp_path / "last")
        proc.join(300)
        assert proc.exitcode == 0, (tmp_path / "last").read_text()
    assert metrics(out) == reference
    kept = history(out)
    assert [p.name for p in kept] == ["ckpt-0000058.pt", "ckpt-0000059.pt", "ckpt-0000060.pt"]
    assert all(load_checkpoint(p)["iter"] == int(p.stem[5:]) for p in kept)
    assert (out / BEST).exists() and not list(out.glob("*.tmp"))
