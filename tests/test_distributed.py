"""Data parallelism on CPU with gloo: real torchrun launches of train.py on a tiny model.

The equality tests compare final parameters, not losses: 2 processes (DDP or FSDP2) with
accumulation 2 must end where 1 process with accumulation 4 ends over the same global batches.
Every run's optimizer schedule is pinned (`optim.decay_iters`), so a run stopped at step 3 and
resumed to step 6 follows the same schedule as one that goes straight to 6.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import RandomWindows
from data.loader import TokenSplit
from trainer.config import load_config
from trainer.dist import plan_batches
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BATCH, BLOCK = 4, 32
TINY = ["data.tokenizer=char", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={BLOCK}",
        f"train.batch_size={BATCH}", f"train.tokens_per_step={4 * BATCH * BLOCK}", "train.eval_interval=3",
        "train.eval_batches=2", "train.log_interval=1", "train.device=cpu", "optim.warmup_iters=2",
        "optim.decay_iters=6"]  # configs/small.yaml's Muon (AdamW for embeddings, head and gains)
TIMEOUT_S = 120  # a hang fails the test instead of stalling the suite


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _train(out_dir, prepared, *overrides, nproc=1, script="train.py"):
    corpus = Path(prepared).parent / "corpus.txt"
    if not corpus.exists():  # a small slice keeps the final whole-val-split evaluation short
        corpus.write_text((REPO / "data/tinyshakespeare/input.txt").read_text()[:60_000])
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, script, str(REPO / "configs/small.yaml"), *TINY, f"data.input={corpus}",
           f"data.prepared_dir={prepared}", f"out_dir={out_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _params(out_dir):
    return torch.load(Path(out_dir) / "latest.pt", weights_only=True)["model"]


def _assert_same_params(a_dir, b_dir, atol):
    a, b = _params(a_dir), _params(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders, each trained on first use: one-process references to steps 3 and 6."""
    root = tmp_path_factory.mktemp("dist")
    prepared = root / "prepared"
    cache = {}

    def get(name, *overrides, nproc=1):
        if name not in cache:
            _ok(_train(root / name, prepared, *overrides, nproc=nproc))
            cache[name] = root / name
        return cache[name]

    get.root, get.prepared = root, prepared
    return get


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_accumulation(runs, parallel):
    one = runs("one-3", "train.max_iters=3")
    two = runs(f"{parallel}-3", "train.max_iters=3", f"train.parallel={parallel}", nproc=2)
    _assert_same_params(one, two, atol=1e-5)
    # Only rank 0 writes the metrics: one val line per evaluation, not one per rank. Each rank
    # evaluated its share of the val windows; together they cover what one process does.
    (val_two,) = [row for row in _rows(two) if "val_loss" in row]
    (val_one,) = [row for row in _rows(one) if "val_loss" in row]
    assert val_two["val_tokens"] == val_one["val_tokens"] > 0
    assert val_two["val_loss"] == pytest.approx(val_one["val_loss"], abs=1e-5)


def test_fsdp_checkpoint_loads_in_one_process_for_sampling(runs):
    from sample import load_model
    two = runs("fsdp-3", "train.max_iters=3", "train.parallel=fsdp", nproc=2)
    model, _, _, _ = load_model(str(two), torch.device("cpu"))
    assert not any(hasattr(p, "placements") for p in model.parameters())  # plain tensors, not DTensors


def test_resume_two_process_run_in_one_process(runs):
    two = runs("ddp-3", "train.max_iters=3", "train.parallel=ddp", nproc=2)
    resumed = runs.root / "ddp-3-then-one"
    subprocess.run(["cp", "-r", str(two), str(resumed)], check=True)
    result = _ok(_train(resumed, runs.prepared, "train.max_iters=6", "resume=true"))
    assert "parallel none" in result.stdout and "4 micro-steps × 1 rank" in result.stdout
    straight = runs("one-6", "train.max_iters=6")
    _assert_same_params(straight, resumed, atol=1e-5)


