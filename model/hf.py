"""GPT <-> Hugging Face transformers: configs and state dicts, both ways.

    gpt_from_hf(hf_config, tensors, where) -> (GPTConfig, GPT state dict)
    hf_from_gpt(cfg, state, vocab, eot_id)  -> (config.json dict, transformers state dict)

Imports GPT2LMHeadModel (`gpt2`), LlamaForCausalLM (`llama`) and Qwen3ForCausalLM (`qwen3`)
checkpoints; exports the GPT options each of those can hold, and refuses the rest by option
name. Every mapping below is checked against transformers' own forward pass
(tests/test_convert.py), with weights large enough that a swapped or untransposed tensor shows.

Mapping decisions:
- GPT-2 stores its linear layers as Conv1D, (in, out): transposed both ways. Its `gelu_new` is
  the tanh GELU (`model.mlp: gelu_tanh`). The head is tied; `lm_head.weight` is not written.
- Llama: q, k and v are concatenated into `c_attn` in that order (grouped-query attention's
  shared heads follow the queries), gate and up into `c_fc` (gate first, SwiGLU's chunk order).
- Rotary positions: transformers' rotate-half layout pairs dimension i with i + head_dim/2, as
  `apply_rotary` does, but turns the pair by +angle where `apply_rotary` turns it by -angle
  (x1*cos + x2*sin). Negating the second half of every query and key head maps one onto the
  other, and attention scores do not change (both sides flip), so that half of each q and k
  head's rows (and biases) is negated on the way in and on the way out. (`apply_rotary` keeps
  its convention: changing it would silently change every trained rotary checkpoint.)
- Qwen3 is Llama plus an RMSNorm on each query and key head with a learned gain; `model.qk_norm`
  has no gain (a gain of 1), so an export writes ones and an import accepts only ones.
- Norm epsilons travel (`model.norm_eps`): GPT-2's layer_norm_epsilon, Llama's rms_norm_eps.
- Biases: a model with `model.bias` and a format that has some biases but not others (Llama
  with only attention_bias) gets zero biases where the source has none, which is exact; GPT-2
  has biases everywhere, so a bias-free model exports zeros there.
- Vocabulary: an export keeps the tokenizer's rows (the padding to a multiple of 64 is dropped,
  as the sampler never emits it); an import keeps the source's rows (init_from pads them).
- Dropout is 0 on import (transformers configs hold their pretraining dropout); set
  `model.dropout` when fine-tuning.
- Tensors keep their dtype on import (a bf16 checkpoint stays bf16; loading a model casts it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from common.errors import UserError
from model.gpt import GPTConfig
from model.layers import mlp_width

IMPORTABLE = ("gpt2", "llama", "qwen3")


def norm_eps(cfg: GPTConfig) -> float:
    """The epsilon the model's norms use (model/layers.py)."""
    return cfg.norm_eps or (1e-5 if cfg.norm == "layernorm" else 1e-6)


def flip_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Negate the second half of each head's rows: maps transformers' rotary convention onto
    apply_rotary's and back (it is its own inverse)."""
    x = w.reshape(heads, 2, -1, *w.shape[1:]).clone()
    x[:, 1] = -x[:, 1]
    return x.reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Import


