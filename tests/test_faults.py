"""Numerical faults, full disks and bad input.

Bad input: each case must end with exactly one line on stderr that names the culprit, exit
status 2, no traceback, and nothing on disk changed. They run `train.main` / `sample.main`
in-process (the one-line report is the same code path as on the command line, and a stray
exception would fail the test with its traceback); the full-disk case also runs as a real
process writing to a real, tiny filesystem when the machine allows mounting one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sample
import train
from model import GPT
from common import files as files_mod
from trainer.checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from trainer.config import load_config
from common.errors import UserError
from trainer.guard import StepGuard, guarded_step
from trainrun import REPO, Forker, make_data, metrics, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 10-step run (its folder is copied by tests that need to change it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(train_args(data, out, "train.max_iters=10"))
    return out


def snapshot(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def fails(capsys, main, argv, *expected):
    """main(argv) must exit 2 with one stderr line holding every expected fragment (beside
    progress-bar frames, which also go to stderr and are told apart by their carriage returns)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Numerical faults


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_update_leaves_parameters_and_optimizer_state_exactly_as_they_were(fused):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p], lr=0.1, **({"fused": True} if fused else {"foreach": True}))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        p.grad = torch.randn(4, 4)
        guarded_step(opt, scaler, torch.tensor(False))
    before = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    p.grad = torch.full((4, 4), math.nan)
    guarded_step(opt, scaler, torch.tensor(True))
    after = [p.detach()] + list(opt.state[p].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    p.grad = torch.randn(4, 4)
    guarded_step(opt, scaler, torch.tensor(False))
    assert not torch.equal(p.detach(), before[0]) and opt.state[p]["step"].item() == 3


def test_spike_guard_skips_outliers_and_keeps_them_out_of_its_statistics():
    cfg = load_config(None, ["train.spike_z=4", "train.spike_window=8"]).train
    guard = StepGuard(cfg, torch.device("cpu"), scaler_enabled=False)
    normal = [(2.0 + 0.01 * (i % 3), 1.0 + 0.1 * (i % 2)) for i in range(12)]
    assert not any(guard.check(torch.tensor(a), torch.tensor(b)) for a, b in normal)
    assert guard.check(torch.tensor(2.5), torch.tensor(1.0))  # loss far above its window
    assert guard.check(torch.tensor(2.0), torch.tensor(9.0))  # gradient norm far above its window
    assert not guard.check(torch.tensor(2.01), torch.tensor(1.05))
    assert guard.read(15) == 2
    off = StepGuard(load_config(None, []).train, torch.device("cpu"), scaler_enabled=False)
    assert not off.check(torch.tensor(1e6), torch.tensor(1e6))
    assert off.check(torch.tensor(math.inf), torch.tensor(1.0)) and off.check(torch.tensor(1.0), torch.tensor(math.nan))


def nan_losses_at(monkeypatch, steps):
    """Make the training forward return a NaN loss on the given (1-based) optimizer steps."""
    forward, calls = GPT.forward, [0]

    def patched(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if torch.is_grad_enabled():
            calls[0] += 1
            if (calls[0] + 1) // 2 in steps:  # grad_accum=2 micro-batches per step
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", patched)


def test_non_finite_loss_skips_the_update_logs_and_counts_it(data, tmp_path, monkeypatch, capsys):
    nan_losses_at(monkeypatch, {3, 4})
    out = tmp_path / "run"
    train.main(train_args(data, out, "train.max_iters=12"))
    assert "iter 3: skipped 1 update(s)" in capsys.readouterr().out
    rows = {r["iter"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert rows[3]["train_loss"] is None and rows[4]["skipped_steps"] == 2 and rows[12]["skipped_steps"] == 2
    assert all(math.isfinite(rows[i]["train_loss"]) for i in (1, 2, 5, 12))
    state = load_checkpoint(out / LATEST)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(data, tmp_path, monkeypatch,
                                                                                      capsys):
    nan_losses_at(monkeypatch, set(range(13, 100)))
    out = tmp_path / "run"
    fails(capsys, train.main, train_args(data, out, "train.max_bad_steps=3"),
          "4 updates in a row were skipped", "train.max_bad_steps=3")
    state = load_checkpoint(out / LATEST)
    assert state["iter"] == 10 and all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------------------------------------
# Full disk


class FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(run, tmp_path, monkeypatch):
    shutil.copytree(run, tmp_path / "run")
    latest = tmp_path / "run" / LATEST
    before = latest.read_bytes()
    payload = load_checkpoint(latest)
    monkeypatch.setattr(files_mod, "open", lambda path, mode: FullDisk(open(path, mode), 50_000), raising=False)
    with pytest.raises(UserError, match="No space left on device; the previous checkpoint is untouched"):
        save_checkpoint(payload, latest)
    assert latest.read_bytes() == before and not list(latest.parent.glob("*.tmp"))


@pytest.fixture
def tiny_filesystem(tmp_path, run):
    """A real tmpfs with room for one checkpoint and a half: the second save runs out of space."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    size = (run / LATEST).stat().st_size * 3 // 2 + 64 * 1024
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_stops_the_run_with_one_line_and_the_previous_checkpoint(data, tiny_filesystem, tmp_path):
    out = tiny_filesystem / "run"
    proc = Forker().start(train_args(data, out, "train.ckpt_interval=1"), tmp_path / "log")
    proc.join(120)
    log = (tmp_path / "log").read_text()
    assert proc.exitcode == 2, log
    assert log.strip().splitlines()[-1].startswith(f"error: could not write checkpoint {out / LATEST}: "
                                                   f"No space left on device"), log
    assert "Traceback" not in log
    assert load_checkpoint(out / LATEST, for_training=True)["iter"] == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, nothing damaged


@pytest.mark.parametrize("overrides, expected", [
    (["model.n_layers=2"], ["unknown key 'model.n_layers'", "did you mean 'model.n_layer'"]),
    (["model.n_layer=two"], ["model.n_layer must be an integer"]),
    (["model.dropout=1.5"], ["model.dropout=1.5"]),
    (["train.max_time=soon"], ["train.max_time='soon'"]),
    (["train.keep_last=-1"], ["train.keep_last=-1"]),
    (["data.input=/no/such/corpus.txt", "data.prepared_dir="], ["data.input: no such file or folder: /no/such/corpus.txt"]),
])
def test_bad_config_values(data, tmp_path, capsys, overrides, expected):
    fails(capsys, train.main, train_args(data, tmp_path / "run", *overrides), *expected)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model:\n  n_layer: 2\n  n_head: [4\ntrain:\n  seed: 1\n")
    fails(capsys, train.main, [str(tmp_path / "bad.yaml")], "bad.yaml line", "invalid YAML")


def test_a_dataset_shorter_than_the_context(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short for a window of 32 tokens")
    fails(capsys, train.main, train_args((tmp_path / "short.txt", tmp_path / "prep"), tmp_path / "run"),
          "fewer than one context window", "model.block_size=32")


def test_a_fresh_run_into_an_existing_run_is_refused(run, data, capsys):
    before = snapshot(run)
    fails(capsys, train.main, train_args(data, run, "train.max_iters=10"), "already holds a run", "resume=true")
    assert snapshot(run) == before


def test_resume_with_a_changed_config_names_the_keys(run, data, capsys):
    before = snapshot(run)
    fails(capsys, train.main, train_args(data, run, "train.max_iters=10", "resume=true", "model.n_layer=2",
                                         "optim.lr=0.01"),
          "config differs from its checkpoint", "model.n_layer: 1 -> 2", f"optim.lr: {load_config(str(REPO / 'configs/small.yaml')).optim.lr} -> 0.01")
    fails(capsys, train.main, train_args(data, run, "train.max_iters=10", "resume=true", "data.tokenizer=gpt2"),
          "data.tokenizer: 'char' -> 'gpt2'")
    assert snapshot(run) == before


def test_resume_with_safe_changes_is_allowed_and_logged(run, data, tmp_path, capsys):
    shutil.copytree(run, tmp_path / "run")
    train.main(train_args(data, tmp_path / "run", "train.max_iters=12", "train.log_interval=3", "resume=true"))
    out = capsys.readouterr().out
    assert "resume: train.max_iters changed from 10 to 12" in out and "resuming" in out
    assert sorted(metrics(tmp_path / "run")[0]) == list(range(1, 11)) + [12]


def test_resume_of_a_finished_run_says_so(run, data, capsys):
    before = snapshot(run)
    fails(capsys, train.main, train_args(data, run, "train.max_iters=10", "resume=true"),
          "it is at iter 10 and train.max_iters=10")
    assert snapshot(run) == before


def test_resume_refuses_data_whose_tokenizer_changed(run, data, tmp_path, capsys):
    shutil.copytree(run, tmp_path / "run")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(data[0].read_text() + "Жж")
    ckpt = load_checkpoint(tmp_path / "run" / LATEST)
    ckpt["config"]["data"]["input"] = [str(corpus)]
    ckpt["config"]["data"]["prepared_dir"] = str(tmp_path / "prep")
    save_checkpoint(ckpt, tmp_path / "run" / LATEST)
    before = snapshot(tmp_path / "run")
    fails(capsys, train.main, train_args((corpus, tmp_path / "prep"), tmp_path / "run", "train.max_iters=20",
                                         "resume=true"),
          "its tokenizer differs from the prepared data's")
    assert snapshot(tmp_path / "run") == before


def other_architecture(run, tmp_path) -> tuple:
    """A copy of `run` whose latest.pt carries weights of a 2-layer model under its 1-layer config."""
    shutil.copytree(run, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / LATEST)
    cfg = load_config(None, [])
    cfg.model.__dict__.update(ckpt["config"]["model"], n_layer=2)
    ckpt["model"] = GPT(cfg.model).state_dict()
    save_checkpoint(ckpt, tmp_path / "run" / LATEST)
    return tmp_path / "run", ckpt


def test_a_checkpoint_from_another_architecture_is_refused(run, data, tmp_path, capsys):
    folder, _ = other_architecture(run, tmp_path)
    before = snapshot(folder)
    fails(capsys, train.main, train_args(data, folder, "train.max_iters=20", "resume=true"),
          "weights do not fit the model's architecture", "blocks.1")
    fails(capsys, sample.main, ["--ckpt", str(folder / LATEST), "--max-new-tokens", "5"],
          "weights do not fit the model's architecture")
    assert snapshot(folder) == before


def test_sampling_refuses_a_tokenizer_its_model_cannot_hold(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / LATEST)
    ckpt["tokenizer"] = {"kind": "char", "chars": "".join(map(chr, range(32, 32 + 200)))}
    save_checkpoint(ckpt, tmp_path / "mixed.pt")
    fails(capsys, sample.main, ["--ckpt", str(tmp_path / "mixed.pt")], "tokenizer (200 tokens) does not fit")


def test_a_prompt_with_characters_outside_the_char_vocabulary(run, capsys):
    fails(capsys, sample.main, ["--ckpt", str(run), "--prompt", "ROMEO\u20ac"], "not in the char vocabulary", "€")


@pytest.mark.parametrize("damage, expected", [
    ("missing", "checkpoint not found"),
    ("truncated", "corrupt or truncated checkpoint"),
    ("garbage", "corrupt or truncated checkpoint"),
    ("pickled code", "refused to load: not a plain checkpoint"),
])
def test_damaged_checkpoints(run, data, tmp_path, capsys, damage, expected):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    latest, marker = folder / LATEST, tmp_path / "code-ran"
    if damage == "missing":
        latest.unlink()
        (folder / BEST).unlink()
    elif damage == "truncated":
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    elif damage == "garbage":
        latest.write_bytes(os.urandom(4096))
    else:
        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        torch.save({"format": 1, "model": Payload()}, latest)
    before = snapshot(folder)
    fails(capsys, sample.main, ["--ckpt", str(latest)], expected)
    resume_expected = "does not exist" if damage == "missing" else expected
    fails(capsys, train.main, train_args(data, folder, "train.max_iters=10", "resume=true"), resume_expected)
    assert snapshot(folder) == before and not marker.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a read-only tmpfs")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_an_out_dir_that_is_not_writable(data, read_only_dir, capsys):
    fails(capsys, train.main, train_args(data, read_only_dir), f"out_dir='{read_only_dir}' is not writable")


def test_main_entry_points_exit_nonzero_without_traceback_as_processes(tmp_path):
    """The same path through a real interpreter: one line on stderr, exit 2."""
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "nothing.pt")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'nothing.pt'}"]


def test_compile_fallback_catches_compiler_failures_only():
    """A compiler failure falls back to eager with a line; an error of the step itself (out of
    memory, a token id out of range) stops the run with its own message, not retried in eager."""
    from trainer.runtime import compile_with_fallback

    def broken_compiler(gm, example_inputs):
        raise RuntimeError("no working C++ compiler")

    def out_of_memory_at_run_time(gm, example_inputs):
        def run(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return run

    lines = []
    step = compile_with_fallback(lambda x: x.sin() + 1, log=lines.append, backend=broken_compiler)
    assert torch.equal(step(torch.ones(3)), torch.ones(3).sin() + 1)
    assert len(lines) == 1 and "torch.compile failed (RuntimeError: no working C++ compiler)" in lines[0]
    step = compile_with_fallback(lambda x: x.cos() + 1, log=lines.append, backend=out_of_memory_at_run_time)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        step(torch.ones(3))
    embedding = torch.nn.Embedding(4, 2)
    step = compile_with_fallback(embedding, log=lines.append, backend="eager")
    with pytest.raises(IndexError, match="index out of range"):
        step(torch.tensor([7]))
    assert len(lines) == 1  # neither error fell back to eager
