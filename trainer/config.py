"""The one config schema: typed dataclasses, filled from YAML plus `key=value` overrides.

Design decisions:
- Every knob is a dataclass field with its default and a one-line comment; this file is the
  reference for what a config may say. YAML sections map onto the section dataclasses, and a
  dotted command-line override (`model.n_layer=2`) addresses the same field.
- Values are checked against the field's annotated type (a YAML `1e-3`, which YAML reads as a
  string, is accepted for a float field), then each section's `validate` checks what types
  cannot (ranges, divisibility, choices). Every failure is a `UserError` naming the key.
- An unknown key is an error, never silently ignored, with the closest valid key suggested:
  a misspelt `n_layers` that trains the default model is an hour lost.
- The resolved config round-trips through `to_dict`/`from_dict`; it is written next to the
  run and into every checkpoint, so a checkpoint alone rebuilds its model and tokenizer.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer (padded up to a multiple of 64 on GPU)
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int = 0  # key/value heads: 0 = n_head; fewer gives grouped-query, 1 multi-query
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms
    pos: str = "learned"  # learned | rope
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu | relu2
    mlp_hidden: int = 0  # MLP width: 0 = 4*n_embd (gelu, relu2) or 8/3*n_embd rounded to 64 (swiglu)
    qk_norm: bool = False  # normalise queries and keys per head before attention
    tie_weights: bool = True  # LM head shares the token embedding matrix
    logit_softcap: float = 0.0  # 0 = off; else logits = c * tanh(logits / c)

    def validate(self):
        _positive(self, "model", "block_size", "n_layer", "n_head", "n_embd")
        _at_least(self, "model", 0, "vocab_size", "n_kv_head", "mlp_hidden", "logit_softcap")
        _in_range(self, "model", "dropout", 0.0, 1.0, high_open=True)
        _choice(self, "model", "pos", ("learned", "rope"))
        _choice(self, "model", "norm", ("layernorm", "rmsnorm"))
        _choice(self, "model", "mlp", ("gelu", "swiglu", "relu2"))
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"model.pos=rope needs an even head size; n_embd/n_head = {self.n_embd // self.n_head}")
        if self.rope_base <= 1:
            raise UserError(f"model.rope_base={self.rope_base} must be > 1")


@dataclass
class DataConfig:
    input: list[str] = field(default_factory=lambda: ["data/tinyshakespeare/input.txt"])  # files, folders, globs, hf:NAME
    tokenizer: str = "char"  # char | gpt2 | r50k_base | cl100k_base | o200k_base | bpe (trained on the corpus)
    prepared_dir: str = ""  # where token shards go; "" = data/prepared/<input>-<tokenizer>
    val_fraction: float = 0.1  # share of the corpus held out for validation
    text_field: str = "text"  # the text field of .jsonl / .parquet / hf: records
    bpe_vocab_size: int = 4096  # tokenizer=bpe: vocabulary size, the end-of-text token included
    bpe_sample_mb: float = 100.0  # tokenizer=bpe: MB of training text it learns from; 0 = all
    prep_workers: int = 0  # encoding threads during prep; 0 = all cores
    sampling: str = "random"  # random (windows at random positions) | epoch (each window once per epoch)

    def validate(self):
        from data.tokenizer import TOKENIZERS

        if not self.input:
            raise UserError("data.input is empty; give at least one text file")
        _in_range(self, "data", "val_fraction", 0.0, 1.0, low_open=True, high_open=True)
        _choice(self, "data", "tokenizer", TOKENIZERS)
        _choice(self, "data", "sampling", ("random", "epoch"))
        _at_least(self, "data", 257, "bpe_vocab_size")  # 256 bytes + the end-of-text token
        _at_least(self, "data", 0, "bpe_sample_mb", "prep_workers")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden 2-D weights, AdamW on the rest)
    lr: float = 1e-3  # peak AdamW learning rate (hidden weights, norms, biases)
    embed_lr: float = 0.0  # AdamW lr for the token/position embeddings (and a tied head); 0 = lr
    head_lr: float = 0.0  # AdamW lr for an untied LM head; 0 = lr
    muon_lr: float = 0.02  # Muon lr for hidden 2-D weights when optimizer=muon
    muon_momentum: float = 0.95
    min_lr: float = 1e-4  # the schedule's floor for lr; other groups decay by the same ratio
    weight_decay: float = 0.1  # decoupled; 2-D weights only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    adamw_impl: str = "auto"  # auto (fused where supported) | fused | foreach
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant; all with linear warmup
    warmup_iters: int = 100
    decay_iters: int = 0  # step at which the decay reaches min_lr; 0 = train.max_iters
    decay_fraction: float = 0.2  # wsd: final share of decay_iters spent decaying linearly

    def validate(self):
        _at_least(self, "optim", 0.0, "lr", "embed_lr", "head_lr", "muon_lr", "min_lr", "weight_decay", "eps")
        _at_least(self, "optim", 0, "warmup_iters", "decay_iters")
        for key in ("beta1", "beta2", "muon_momentum"):
            _in_range(self, "optim", key, 0.0, 1.0, high_open=True)
        _in_range(self, "optim", "decay_fraction", 0.0, 1.0)
        _choice(self, "optim", "optimizer", ("adamw", "muon"))
        _choice(self, "optim", "adamw_impl", ("auto", "fused", "foreach"))
        _choice(self, "optim", "schedule", ("cosine", "wsd", "constant"))
        if self.min_lr > self.lr:
            raise UserError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}")


@dataclass
class TrainConfig:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 where supported, else fp16 on GPU; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = True  # torch.compile the model on CUDA (falls back to eager if it fails); CPU stays eager
    attention: str = "auto"  # auto | flash | cudnn | efficient | math: the only attention kernel family allowed on CUDA; auto = PyTorch's pick
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    seed: int = 1337
    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_interval: int = 250  # steps between val-loss estimates (and checkpoints)
    eval_batches: int = 20  # batches per periodic estimate; 0 = the whole split
    log_interval: int = 10  # steps between progress-bar / metrics updates
    stop_at_val_loss: float = 0.0  # stop at the first evaluation at or below this val loss; 0 = off
    parallel: str = "none"  # none | ddp | fsdp (FSDP2: sharded parameters, gradients, optimizer state); under torchrun
    tokens_per_step: int = 0  # all ranks' tokens per optimizer step, derives grad_accum; 0 = batch*block*accum*world
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    dist_timeout_s: int = 300  # a collective waiting longer than this ends the job with an error
    ckpt_interval: int = 0  # steps between checkpoints (latest.pt); 0 = at every eval
    keep_last: int = 0  # also keep the newest N checkpoints as ckpt-<iter>.pt; 0 = none
    max_time: str = ""  # wall-clock budget of this process, e.g. 90s, 5m, 2h, 1d; "" = none
    max_bad_steps: int = 10  # stop after more than this many skipped updates in a row
    spike_z: float = 0.0  # skip an update whose loss or grad norm is this many std above its recent mean; 0 = off
    spike_window: int = 128  # recent good steps the spike guard's mean and std are taken over

    def validate(self):
        _positive(self, "train", "batch_size", "grad_accum", "max_iters", "eval_interval", "log_interval",
                  "dist_timeout_s", "spike_window")
        _at_least(self, "train", 0, "threads", "eval_batches", "grad_clip", "tokens_per_step", "stop_at_val_loss",
                  "ckpt_interval", "keep_last", "max_bad_steps", "spike_z")
        _choice(self, "train", "parallel", ("none", "ddp", "fsdp"))
        _choice(self, "train", "attention", ("auto", "flash", "cudnn", "efficient", "math"))
        parse_duration(self.max_time, "train.max_time")
        if self.tokens_per_step and self.grad_accum != 1:
            raise UserError(f"train.grad_accum={self.grad_accum} conflicts with train.tokens_per_step="
                            f"{self.tokens_per_step}: accumulation is derived from tokens_per_step; "
                            f"leave grad_accum at 1")
        _choice(self, "train", "dtype", ("auto", "float32", "bfloat16", "float16"))
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"train.device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "out"  # run folder: config.yaml, metrics.jsonl, checkpoints
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    overwrite: bool = False  # start afresh even if out_dir already holds a run

    def validate(self) -> "Config":
        for section in (self.model, self.data, self.optim, self.train):
            section.validate()
        if not self.out_dir:
            raise UserError("out_dir is empty")
        if self.resume and self.overwrite:
            raise UserError("resume=true and overwrite=true contradict each other; pick one")
        if self.train.parallel == "fsdp" and self.optim.optimizer == "muon":
            raise UserError("optim.optimizer=muon does not work with train.parallel=fsdp (Newton-Schulz needs whole "
                            "matrices, FSDP holds shards); use train.parallel=ddp or optim.optimizer=adamw")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        return _build(cls, d, source, prefix="").validate()


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """YAML file (or the defaults when path is None) plus dotted `key=value` overrides."""
    raw = _read_yaml(path) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"command line: expected key=value, got {item!r}")
        key = key.strip()
        tp = _field_type(key)
        if tp is None:
            raise _unknown_key(key, "command line")
        _set_dotted(raw, key, _coerce(_parse_scalar(value), tp, key, "command line"), "command line")
    return Config.from_dict(raw, source=path or "config")


def parse_duration(text: str, key: str) -> float | None:
    """Seconds in a duration such as `90s`, `5m`, `2h`, `1d` or a bare number of seconds; None for ""."""
    if not text.strip():
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise UserError(f"{key}={text!r} is not a positive duration like 90s, 5m, 2h or 1d")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


# ---------------------------------------------------------------------------------------------
# Reading and type-checking


def _field_type(key: str):
    """The annotated type of a dotted leaf key, or None if there is no such key."""
    cls, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
        else:
            return tp if i == len(parts) - 1 else None
    return None


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def _parse_scalar(text: str):
    if text.strip() == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value, source: str):
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: {key!r} goes inside {part!r}, which is not a section")
        node = child
    node[parts[-1]] = value


def _unknown_key(key: str, source: str) -> UserError:
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    guess = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not guess:  # a bare `n_layer=2` or a key in the wrong section
        guess = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if not guess:
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        guess = [leaves[close[0]]] if close else []
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    return UserError(f"{source}: unknown key {key!r}{hint}")


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key(prefix + str(key), source)
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, source, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, source)
    return cls(**kwargs)


def _coerce(value, tp, key: str, source: str):
    def bad(expected):
        return UserError(f"{source}: {key} must be {expected}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise bad("a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    raise TypeError(f"config field {key} has unsupported type {tp}")


# ---------------------------------------------------------------------------------------------
# Value checks, each naming the key


def _positive(section, name, *keys):
    for k in keys:
        v = getattr(section, k)
        if v <= 0:
            raise UserError(f"{name}.{k}={v} must be >= 1" if isinstance(v, int) else f"{name}.{k}={v} must be > 0")


def _at_least(section, name, low, *keys):
    for k in keys:
        v = getattr(section, k)
        if v < low:
            raise UserError(f"{name}.{k}={v} must be >= {low}")


def _in_range(section, name, key, low, high, low_open=False, high_open=False):
    v = getattr(section, key)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise UserError(f"{name}.{key}={v} must be in {lb}{low}, {high}{hb}")


def _choice(section, name, key, allowed):
    v = getattr(section, key)
    if v not in allowed:
        raise UserError(f"{name}.{key}={v!r} is not one of: {', '.join(allowed)}")