class Weights:
    """The source's tensors, taken by name with the shape the config implies; what is left over
    at the end is refused, so nothing is silently dropped."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str, prefix: str, ignore: str):
        self.tensors, self.where, self.prefix = tensors, where, prefix
        self.left = {k for k in tensors if not re.search(ignore, k)}

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors or name in self.tensors

    def take(self, name: str, *shape: int) -> torch.Tensor:
        key = self.prefix + name if self.prefix + name in self.tensors else name
        if key not in self.tensors:
            raise UserError(f"{self.where}: weight {self.prefix + name} is missing")
        t = self.tensors[key]
        self.left.discard(key)
        if tuple(t.shape) != shape:
            raise UserError(f"{self.where}: weight {key} has shape {list(t.shape)} but config.json implies "
                            f"{list(shape)}")
        return t

    def optional(self, name: str, *shape: int) -> torch.Tensor | None:
        return self.take(name, *shape) if self.has(name) else None

    def finish(self, model_type: str):
        if self.left:
            names = sorted(self.left)
            raise UserError(f"{self.where}: weight {names[0]} (and {len(names) - 1} more) has no place in a "
                            f"{model_type} model of this config; refusing rather than dropping it")


def _get(c: dict, key: str, where: str, default=None):
    value = c.get(key, default)
    if value is None:
        raise UserError(f"{where}: config.json has no {key}")
    return value


def _refuse_unless(ok: bool, where: str, what: str):
    if not ok:
        raise UserError(f"{where}: {what}, which this model cannot represent")


def _gpt2_config(c: dict, where: str) -> GPTConfig:
    act = c.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
    _refuse_unless(mlp is not None, where, f"activation_function={act!r}")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        _refuse_unless(not c.get(key), where, f"{key}=true")
    _refuse_unless(c.get("scale_attn_weights", True), where, "scale_attn_weights=false")
    n_embd = _get(c, "n_embd", where)
    return GPTConfig(vocab_size=_get(c, "vocab_size", where), block_size=_get(c, "n_positions", where),
                     n_layer=_get(c, "n_layer", where), n_head=_get(c, "n_head", where), n_embd=n_embd,
                     mlp_hidden=c.get("n_inner") or 4 * n_embd, mlp=mlp, bias=True, pos="learned", norm="layernorm",
                     norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), dropout=0.0,
                     tie_weights=c.get("tie_word_embeddings", True))


def _rope_base(c: dict, where: str) -> float:
    """rope_theta, refusing any scaled or partial rotary embedding (transformers 4 spells it as
    rope_theta + rope_scaling, 5 as rope_parameters)."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    _refuse_unless(kind == "default", where, f"rope_scaling of type {kind!r}")
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    _refuse_unless(partial == 1.0, where, f"partial_rotary_factor={partial}")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _llama_config(c: dict, where: str) -> GPTConfig:
    kind = c["model_type"]
    act = c.get("hidden_act", "silu")
    _refuse_unless(act == "silu", where, f"hidden_act={act!r} (SwiGLU needs silu)")
    windows = [t for t in c.get("layer_types") or [] if t != "full_attention"]
    _refuse_unless(not c.get("use_sliding_window") and not windows
                   and (kind != "llama" or c.get("sliding_window") is None), where, "sliding-window attention")
    hidden, heads = _get(c, "hidden_size", where), _get(c, "num_attention_heads", where)
    head_dim = c.get("head_dim") or hidden // heads
    _refuse_unless(head_dim * heads == hidden, where,
                   f"head_dim={head_dim} with hidden_size={hidden} and {heads} heads (the head size here is "
                   f"hidden_size / heads)")
    kv_heads = c.get("num_key_value_heads") or heads
    return GPTConfig(vocab_size=_get(c, "vocab_size", where), block_size=_get(c, "max_position_embeddings", where),
                     n_layer=_get(c, "num_hidden_layers", where), n_head=heads, n_kv_head=0 if kv_heads == heads
                     else kv_heads, n_embd=hidden, mlp_hidden=_get(c, "intermediate_size", where), mlp="swiglu",
                     bias=bool(c.get("attention_bias") or c.get("mlp_bias")), pos="rope",
                     rope_base=_rope_base(c, where), norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                     qk_norm=kind == "qwen3", dropout=0.0, tie_weights=c.get("tie_word_embeddings", False))


def gpt_from_hf(c: dict, tensors: Mapping[str, torch.Tensor], where: str) -> tuple[GPTConfig, dict]:
    """(GPTConfig, GPT state dict) for a transformers config.json dict and its tensors."""
    kind = c.get("model_type")
    if kind not in IMPORTABLE:
        raise UserError(f"{where}: model_type {kind!r} is not supported; supported: {', '.join(IMPORTABLE)}")
    cfg = _gpt2_config(c, where) if kind == "gpt2" else _llama_config(c, where)
    cfg.validate()
    state = _gpt2_state(cfg, tensors, where) if kind == "gpt2" else _llama_state(cfg, tensors, where)
    return cfg, state


def _gpt2_state(cfg: GPTConfig, tensors, where: str) -> dict:
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    # attn.bias / attn.masked_bias: the causal-mask buffers older GPT-2 checkpoints saved
    w = Weights(tensors, where, prefix, r"\.attn\.(masked_)?bias$")
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.mlp_hidden
    state = {"wte.weight": w.take("wte.weight", V, C), "wpe.weight": w.take("wpe.weight", cfg.block_size, C)}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for name, (n_in, n_out) in {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, H),
                                    "mlp.c_proj": (H, C)}.items():
            state[b + name + ".weight"] = w.take(h + name + ".weight", n_in, n_out).t().contiguous()
            state[b + name + ".bias"] = w.take(h + name + ".bias", n_out)
        for norm in ("ln_1", "ln_2"):
            state[b + norm + ".weight"] = w.take(h + norm + ".weight", C)
            state[b + norm + ".bias"] = w.take(h + norm + ".bias", C)
    state["ln_f.weight"], state["ln_f.bias"] = w.take("ln_f.weight", C), w.take("ln_f.bias", C)
    head = w.optional("lm_head.weight", V, C)
    if cfg.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    elif head is None:
        raise UserError(f"{where}: tie_word_embeddings=false but lm_head.weight is missing")
    else:
        state["lm_head.weight"] = head
    w.finish("gpt2")
    return state


