"""The one config schema: typed dataclasses, filled from YAML plus `key=value` overrides.

Design decisions:
- Every knob is a dataclass field with its default and a one-line comment; this file is the
  reference for what a config may say, except the `model` section, whose dataclass is the
  family's own (`model.arch` picks it: model/gpt.py's GPTConfig, ...). YAML sections map onto
  the section dataclasses, and a dotted command-line override (`model.n_layer=2`) addresses the
  same field. Overrides are applied to the YAML before anything is built, so `model.arch=lstm`
  on the command line picks the family whose keys the rest of the section is checked against.
- Values are checked against the field's annotated type (a YAML `1e-3`, which YAML reads as a
  string, is accepted for a float field), then each section's `validate` checks what types
  cannot (ranges, divisibility, choices). Every failure is a `UserError` naming the key.
- An unknown key is an error, never silently ignored, with the closest valid key suggested:
  a misspelt `n_layers` that trains the default model is an hour lost. A key of another model
  family (`model.pos` for the n-gram) is named as such.
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

from common.checks import at_least, choice, in_range, positive
from common.errors import UserError
from model import FAMILIES, ModelConfig, config_class
from model.gpt import GPTConfig


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
    sampling: str = "random"  # random (windows at random positions) | epoch (each window once per epoch); text only
    format: str = "text"  # text (documents) | chat (conversations in JSONL, trained on assistant turns; data/conversations.py) | preference (chosen/rejected pairs for DPO; data/preferences.py)

    def validate(self):
        from data.tokenizer import TOKENIZERS

        if not self.input:
            raise UserError("data.input is empty; give at least one text file")
        in_range(self, "data", "val_fraction", 0.0, 1.0, low_open=True, high_open=True)
        choice(self, "data", "tokenizer", TOKENIZERS)
        choice(self, "data", "sampling", ("random", "epoch"))
        choice(self, "data", "format", ("text", "chat", "preference"))
        at_least(self, "data", 257, "bpe_vocab_size")  # 256 bytes + the end-of-text token
        at_least(self, "data", 0, "bpe_sample_mb", "prep_workers")


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
        at_least(self, "optim", 0.0, "lr", "embed_lr", "head_lr", "muon_lr", "min_lr", "weight_decay", "eps")
        at_least(self, "optim", 0, "warmup_iters", "decay_iters")
        for key in ("beta1", "beta2", "muon_momentum"):
            in_range(self, "optim", key, 0.0, 1.0, high_open=True)
        in_range(self, "optim", "decay_fraction", 0.0, 1.0)
        choice(self, "optim", "optimizer", ("adamw", "muon"))
        choice(self, "optim", "adamw_impl", ("auto", "fused", "foreach"))
        choice(self, "optim", "schedule", ("cosine", "wsd", "constant"))
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
    objective: str = "lm"  # lm (next-token loss on the targets) | dpo (preference pairs; trainer/objectives.py)
    batch_size: int = 12  # sequences per micro-batch (objective=dpo: preference pairs, two sequences each)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_interval: int = 250  # steps between val-loss estimates (and checkpoints)
    eval_batches: int = 20  # batches per periodic estimate (a fixed sample of val windows); 0 = a full evaluation
    final_eval_tokens: int = 1_000_000  # a full evaluation (the final one, stop checks) covers at most this many val tokens (a fixed sample of windows); 0 = the whole split
    log_interval: int = 10  # steps between progress-bar / metrics updates
    stop_at_val_loss: float = 0.0  # stop at the first full evaluation at or below this val loss; 0 = off
    stop_margin: float = 0.05  # with stop_at_val_loss: a periodic estimate within this of it triggers a full evaluation, which decides
    parallel: str = "none"  # none | ddp | fsdp (FSDP2: sharded parameters, gradients, optimizer state); under torchrun
    tokens_per_step: int = 0  # all ranks' tokens per optimizer step, derives grad_accum; 0 = batch*block*accum*world
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    dist_timeout_s: int = 300  # a collective waiting longer than this ends the job with an error
    ckpt_interval: int = 0  # steps between checkpoints (latest.pt); 0 = at every eval
    ckpt_time_interval: str = "auto"  # wall-clock time between checkpoints, e.g. 30m, 2h; auto = 30m under ddp|fsdp, else off; "" = off
    keep_last: int = 0  # also keep the newest N checkpoints as ckpt-<iter>.pt; 0 = none
    max_time: str = ""  # wall-clock budget of this process, e.g. 90s, 5m, 2h, 1d; "" = none
    max_bad_steps: int = 10  # stop after more than this many skipped updates in a row
    spike_z: float = 0.0  # skip an update whose loss or grad norm is this many std above its recent mean; 0 = off
    spike_window: int = 128  # recent good steps the spike guard's mean and std are taken over
    tensorboard: bool = False  # also log metrics.jsonl's scalars to out_dir/tensorboard (extra [tensorboard])
    signal_grace_s: float = 60.0  # after SIGTERM/SIGINT, a step not finished within this many seconds is aborted unsaved
    memory_check: bool = True  # estimate the peak memory before starting and refuse a run that cannot fit (trainer/plan.py)

    def validate(self):
        positive(self, "train", "batch_size", "grad_accum", "max_iters", "eval_interval", "log_interval",
                  "dist_timeout_s", "spike_window")
        at_least(self, "train", 0, "threads", "eval_batches", "final_eval_tokens", "grad_clip", "tokens_per_step",
                  "stop_at_val_loss", "stop_margin", "ckpt_interval", "keep_last", "max_bad_steps", "spike_z")
        choice(self, "train", "parallel", ("none", "ddp", "fsdp"))
        choice(self, "train", "objective", ("lm", "dpo"))
        choice(self, "train", "attention", ("auto", "flash", "cudnn", "efficient", "math"))
        parse_duration(self.max_time, "train.max_time")
        self.ckpt_period_s()
        positive(self, "train", "signal_grace_s")
        if self.tokens_per_step and self.grad_accum != 1:
            raise UserError(f"train.grad_accum={self.grad_accum} conflicts with train.tokens_per_step="
                            f"{self.tokens_per_step}: accumulation is derived from tokens_per_step; "
                            f"leave grad_accum at 1")
        choice(self, "train", "dtype", ("auto", "float32", "bfloat16", "float16"))
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"train.device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")


    def ckpt_period_s(self) -> float | None:
        """Seconds between time-based checkpoints, or None when off."""
        if self.ckpt_time_interval == "auto":
            return 30 * 60.0 if self.parallel != "none" else None
        return parse_duration(self.ckpt_time_interval, "train.ckpt_time_interval")


@dataclass
class LoraConfig:
    rank: int = 0  # rank of the low-rank adapters; 0 = full fine-tuning (no adapters)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # attn | mlp | head: the projections adapted

    def validate(self):
        at_least(self, "lora", 0, "rank")
        in_range(self, "lora", "dropout", 0.0, 1.0, high_open=True)
        positive(self, "lora", "alpha")
        if self.rank and not self.targets:
            raise UserError("lora.targets is empty; name the projections to adapt (attn, mlp, head)")
        if len(set(self.targets)) != len(self.targets):
            raise UserError(f"lora.targets={self.targets} names a projection twice")


@dataclass
class DPOConfig:
    beta: float = 0.1  # objective=dpo: how far the policy may move from the reference (the KL penalty's inverse weight)
    # Weight of the chosen replies' next-token loss (nats per token) added to DPO's (RPO, Pang et
    # al., 2024): it keeps the chosen replies likely while the pair's margin grows. 0: plain DPO.
    nll: float = 0.0

    def validate(self):
        positive(self, "dpo", "beta")
        at_least(self, "dpo", 0, "nll")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=GPTConfig)  # the family's own dataclass, by model.arch
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    out_dir: str = "out"  # run folder: config.yaml, metrics.jsonl, checkpoints
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    overwrite: bool = False  # start afresh even if out_dir already holds a run
    init_from: str = ""  # start afresh from these weights: run folder, checkpoint, HF folder, hf:NAME (trainer/init.py);
    # with resume=true (the same command again), the run continues from its own checkpoint

    given = frozenset()  # not a field: the dotted keys the YAML file or command line set (load_config)

    def validate(self) -> "Config":
        for section in (self.model, self.data, self.optim, self.train, self.lora, self.dpo):
            section.validate()
        if not self.out_dir:
            raise UserError("out_dir is empty")
        if self.resume and self.overwrite:
            raise UserError("resume=true and overwrite=true contradict each other; pick one")
        if (self.train.objective == "dpo") != (self.data.format == "preference"):
            raise UserError(f"train.objective={self.train.objective} with data.format={self.data.format}: DPO trains on "
                            f"preference pairs and only on them (train.objective=dpo with data.format=preference)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        return _build(cls, d, source, prefix="").validate()


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """YAML file (or the defaults when path is None) plus dotted `key=value` overrides. The keys
    the file or the command line set are kept as `cfg.given` (init_from needs to know which
    model keys the user asked for, as opposed to defaults)."""
    raw = _read_yaml(path) if path else {}
    origin = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"command line: expected key=value, got {item!r}")
        key = key.strip()
        _set_dotted(raw, key, _parse_scalar(value), "command line")
        origin[key] = "command line"
    cfg = _build(Config, raw, path or "config", prefix="", origin=origin).validate()
    cfg.given = frozenset(_leaves(raw))
    return cfg


def _leaves(raw: dict, prefix: str = "") -> list[str]:
    return [k for key, v in raw.items()
            for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def parse_duration(text: str, key: str) -> float | None:
    """Seconds in a duration such as `90s`, `5m`, `2h`, `1d` or a bare number of seconds; None for ""."""
    if not text.strip():
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise UserError(f"{key}={text!r} is not a positive duration like 90s, 5m, 2h or 1d")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def all_keys(cls=Config, prefix="") -> list[str]:
    """Every valid dotted key; the model section's are those of every family."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if tp is ModelConfig:
            family_keys = [k for family, _ in FAMILIES.values() for k in all_keys(family, prefix + name + ".")]
            keys += list(dict.fromkeys(family_keys))
        elif dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


# ---------------------------------------------------------------------------------------------
# Reading and type-checking


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


def _build(cls, raw, source: str, prefix: str, origin: dict | None = None):
    """A dataclass from a mapping; a key's errors name the file, or the command line for keys
    set there (`origin`)."""
    origin = origin or {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    if cls is ModelConfig:  # the family's own dataclass
        arch = raw.get("arch", ModelConfig.arch)
        if not isinstance(arch, str):
            raise UserError(f"{origin.get(prefix + 'arch', source)}: {prefix}arch must be a string, got {arch!r}")
        cls = config_class(arch)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = origin.get(prefix + str(key), source)
            if cls in (family for family, _ in FAMILIES.values()):
                owners = [name for name, (family, _) in FAMILIES.items()
                          if key in {f.name for f in dataclasses.fields(family)}]
                if owners:
                    raise UserError(f"{where}: {prefix}{key} does not apply to model.arch={raw.get('arch', 'gpt')} "
                                    f"(it is an option of {', '.join(owners)})")
            raise _unknown_key(prefix + str(key), where)
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, source, prefix + name + ".", origin)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, origin.get(prefix + name, source))
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
