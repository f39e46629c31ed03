"""`init_from`: start a fresh run from existing weights (fine-tuning), not from a random model.

    python train.py configs/sft.yaml init_from=out/base

The source is a run folder (its best.pt, else latest.pt), a checkpoint file, or a Hugging Face model
(a folder with config.json, or hf:NAME), imported in memory by model/convert.py into the same
checkpoint dict an imported run folder holds, so everything below treats them alike. The new run takes
the source's weights, model config and tokenizer, and starts everything else afresh: optimizer,
schedule, data position, iteration 0. (`resume=true` is the other thing: continue a run.)

Design decisions:
- The model config is the source's, so a fine-tuning config need not repeat (or know) the base's
  shape. Model keys the user sets explicitly are applied on top when they leave every weight's
  shape as it is (dropout, soft-capping, ...); one that would change a shape is refused by name.
  Shapes are compared on a model built on the meta device, so no rule per key can go stale.
- The vocabulary may grow, never shrink: an explicit larger `model.vocab_size`, or a tokenizer
  with more tokens than the source's model has rows (special tokens added for chat), appends
  rows to every tensor indexed by token id (the family's `vocab_tensors`), each new row the
  mean of the existing rows, which keeps the new tokens' logits ordinary instead of random.
- The data is prepared with the source's tokenizer, whatever `data.tokenizer` says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from data.tokenizer import from_state
from model import FAMILIES, build_model, config_class, padded_vocab
from trainer.checkpoint import find_checkpoint, load_checkpoint


@dataclass
class InitWeights:
    model_cfg: object  # the family's ModelConfig, vocab_size resolved
    tokenizer: object
    state: dict  # model weights, grown to model_cfg.vocab_size
    source: Path


def explicit_model_keys(cfg, saved: dict, source: str) -> tuple[dict, dict]:
    """(the saved model config with the user's explicit model keys applied, those keys)."""
    arch = saved.get("arch", "gpt")
    if "model.arch" in cfg.given and cfg.model.arch != arch:
        raise UserError(f"init_from={source}: its model is model.arch={arch}, not {cfg.model.arch}")
    fields = {f.name for f in dataclasses.fields(config_class(arch))}
    merged, explicit = dict(saved), {}
    for key in cfg.given:
        name = key.removeprefix("model.")
        if key.startswith("model.") and name != "arch":
            if name not in fields:
                raise UserError(f"init_from={source}: model.{name} does not apply to its model.arch={arch}")
            explicit[name] = merged[name] = getattr(cfg.model, name)
    return merged, explicit


def resumed_model_config(cfg, ckpt: dict):
    """The model config of an init_from run being resumed: its checkpoint's, with the user's
    explicit model keys applied (so the resume check sees what the user changed, not defaults)."""
    merged, _ = explicit_model_keys(cfg, ckpt["config"]["model"], cfg.init_from)
    return config_class(merged.get("arch", "gpt"))(**merged)


def load_init(cfg) -> InitWeights:
    """The weights, model config and tokenizer that `cfg.init_from` names, with the user's explicit
    model keys applied."""
    ckpt, path = read_source(cfg.init_from)
    saved = ckpt["config"]["model"]
    merged, explicit = explicit_model_keys(cfg, saved, cfg.init_from)
    arch = merged.get("arch", "gpt")
    if not FAMILIES[arch][1].trainable:
        raise UserError(f"init_from={cfg.init_from}: its model (model.arch={arch}) is counted, not trained: it has no "
                        f"weights to start from; count a new run instead")
    model_cls = config_class(arch)
    tokenizer = from_state(ckpt["tokenizer"])
    old_vocab = saved["vocab_size"]
    asked = explicit.get("vocab_size", 0)
    if asked and asked < old_vocab:
        raise UserError(f"model.vocab_size={asked} is smaller than init_from's {old_vocab}; a vocabulary can "
                        f"only grow")
    merged["vocab_size"] = max(old_vocab, asked, padded_vocab(tokenizer.vocab_size))
    model_cfg = model_cls(**merged)
    model_cfg.validate()

    with torch.device("meta"):
        model = build_model(model_cfg)
    state = dict(ckpt["model"])
    grown = set(model.vocab_tensors)
    changed = [k for k, t in model.state_dict().items()
               if k not in state or (k not in grown and state[k].shape != t.shape)
               or (k in grown and state[k].shape[1:] != t.shape[1:])]
    changed += [k for k in state if k not in model.state_dict()]
    if changed:
        culprits = [f"model.{k}={v!r}" for k, v in explicit.items() if v != saved.get(k) and k != "vocab_size"]
        raise UserError(f"init_from={cfg.init_from}: {' '.join(culprits) or 'the model config'} would change the "
                        f"shape of its weights ({', '.join(changed[:3])}); fine-tuning keeps the base's shape")
    for name in grown & state.keys():
        state[name] = grow_rows(state[name], model_cfg.vocab_size)
    return InitWeights(model_cfg, tokenizer, state, path)


def read_source(source: str) -> tuple[dict, Path | str]:
    """(checkpoint dict, where it came from) for a run folder, checkpoint file or Hugging Face model."""
    from model.convert import imported_checkpoint, is_hf_source

    if is_hf_source(source):
        return imported_checkpoint(source), source
    path = find_checkpoint(source)
    return load_checkpoint(path, mmap=True), path


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight with rows appended up to `rows`, each the mean of the existing ones."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, *weight.shape[1:])], dim=0)