def _llama_state(cfg: GPTConfig, tensors, where: str) -> dict:
    w = Weights(tensors, where, "", r"rotary_emb\.inv_freq$")  # a buffer older checkpoints saved
    C, V, H, nh = cfg.n_embd, cfg.vocab_size, cfg.mlp_hidden, cfg.n_head
    nkv, hd = cfg.n_kv_head or nh, cfg.n_embd // cfg.n_head

    def linear(name, n_out, n_in, flip_heads=0):
        """(weight, bias or None) of an HF linear layer, rotary-flipped over flip_heads heads."""
        weight = w.take(name + ".weight", n_out, n_in)
        bias = w.optional(name + ".bias", n_out) if cfg.bias else None
        if flip_heads:
            weight = flip_rotary(weight, flip_heads)
            bias = None if bias is None else flip_rotary(bias, flip_heads)
        return weight, bias

    def joined(parts, n_out):
        weight = torch.cat([p[0] for p in parts])
        if not cfg.bias:
            return weight, None
        bias = torch.cat([p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in parts])
        return weight, bias

    state = {"wte.weight": w.take("model.embed_tokens.weight", V, C)}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        attn = joined([linear(h + "self_attn.q_proj", nh * hd, C, nh), linear(h + "self_attn.k_proj", nkv * hd, C, nkv),
                       linear(h + "self_attn.v_proj", nkv * hd, C)], C + 2 * nkv * hd)
        proj = joined([linear(h + "self_attn.o_proj", C, C)], C)
        fc = joined([linear(h + "mlp.gate_proj", H, C), linear(h + "mlp.up_proj", H, C)], 2 * H)
        down = joined([linear(h + "mlp.down_proj", C, H)], C)
        for name, (weight, bias) in {"attn.c_attn": attn, "attn.c_proj": proj, "mlp.c_fc": fc,
                                     "mlp.c_proj": down}.items():
            state[b + name + ".weight"] = weight
            if bias is not None:
                state[b + name + ".bias"] = bias
        state[b + "ln_1.weight"] = w.take(h + "input_layernorm.weight", C)
        state[b + "ln_2.weight"] = w.take(h + "post_attention_layernorm.weight", C)
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                gain = w.take(h + f"self_attn.{norm}.weight", hd)
                if not torch.all(gain == 1):
                    raise UserError(f"{where}: {h}self_attn.{norm}.weight is a learned gain (not all 1); "
                                    f"model.qk_norm has none, so this model cannot represent it")
    state["ln_f.weight"] = w.take("model.norm.weight", C)
    head = w.optional("lm_head.weight", V, C)
    if cfg.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    elif head is None:
        raise UserError(f"{where}: tie_word_embeddings=false but lm_head.weight is missing")
    else:
        state["lm_head.weight"] = head
    w.finish(cfg.qk_norm and "qwen3" or "llama")
    return state


# ---------------------------------------------------------------------------------------------
# Export


def hf_architecture(cfg: GPTConfig) -> str:
    """gpt2 | llama | qwen3: the transformers class that holds these options exactly; anything
    else is refused naming the option that has no equivalent."""
    def refuse(key, value, why):
        raise UserError(f"model.{key}={value} has no transformers equivalent ({why})")

    if cfg.logit_softcap:
        refuse("logit_softcap", cfg.logit_softcap, "GPT-2, Llama and Qwen3 do not cap logits")
    if cfg.pos == "learned":
        why = "learned positions export as GPT2LMHeadModel, which has"
        if cfg.norm != "layernorm":
            refuse("norm", cfg.norm, f"{why} LayerNorm")
        if cfg.mlp not in ("gelu", "gelu_tanh"):
            refuse("mlp", cfg.mlp, f"{why} a GELU MLP (gelu or gelu_tanh)")
        if cfg.n_kv_head not in (0, cfg.n_head):
            refuse("n_kv_head", cfg.n_kv_head, f"{why} no grouped-query attention")
        if cfg.qk_norm:
            refuse("qk_norm", "true", f"{why} no QK-norm")
        return "gpt2"
    why = "rotary models export as LlamaForCausalLM or Qwen3ForCausalLM, which have"
    if cfg.norm != "rmsnorm":
        refuse("norm", cfg.norm, f"{why} RMSNorm")
    if cfg.mlp != "swiglu":
        refuse("mlp", cfg.mlp, f"{why} a SwiGLU MLP")
    if cfg.qk_norm and cfg.bias:
        refuse("bias", "true", "with QK-norm the model is a Qwen3ForCausalLM, whose MLP has no biases")
    return "qwen3" if cfg.qk_norm else "llama"