def test_dead_rank_ends_the_job_without_hanging_or_saving(runs, tmp_path):
    # Rank 1 vanishes (as if killed) at the end of its second step, after that step's gradient
    # all-reduce: rank 0 finishes the step and then cannot agree on the next one with a dead peer.
    script, died = tmp_path / "dying_train.py", tmp_path / "died"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from trainer.optim import Optimizers
        real_zero_grad, calls = Optimizers.zero_grad, []
        def zero_grad(self):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 2:
                open({str(died)!r}, "w").write(str(time.time()))
                os._exit(7)
            return real_zero_grad(self)
        Optimizers.zero_grad = zero_grad
        import train
        train.main()
    """))
    result = _train(tmp_path / "out", runs.prepared, "train.max_iters=6", "train.parallel=ddp",
                    "train.dist_timeout_s=60", nproc=2, script=str(script))
    assert result.returncode != 0
    report = result.stdout + result.stderr
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*7", report), report[-3000:]
    assert "rank 0: stopped without saving: the other ranks did not answer" in report, report[-3000:]
    assert time.time() - float(died.read_text()) < 20  # not the 60 s timeout, nor torchrun's 30 s before SIGKILL
    assert not (tmp_path / "out" / "latest.pt").exists()


def test_a_preempted_job_saves_the_current_step_on_every_rank_and_resumes_exactly(runs, tmp_path):
    # SIGTERM to the torchrun launcher, which passes it to both ranks: they agree on a step, save
    # it once (no eval or periodic checkpoint comes before step 1000), and exit.
    out = tmp_path / "preempted"
    corpus = Path(runs.prepared).parent / "corpus.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           str(REPO / "configs/small.yaml"), *TINY, f"data.input={corpus}", f"data.prepared_dir={runs.prepared}",
           f"out_dir={out}", "train.max_iters=1000", "train.eval_interval=1000", "train.parallel=ddp"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not _logged_iters(out) or max(_logged_iters(out)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    saved = torch.load(out / "latest.pt", weights_only=True)["iter"]
    assert saved == max(_logged_iters(out)) >= 3, stdout[-2000:] + stderr[-2000:]  # the step the ranks were at
    assert f"SIGTERM: stopped at iter {saved}, checkpoint saved" in stdout
    end = max(6, saved + 2)  # usually 6: the reference run is then shared with another test
    _ok(_train(out, runs.prepared, f"train.max_iters={end}", "train.eval_interval=1000", "resume=true"))
    _assert_same_params(runs(f"one-{end}", f"train.max_iters={end}"), out, atol=1e-5)


def _logged_iters(out_dir) -> list[int]:
    path = Path(out_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["iter"] for line in lines if line.endswith("}")]


# ---------------------------------------------------------------------------------------------
# The loader and the batch arithmetic, in process


@pytest.fixture(scope="module")
def train_split(runs):
    runs("one-3", "train.max_iters=3")  # prepares the data
    return TokenSplit(runs.prepared, "train")


def _draw(split, rank, world, accum, steps=3, state=None):
    loader = RandomWindows(split, BATCH, BLOCK, seed=5, device=torch.device("cpu"), rank=rank,
                                 world_size=world, grad_accum=accum)
    if state is not None:
        loader.load_state(state)
    batches = [loader.next_batch()[0].numpy() for _ in range(steps * accum)]
    return batches, loader.state()


def test_ranks_read_disjoint_rows_that_make_up_the_one_process_batch(train_split):
    one, _ = _draw(train_split, rank=0, world=1, accum=4)
    r0, _ = _draw(train_split, rank=0, world=2, accum=2)
    r1, _ = _draw(train_split, rank=1, world=2, accum=2)
    for step in range(3):
        rows0 = np.concatenate(r0[2 * step:2 * step + 2])
        rows1 = np.concatenate(r1[2 * step:2 * step + 2])
        assert not {r.tobytes() for r in rows0} & {r.tobytes() for r in rows1}
        assert np.array_equal(np.concatenate([rows0, rows1]), np.concatenate(one[4 * step:4 * step + 4]))


def test_loader_state_continues_on_another_world_size(train_split):
    _, state = _draw(train_split, rank=0, world=2, accum=2, steps=2)
    continued, _ = _draw(train_split, rank=1, world=2, accum=2, steps=1, state=state)
    as_one, _ = _draw(train_split, rank=0, world=1, accum=4, steps=1, state=state)
    assert np.array_equal(np.concatenate(continued), np.concatenate(as_one[2:]))


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_batch_plan_derives_accumulation_and_refuses_impossible_totals():
    plan = plan_batches(_cfg("train.batch_size=4", "train.tokens_per_step=4096").train, 128, 2)
    assert (plan.grad_accum, plan.tokens_per_step) == (4, 4096)
    assert "4 sequences × 128 tokens × 4 micro-steps × 2 ranks = 4,096 tokens/step" == plan.describe()
    with pytest.raises(UserError, match=r"train.tokens_per_step=4096 is not a multiple .* = 1536"):
        plan_batches(_cfg("train.batch_size=4", "train.tokens_per_step=4096").train, 128, 3)
    legacy = plan_batches(_cfg("train.batch_size=4", "train.grad_accum=3").train, 128, 2)
    assert legacy.tokens_per_step == 4 * 128 * 3 * 2


@pytest.mark.parametrize("overrides, message", [
    (["train.tokens_per_step=4096", "train.grad_accum=2"], "train.grad_accum=2 conflicts"),
    (["train.parallel=zero"], "train.parallel='zero' is not one of"),
])
def test_config_refuses_contradictions(overrides, message):
    with pytest.raises(UserError, match=message):
        _cfg(*overrides)


def test_many_processes_without_a_parallel_mode_is_an_error(monkeypatch):
    from trainer.dist import init_distributed
    from trainer.runtime import setup_runtime
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _cfg("train.device=cpu").train
    with pytest.raises(UserError, match="launched as 2 processes but train.parallel=none"):
        init_distributed(cfg, setup_runtime(cfg))


def test_one_process_checkpoint_state_is_what_the_distributed_helpers_give():
    """One process assembles its checkpoint's model and optimizer state without
    torch.distributed.checkpoint; any mode must read it as its own (tied and untied heads,
    AdamW alone and with Muon)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.utils._pytree import tree_flatten

    from model import build_model
    from trainer.dist import full_state
    from trainer.optim import build_optimizers

    for config in ("configs/small.yaml", "configs/classic-cpu.yaml"):
        cfg = load_config(str(REPO / config), ["model.vocab_size=65", "model.n_layer=2", "model.block_size=16"])
        model = build_model(cfg.model)
        optimizers = build_optimizers(model, cfg.optim, "cpu")
        for _ in range(2):
            x = torch.randint(0, 65, (2, 16))
            model(x, x)[1].backward()
            for opt in optimizers.optimizers:
                opt.step()
            optimizers.zero_grad()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        expected = (get_model_state_dict(model, options=opts),
                    get_optimizer_state_dict(model, optimizers.optimizers, options=opts))
        leaves, spec = tree_flatten(full_state(model, optimizers))
        expected_leaves, expected_spec = tree_flatten(expected)
        assert spec == expected_spec
        for a, b in zip(leaves, expected_leaves):
            assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(a, torch.Tensor) else a == b
