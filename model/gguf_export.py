"""A GPT as one GGUF file, the format llama.cpp and its relatives run.

    write_gguf(cfg, state, tokenizer, path, dtype, name)

Design decisions:
- The tensors are the transformers export's (model/hf.py: the option checks, vocabulary rows,
  rotary sign and zero biases are decided once, there) renamed to llama.cpp's names:
  GPT-2 (`gpt2`: fused `attn_qkv`, biases everywhere, learned positions) and Llama (`llama`).
  Two layout changes on top: GPT-2's Conv1D weights go back to (out, in), and Llama's query and
  key rows are permuted from the rotate-half layout into the interleaved pairs llama.cpp's
  Llama rotates (what llama.cpp's own convert_hf_to_gguf.py does).
- Bias-free Llama only, and no QK-norm: transformers' GGUF reader (the check used here) has no
  way to learn a Llama's biases from the file; Qwen3 is left out for the same kind of reason.
- dtypes: float32 everywhere, or matrices in float16 / bfloat16 / Q8_0 (blocks of 32 int8 with
  one float16 scale) with 1-D tensors (norms, biases) and the position table in float32, as
  llama.cpp's converter does; a matrix whose rows do not split into blocks of 32 stays float32.
  Q8_0 uses the gguf package's reference quantizer; the float casts are torch's (the same
  round-to-nearest-even as the package's numpy path, and much faster for bfloat16).
- `read_gguf_tensors` reads a file back (gguf.GGUFReader), for the tests and the benchmark; the
  export does not re-read itself: the reader parses every vocabulary entry in Python, which takes
  longer than writing.
- The tokenizer is stored as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`), with the
  pre-tokenizer named by its split pattern (data/hf_tokenizer.py).
- The file is written by the `gguf` package (the [hf] extra), which llama.cpp maintains.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from common.errors import UserError
from data.hf_tokenizer import gguf_vocab
from model.gpt import GPTConfig
from model.hf import hf_architecture, hf_from_gpt, norm_eps
from model.layers import mlp_width

GGUF_DTYPES = ("float32", "float16", "bfloat16", "q8_0")

GPT2_NAMES = [  # transformers name (regex) -> llama.cpp name
    (r"transformer\.wte\.weight", "token_embd.weight"),
    (r"transformer\.wpe\.weight", "position_embd.weight"),
    (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (r"transformer\.ln_f\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.weight", "output.weight"),
]
LLAMA_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
]


def gguf_architecture(cfg: GPTConfig) -> str:
    """gpt2 | llama, or a refusal naming the option."""
    arch = hf_architecture(cfg)  # refuses what no transformers class holds
    if arch == "qwen3":
        raise UserError("model.qk_norm=true: GGUF export covers the GPT-2 and Llama architectures; use --format hf "
                        "(Qwen3ForCausalLM)")
    if arch == "llama" and cfg.bias:
        raise UserError("model.bias=true: GGUF export writes bias-free Llama models only; use --format hf")
    return arch


def interleave_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (i pairs with i + d/2) to interleaved pairs
    (2i with 2i+1), as llama.cpp's Llama expects (its convert_hf_to_gguf.py `permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: GPTConfig, state, vocab: int, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors by name, float, before any dtype conversion."""
    _, hf = hf_from_gpt(cfg, state, vocab, None)
    names = GPT2_NAMES if arch == "gpt2" else LLAMA_NAMES
    nkv = cfg.n_kv_head or cfg.n_head
    out = {}
    for hf_name, t in hf.items():
        name = next(re.sub(f"^{p}$", r, hf_name) for p, r in names if re.fullmatch(p, hf_name))
        if arch == "gpt2" and name.endswith(".weight") and t.dim() == 2 and "_embd" not in name \
                and name != "output.weight":
            t = t.t()  # Conv1D (in, out) back to (out, in)
        elif name.endswith("attn_q.weight"):
            t = interleave_rotary(t, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            t = interleave_rotary(t, nkv)
        out[name] = t
    return out


def storage_type(name: str, t: torch.Tensor, dtype: str):
    """The GGML type a tensor is stored as (see the module docstring)."""
    from gguf import GGMLQuantizationType as Q

    if dtype == "float32" or t.dim() < 2 or name == "position_embd.weight":
        return Q.F32
    if dtype == "q8_0" and t.shape[-1] % 32:
        return Q.F32
    return {"float16": Q.F16, "bfloat16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def write_gguf(cfg: GPTConfig, state, tokenizer, path, dtype: str = "float32", name: str = "gpt"):
    """Write the model and its tokenizer as a GGUF file at path (the caller makes it atomic)."""
    import gguf

    arch = gguf_architecture(cfg)
    vocab = tokenizer.vocab_size
    tok = gguf_vocab(tokenizer, vocab)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                     "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(mlp_width(cfg))
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(norm_eps(cfg))
    else:
        w.add_head_count_kv(cfg.n_kv_head or cfg.n_head)
        w.add_layer_norm_rms_eps(norm_eps(cfg))
        w.add_rope_freq_base(cfg.rope_base)
        w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        w.add_vocab_size(vocab)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    if tok["eot_id"] is not None:
        w.add_bos_token_id(tok["eot_id"])
        w.add_eos_token_id(tok["eot_id"])
    w.add_add_bos_token(False)
    Q = gguf.GGMLQuantizationType
    for tensor_name, t in gguf_tensors(cfg, state, vocab, arch).items():
        qtype = storage_type(tensor_name, t, dtype)
        t = t.detach().contiguous()
        if qtype == Q.Q8_0:  # llama.cpp's reference quantizer, from the gguf package
            w.add_tensor(tensor_name, gguf.quants.quantize(t.float().numpy(), qtype), raw_dtype=qtype)
        elif qtype == Q.BF16:  # torch rounds to nearest even, as ggml does; the bytes go in as they are
            w.add_tensor(tensor_name, t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(tensor_name, t.to(torch.float16 if qtype == Q.F16 else torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 numpy, in numpy's (row-major) shape: the read-back
    check after writing."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        out[t.name] = gguf.dequantize(t.data, t.tensor_type).reshape(shape)
    return out