def hf_from_gpt(cfg: GPTConfig, state: Mapping[str, torch.Tensor], vocab: int,
                eot_id: int | None) -> tuple[dict, dict]:
    """(config.json dict, transformers state dict) for a GPT; `vocab` rows are kept (the
    tokenizer's), tied heads are written once (as the embedding)."""
    arch = hf_architecture(cfg)
    nh, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    nkv = cfg.n_kv_head or nh
    ids = {"bos_token_id": eot_id, "eos_token_id": eot_id}
    if arch == "gpt2":
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                  "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                  "n_layer": cfg.n_layer, "n_head": nh, "n_inner": mlp_width(cfg),
                  "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                  "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                  "layer_norm_epsilon": norm_eps(cfg), "scale_attn_weights": True,
                  "tie_word_embeddings": cfg.tie_weights, **ids}
    else:
        config = {"architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"],
                  "model_type": arch, "vocab_size": vocab, "hidden_size": cfg.n_embd,
                  "intermediate_size": mlp_width(cfg), "num_hidden_layers": cfg.n_layer,
                  "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd, "hidden_act": "silu",
                  "max_position_embeddings": cfg.block_size, "rms_norm_eps": norm_eps(cfg),
                  "rope_theta": cfg.rope_base, "rope_scaling": None, "attention_bias": cfg.bias,
                  "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_weights, **ids}
        if arch == "llama":
            config["mlp_bias"] = cfg.bias
        else:
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                          layer_types=["full_attention"] * cfg.n_layer)
    tensors = _gpt2_tensors(cfg, state, vocab) if arch == "gpt2" else _llama_tensors(cfg, state, vocab, arch)
    return config, tensors


def _gpt2_tensors(cfg: GPTConfig, state, vocab: int) -> dict:
    def bias_of(name, size):
        return state[name] if name in state else torch.zeros(size, dtype=state["wte.weight"].dtype)

    out = {"transformer.wte.weight": state["wte.weight"][:vocab], "transformer.wpe.weight": state["wpe.weight"]}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = state[b + name + ".weight"]
            out[h + name + ".weight"] = weight.t()  # Conv1D: (in, out)
            out[h + name + ".bias"] = bias_of(b + name + ".bias", weight.shape[0])
        for norm in ("ln_1", "ln_2"):
            out[h + norm + ".weight"] = state[b + norm + ".weight"]
            out[h + norm + ".bias"] = bias_of(b + norm + ".bias", cfg.n_embd)
    out["transformer.ln_f.weight"] = state["ln_f.weight"]
    out["transformer.ln_f.bias"] = bias_of("ln_f.bias", cfg.n_embd)
    if not cfg.tie_weights:
        out["lm_head.weight"] = state["lm_head.weight"][:vocab]
    return out


def _llama_tensors(cfg: GPTConfig, state, vocab: int, arch: str) -> dict:
    nh, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    nkv = cfg.n_kv_head or nh
    H = mlp_width(cfg)
    out = {"model.embed_tokens.weight": state["wte.weight"][:vocab]}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        parts = {"attn.c_attn": [("self_attn.q_proj", nh * hd, nh), ("self_attn.k_proj", nkv * hd, nkv),
                                 ("self_attn.v_proj", nkv * hd, 0)],
                 "attn.c_proj": [("self_attn.o_proj", cfg.n_embd, 0)],
                 "mlp.c_fc": [("mlp.gate_proj", H, 0), ("mlp.up_proj", H, 0)],
                 "mlp.c_proj": [("mlp.down_proj", cfg.n_embd, 0)]}
        for name, pieces in parts.items():
            for suffix in (".weight", ".bias") if cfg.bias else (".weight",):
                chunks = state[b + name + suffix].split([size for _, size, _ in pieces])
                for (hf_name, _, flip_heads), chunk in zip(pieces, chunks):
                    out[h + hf_name + suffix] = flip_rotary(chunk, flip_heads) if flip_heads else chunk
        out[h + "input_layernorm.weight"] = state[b + "ln_1.weight"]
        out[h + "post_attention_layernorm.weight"] = state[b + "ln_2.weight"]
        if arch == "qwen3":
            for norm in ("q_norm", "k_norm"):
                out[h + f"self_attn.{norm}.weight"] = torch.ones(hd, dtype=state["ln_f.weight"].dtype)
    out["model.norm.weight"] = state["ln_f.weight"]
    if not cfg.tie_weights:
        out["lm_head.weight"] = state["lm_head.weight"][:vocab]
    return out
