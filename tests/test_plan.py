"""The pre-flight plan: the memory estimate, the check that refuses a run that cannot fit, `--dry-run`,
the measured peak in the run's records, time-based checkpoints.

The check is tested against a memory limit given by `GPT_TRAINER_MEMORY_LIMIT_MB` (trainer/memory.py)
rather than a real out-of-memory; the runs are in-process on trainrun's tiny model.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import train
from model import build_model
from model.gpt import GPTConfig
from trainer.checkpoint import history
from trainer.config import load_config
from trainer.dist import Dist, plan_batches
from trainer.memory import LIMIT_ENV, current_rss_bytes
from trainer.plan import check_memory, estimate_run
from trainer.runtime import setup_runtime
from trainrun import make_data, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def saved_for_backward(model, batch: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward, parameters and the
    loss's log-probabilities (counted by logits_bytes) left out."""
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.block_size))
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(x, x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    log_probs = batch * model.cfg.block_size * model.cfg.vocab_size * 4
    return sum(n for ptr, n in storages.items() if ptr not in params) - log_probs


@pytest.mark.parametrize("variant", [
    {},  # GPT-2: learned positions, layernorm, gelu
    {"pos": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True, "tie_weights": False, "bias": False},
    {"mlp": "swiglu", "n_kv_head": 2},
    {"dropout": 0.1},  # on CPU, dropout takes the math attention kernel: context-wide scores per token
])
def test_gpt_activation_estimate_matches_what_autograd_keeps(variant):
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=64, block_size=128, **variant))
    measured = saved_for_backward(model, batch=2)
    assert model.activation_bytes(2, 4) == pytest.approx(measured, rel=0.05)


def _limit_mb(extra_mb: float) -> str:
    return str(round(current_rss_bytes() / 2**20 + extra_mb))


def test_a_run_that_cannot_fit_stops_first_naming_memory_and_a_fitting_batch(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv(LIMIT_ENV, _limit_mb(300))  # this process's memory plus 300 MB
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(data, out, "train.batch_size=20000"))  # ~3 GB of activations
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"not enough memory: the run needs about [\d.]+ GB at its peak \(estimate\) and the device "
                     r"has [\d.]+ GB \(GPT_TRAINER_MEMORY_LIMIT_MB=\d+\)", err), err
    assert "train.activation_checkpointing=true" in err and "model.block_size" in err
    assert not out.exists()  # it stopped before the run folder, the data and the model

    # The named batch passes the check (keeping the tokens per step); a small run goes ahead.
    batch, accum = map(int, re.search(r"train.batch_size=(\d+) train.grad_accum=(\d+)", err).groups())
    assert batch * accum == 20000 * 2 and 1 < batch < 20000
    cfg = load_config(train_args(data, out)[0], train_args(data, out, f"train.batch_size={batch}",
                                                            f"train.grad_accum={accum}")[1:])
    rt = setup_runtime(cfg.train)
    check_memory(cfg, rt, Dist(), plan_batches(cfg.train, cfg.model.block_size, 1))
    train.main(train_args(data, out, "train.max_iters=2"))
    assert "done: 2 iterations" in capsys.readouterr().out


def test_a_run_within_ten_percent_of_the_limit_warns(data, tmp_path, monkeypatch):
    cfg = load_config(train_args(data, tmp_path)[0], train_args(data, tmp_path)[1:])
    rt, batch = setup_runtime(cfg.train), plan_batches(cfg.train, cfg.model.block_size, 1)
    peak = estimate_run(cfg, rt, Dist(), batch).footprint.peak
    lines = []
    monkeypatch.setenv(LIMIT_ENV, str(peak * 1.05 / 2**20))
    check_memory(cfg, rt, Dist(), batch, log=lines.append)
    monkeypatch.setenv(LIMIT_ENV, str(peak * 1.3 / 2**20))
    check_memory(cfg, rt, Dist(), batch, log=lines.append)
    assert lines[0].startswith("warning: memory is tight: the run needs about") and lines[1].startswith("memory: ")


def test_a_lora_run_is_estimated_with_state_for_its_adapters_only(data, tmp_path):
    def estimate(*overrides):
        args = train_args(data, tmp_path, "optim.optimizer=adamw", *overrides)
        cfg = load_config(args[0], args[1:])
        rt, batch = setup_runtime(cfg.train), plan_batches(cfg.train, cfg.model.block_size, 1)
        return estimate_run(cfg, rt, Dist(), batch, vocab=64)

    full, lora = estimate(), estimate("lora.rank=4")
    adapters = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    assert 0 < adapters < full.model.num_params() / 4
    assert lora.footprint.optimizer == 8 * adapters  # AdamW's two float32 states
    assert lora.footprint.gradients == 4 * adapters
    assert full.footprint.optimizer == 8 * full.model.num_params()
    assert lora.footprint.weights - full.footprint.weights == 4 * adapters  # the frozen weights stay


def test_dry_run_prints_the_plan_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(data, out, "train.max_iters=500", "--dry-run"))
    printed = capsys.readouterr().out
    for expected in (r"plan: .*model.n_embd=32", r"model: gpt, [\d.]+M parameters, [\d.]+ MFLOP/token",
                     r"batch: 4 sequences × 32 tokens × 2 micro-steps × 1 rank = 256 tokens/step; 500 steps",
                     r"data: train 2[67],\d{3} tokens, val 3,\d{3} .*; the run reads [\d.]+ epochs",
                     r"memory: [\d.]+ GB \(runtime", r"time: [\d.]+ s per step .* for 500 steps",
                     rf"nothing written to {re.escape(str(out))}"):
        assert re.search(expected, printed), (expected, printed)
    assert not out.exists()


def test_runs_record_their_peak_memory_and_checkpoint_on_the_clock(data, tmp_path, capsys):
    out = tmp_path / "run"
    # A clock interval shorter than a step: a checkpoint at every step (kept as history), though
    # the step-based interval and the evaluations would save only at the end.
    train.main(train_args(data, out, "train.max_iters=4", "train.eval_interval=100", "train.ckpt_time_interval=0.001s",
                          "train.keep_last=10"))
    assert [p.name for p in history(out)] == [f"ckpt-000000{i}.pt" for i in range(1, 5)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["peak_mem_mb"] > 50 for row in rows if "num_params" not in row)  # the torch runtime alone is more
    assert re.search(r"done: 4 iterations .*; peak memory [\d,]+ MiB", capsys.readouterr().out)
