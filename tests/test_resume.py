"""Never lose a run, tested on real training processes: exact resume, SIGTERM/SIGINT, the time
budget, and SIGKILL at random moments (saves included) followed by a resume each time.

Every process trains the same tiny model (trainrun.TINY: dropout on, so the torch RNG matters;
grad_accum 2; a loss logged every step), so each run's metrics.jsonl can be compared, loss for
loss, with one uninterrupted reference run: equality of floats read back from JSON is
bit-for-bit equality.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from trainer.checkpoint import BEST, LATEST, history, load_checkpoint
from trainer.signals import StopRequest
from trainrun import Forker, make_data, metrics, popen_train, train_args


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


def test_a_second_sigint_aborts_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM only repeats the request
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


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
