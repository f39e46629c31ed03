"""Model families by name (`model.arch`), each a config dataclass and a model (model/base.py).

Adding a family: write `model/<name>.py` with a `ModelConfig` subclass and a `LanguageModel`
subclass, add one line to FAMILIES, and a config in `configs/` that sets `model.arch: <name>`.
Nothing else changes: the trainer, sampler, optimizer and distributed code use the interface.
"""

from __future__ import annotations

from common.errors import UserError
from model.base import IGNORE, LanguageModel, ModelConfig, padded_vocab
from model.gpt import GPT, GPTConfig
from model.lstm import LSTM, LSTMConfig
from model.ngram import Ngram, NgramConfig
from model.rwkv import RWKV, RWKVConfig

# In the order the history of language models met them.
FAMILIES: dict[str, tuple[type[ModelConfig], type[LanguageModel]]] = {
    "ngram": (NgramConfig, Ngram),
    "lstm": (LSTMConfig, LSTM),
    "gpt": (GPTConfig, GPT),
    "rwkv": (RWKVConfig, RWKV),
}


def config_class(arch: str) -> type[ModelConfig]:
    if arch not in FAMILIES:
        raise UserError(f"model.arch={arch!r} is not one of: {', '.join(FAMILIES)}")
    return FAMILIES[arch][0]


def build_model(cfg: ModelConfig) -> LanguageModel:
    return FAMILIES[cfg.arch][1](cfg)


__all__ = ["FAMILIES", "GPT", "GPTConfig", "IGNORE", "LSTM", "LSTMConfig", "LanguageModel", "ModelConfig", "Ngram",
           "NgramConfig", "RWKV", "RWKVConfig", "build_model", "config_class", "padded_vocab"]
