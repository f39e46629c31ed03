"""The model interface and what the trainer builds on it: optimizer groups, the schedule, bits
per byte, the family-aware config and init_from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.errors import UserError
from model import GPT, GPTConfig, build_model
from tests.conftest import TINY, run_py
from trainer.checkpoint import load_checkpoint
from trainer.config import OptimConfig, load_config
from trainer.init import grow_rows
from trainer.muon import Muon
from trainer.optim import build_optimizers, lr_multiplier


def tiny(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)


# Optimizer groups -------------------------------------------------------------------------------


def groups_by_lr(opts) -> dict:
    return {(type(opt).__name__, g["lr"], g["weight_decay"]): {id(p) for p in g["params"]}
            for opt in opts.optimizers for g in opt.param_groups}


def test_adamw_groups_decay_matrices_and_embeddings_but_not_vectors():
    model = GPT(tiny(tie_weights=False))
    cfg = OptimConfig(lr=1e-3, embed_lr=0.5, head_lr=0.25, weight_decay=0.1)
    groups = groups_by_lr(build_optimizers(model, cfg, "cpu"))
    ids = lambda *params: {id(p) for p in params}  # noqa: E731
    matrices = ids(*(p for n, p in model.blocks.named_parameters() if p.dim() == 2))
    vectors = ids(*(p for p in model.parameters() if p.dim() == 1))
    assert groups[("AdamW", 1e-3, 0.1)] == matrices
    assert groups[("AdamW", 1e-3, 0.0)] == vectors
    assert groups[("AdamW", 0.5, 0.1)] == ids(model.wte.weight, model.wpe.weight)
    assert groups[("AdamW", 0.25, 0.1)] == ids(model.lm_head.weight)
    every = set().union(*groups.values())
    assert every == ids(*model.parameters()) and sum(map(len, groups.values())) == len(every)  # each once


def test_muon_takes_the_hidden_matrices_only_and_a_tied_head_is_an_embedding():
    model = GPT(tiny(tie_weights=True))
    opts = build_optimizers(model, OptimConfig(optimizer="muon", muon_lr=0.02, lr=1e-3), "cpu")
    muon = [opt for opt in opts.optimizers if isinstance(opt, Muon)]
    assert len(muon) == 1
    assert {id(p) for p in muon[0].param_groups[0]["params"]} == {
        id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert muon[0].param_groups[0]["weight_decay"] == 0.0
    adamw = {id(p) for opt in opts.optimizers if not isinstance(opt, Muon) for g in opt.param_groups
             for p in g["params"]}
    assert id(model.lm_head.weight) in adamw and id(model.wte.weight) in adamw


def test_frozen_parameters_get_no_group():
    model = GPT(tiny())
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    opts = build_optimizers(model, OptimConfig(), "cpu")
    grouped = {id(p) for opt in opts.optimizers for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_the_lr_multiplier_scales_every_group_keeping_their_ratios():
    model = GPT(tiny(tie_weights=False))
    opts = build_optimizers(model, OptimConfig(lr=1e-3, embed_lr=0.5), "cpu")
    opts.set_lr_multiplier(0.5)
    assert sorted(g["lr"] for g in opts.param_groups) == [5e-4, 5e-4, 5e-4, 0.25]


# Learning-rate schedule ---------------------------------------------------------------------------


def test_warmup_is_linear_and_reaches_the_peak():
    cfg = OptimConfig(warmup_iters=10, schedule="constant")
    values = [lr_multiplier(i, cfg, 100) for i in range(12)]
    assert values[0] == pytest.approx(1 / 11) and values[9] == pytest.approx(10 / 11)
    assert all(b > a for a, b in zip(values[:10], values[1:10]))
    assert values[10] == values[11] == 1.0


def test_cosine_falls_from_the_peak_to_the_floor_and_stays_there():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, schedule="cosine")
    floor = 0.1
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx((1 + floor) / 2)  # halfway: the mean
    assert lr_multiplier(110, cfg, 110) == pytest.approx(floor)
    assert lr_multiplier(500, cfg, 110) == pytest.approx(floor)
    values = [lr_multiplier(i, cfg, 110) for i in range(10, 111)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    # decay_iters moves the end independently of max_iters
    assert lr_multiplier(60, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=60), 1000) == \
        pytest.approx(floor)


def test_wsd_is_flat_then_decays_linearly_over_the_final_fraction():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_iters=0, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(0, cfg, 100) == 1.0 and lr_multiplier(80, cfg, 100) == 1.0
    assert lr_multiplier(90, cfg, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.0)


# Config -------------------------------------------------------------------------------------------


def test_an_unknown_arch_lists_the_families():
    with pytest.raises(UserError, match=r"model.arch='transformer' is not one of: ngram, lstm, gpt, rwkv$"):
        load_config("configs/small.yaml", ["model.arch=transformer"])


def test_the_model_section_is_the_family_dataclass_and_remembers_given_keys():
    cfg = load_config("configs/small.yaml", ["model.n_layer=3"])
    assert isinstance(cfg.model, GPTConfig) and cfg.model.n_layer == 3
    assert "model.n_layer" in cfg.given and "model.n_kv_head" not in cfg.given


def test_a_command_line_type_error_names_the_command_line():
    with pytest.raises(UserError, match=r"^command line: model.n_layer must be an integer"):
        load_config("configs/small.yaml", ["model.n_layer=two"])


# Bits per byte ---------------------------------------------------------------------------------------


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_val_bpb_is_val_loss_over_ln2_for_an_ascii_char_corpus(tiny_run):
    rows = [r for r in metrics_rows(tiny_run) if r.get("val_loss") is not None]
    assert rows
    for r in rows:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-9)


def test_val_bpb_divides_by_the_bytes_the_targets_decode_to(tmp_path):
    """A BPE token spans several bytes: bits per byte is the summed nats over ln 2 times the
    bytes of the val targets, computed here from the prepared shards independently."""
    import numpy as np

    from data.loader import TokenSplit
    from data.tokenizer import from_state

    corpus = tmp_path / "c.txt"
    corpus.write_text(open("data/tinyshakespeare/input.txt").read()[:40_000])
    out, prepared = tmp_path / "out", tmp_path / "prepared"
    r = run_py("train.py", "configs/small.yaml", *TINY, "train.max_iters=10", f"out_dir={out}",
               f"data.input={corpus}", f"data.prepared_dir={prepared}", "data.tokenizer=bpe",
               "data.bpe_vocab_size=300")
    assert r.returncode == 0, r.stderr
    final = metrics_rows(out)[-1]
    tokenizer = from_state(load_checkpoint(out / "latest.pt")["tokenizer"])
    val = TokenSplit(prepared, "val")
    T = 32
    n_windows = (val.num_tokens - 1) // T
    targets = np.concatenate([val.read(i * T + 1, T) for i in range(n_windows)])
    nbytes = tokenizer.token_bytes()[targets].sum()
    assert nbytes > 1.3 * len(targets)  # BPE: tokens of several bytes
    nats = final["val_loss"] * len(targets)
    assert final["val_bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


# init_from --------------------------------------------------------------------------------------------


def test_grow_rows_appends_the_mean_row():
    w = torch.arange(12.0).view(4, 3)
    grown = grow_rows(w, 6)
    assert torch.equal(grown[:4], w)
    assert torch.equal(grown[4], w.mean(0)) and torch.equal(grown[5], w.mean(0))


def test_init_from_starts_a_fresh_run_from_the_weights(tiny_run, tiny_corpus, tmp_path):
    out = tmp_path / "ft"
    base = load_checkpoint(tiny_run / "best.pt")
    config = tmp_path / "ft.yaml"  # pins no model key: the base's shape (2 layers, 32 wide) is taken
    config.write_text("train:\n  batch_size: 4\n  log_interval: 1\n")
    r = run_py("train.py", config, "train.max_iters=5", "train.device=cpu", "train.eval_interval=5",
               "train.eval_batches=1", f"init_from={tiny_run}", f"out_dir={out}", f"data.input={tiny_corpus}",
               f"data.prepared_dir={tmp_path / 'prep'}", "model.dropout=0.1", "model.vocab_size=80")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["iter"] == 5 and ckpt["config"]["model"]["n_layer"] == 2 and ckpt["config"]["init_from"]
    assert ckpt["config"]["model"]["vocab_size"] == 80 and ckpt["config"]["model"]["dropout"] == 0.1
    assert ckpt["tokenizer"] == base["tokenizer"]
    assert ckpt["model"]["wte.weight"].shape[0] == 80
    # The first evaluation is the base model's quality, not a random model's.
    first = [r for r in metrics_rows(out) if r.get("val_loss") is not None][0]
    base_val = [r for r in metrics_rows(tiny_run) if r.get("val_loss") is not None][-1]["val_loss"]
    assert first["val_loss"] < base_val + 0.3 < math.log(80)
    r = run_py("train.py", config, "train.max_iters=5", f"init_from={tiny_run}",
               f"out_dir={tmp_path / 'bad'}", f"data.input={tiny_corpus}", "model.n_layer=3")
    assert r.returncode == 2 and "model.n_layer=3" in r.stderr and "shape" in r.stderr
    assert not (tmp_path / "bad" / "latest.pt").exists()


def test_build_model_builds_the_family_of_the_config():
    assert type(build_model(tiny())) is GPT
