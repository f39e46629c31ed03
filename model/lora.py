"""LoRA: fine-tune a model through small low-rank adapters while its weights stay frozen.

    python train.py configs/sft.yaml init_from=out/base lora.rank=8 [lora.alpha=16] [lora.dropout=0.05]
                    [lora.targets=[attn,mlp,head]]
    python -m model.convert merge out/sft-lora --out out/sft-merged

A projection y = W x + b becomes y = W x + b + (alpha / rank) * B A x, with A (rank x in) and B
(out x rank) the only trained parameters of that layer (Hu et al., 2021). B starts at zero, so an
adapted model starts exactly where its base is; A starts as nn.Linear's own initialisation.

Design decisions:
- A function over a family, not an edit inside it: the family names its projections by kind
  (`lora_targets()`: attn, mlp, head; model/base.py), and the adapted modules are nn.Linear
  subclasses that keep the `weight` and `bias` names, so a base checkpoint loads into an adapted
  model unchanged and the adapters are extra entries (`<module>.lora_A`, `<module>.lora_B`). A
  kind the family does not have is refused by name.
- New token rows train too. Chat tokens added at fine-tuning start as the mean of the other rows
  (trainer/init.py), all alike; frozen, the model could never tell `<|user_start|>` from
  `<|assistant_end|>`. So the rows of the tokenizer's chat tokens in the embedding and the
  output head get a trainable delta (`<module>.token_rows`, zero at first), the other rows stay
  frozen (as PEFT's `trainable_token_indices`). A tied head shares its embedding's delta.
- The optimizer sees adapters as their own role (`adapter_parameters()`, collected by
  model/base.py `param_groups`): AdamW at `optim.lr` without weight decay, never Muon (Muon's
  orthogonalised update of a rank-r factor is not what LoRA's scale assumes).
- A LoRA checkpoint holds the whole model (frozen weights and adapters, under the names above)
  plus the base's path in its config (`init_from`), not only the adapters: a checkpoint is
  self-sufficient in this project (sampling, evaluation, serving and merging need nothing but
  it, and a base moved, retrained or deleted cannot silently change a fine-tuned model). It
  costs one copy of the weights on disk, where a full fine-tuning checkpoint also holds their
  optimizer state (two more copies with AdamW).
- `merge_adapters` folds everything into plain weights (W + scale B A, plus the token rows), so
  a merged model is an ordinary one of its family: same logits, no adapter cost at inference.
- A head adapter on a head tied to the embedding is refused: merging it would change the
  embedding too, so the merged model would not be the trained one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError


class LoRALinear(nn.Linear):
    """nn.Linear with frozen weight and bias, a trainable update scale * B A of rank `rank` (0:
    none) and trainable rows for the outputs `token_ids` (a head's new tokens; None: none)."""

    enabled = True  # False inside `adapters_off`

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, token_rows: nn.Parameter | None,
                 token_ids: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale = rank, alpha / rank if rank else 0.0
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
            nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # nn.Linear's own initialisation
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
            # No dropout module at 0: one at p=0 still draws a mask per call (time and memory).
            self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.token_rows = token_rows
        self.register_buffer("token_ids", token_ids, persistent=False)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return ([self.lora_A, self.lora_B] if self.rank else []) + ([self.token_rows] if self.token_rows is not None else [])

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        if self.rank:
            # y + scale * (x A^T) B^T, the second matmul accumulating into y (one BLAS call, no
            # temporary as large as y: on a CPU these thin matmuls cost what they move, not
            # what they compute).
            h = F.linear(self.lora_dropout(x), self.lora_A)
            y = torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.lora_B.t(), alpha=self.scale).view(y.shape)
        if self.token_rows is not None:
            y = y.index_add(-1, self.token_ids, F.linear(x, self.token_rows).to(y.dtype))
        return y

    def adapted_weight(self) -> torch.Tensor:
        """W with the adapters folded in (what merging keeps; also the fused loss's head)."""
        w = self.weight
        if self.rank:
            w = w + (self.lora_B @ self.lora_A) * self.scale
        if self.token_rows is not None:
            w = w.index_add(0, self.token_ids, self.token_rows.to(w.dtype))
        return w


class TokenRowsEmbedding(nn.Embedding):
    """nn.Embedding with a frozen table and trainable rows for the ids `token_ids`."""

    enabled = True  # False inside `adapters_off`

    def __init__(self, base: nn.Embedding, token_rows: nn.Parameter, token_ids: torch.Tensor):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight, self.token_rows = base.weight, token_rows
        self.register_buffer("token_ids", token_ids, persistent=False)
        # Each id's slot in [0, token rows]: 0 for the frozen ids, i + 1 for token_ids[i].
        slots = torch.zeros(self.num_embeddings, dtype=torch.long, device=token_ids.device)
        slots[token_ids] = torch.arange(1, len(token_ids) + 1, device=token_ids.device)
        self.register_buffer("slots", slots, persistent=False)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.token_rows]

    def forward(self, idx):
        if not self.enabled:
            return F.embedding(idx, self.weight)
        rows = torch.cat([self.token_rows.new_zeros(1, self.embedding_dim), self.token_rows])
        return F.embedding(idx, self.weight) + F.embedding(self.slots[idx], rows)

    def adapted_weight(self) -> torch.Tensor:
        return self.weight.index_add(0, self.token_ids, self.token_rows)


@contextmanager
def adapters_off(model: nn.Module):
    """The model as its base, adapters and token-row deltas ignored, for the duration (DPO's
    reference: trainer/objectives.py). Costs nothing: the frozen weights are the base."""
    adapted = [m for m in model.modules() if isinstance(m, (LoRALinear, TokenRowsEmbedding))]
    for m in adapted:
        m.enabled = False
    try:
        yield model
    finally:
        for m in adapted:
            m.enabled = True


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def refuse_targets(model: nn.Module, lora):
    """UserError (one line) when `model` lacks a projection kind `lora.targets` names (the
    recurrent and counted families have none), or when a head adapter would be tied."""
    arch, targets = model.cfg.arch, model.lora_targets()
    for kind in lora.targets:
        if kind not in targets:
            raise UserError(f"lora.rank={lora.rank}: model.arch={arch} has no {kind!r} projections to adapt "
                            f"(it has: {', '.join(targets) or 'none'}); LoRA needs lora.targets among them")
    vocab_modules = [name.removesuffix(".weight") for name in model.vocab_tensors]
    tied = len({id(model.get_submodule(m).weight) for m in vocab_modules}) < len(vocab_modules)
    if "head" in lora.targets and tied:
        raise UserError("lora.targets: the head is tied to the token embedding (model.tie_weights=true), so a "
                        "head adapter would change the embedding too when merged; leave head out")


def check_adapters(model_cfg, lora):
    """Refuse impossible LoRA options from the model config alone (a model built on the meta
    device), before a run claims its folder or prepares data."""
    if lora.rank:
        from model import build_model

        with torch.device("meta"):
            refuse_targets(build_model(model_cfg), lora)


def add_adapters(model: nn.Module, lora, token_ids: list[int] = ()):
    """Freeze `model` and give it adapters as `lora` (trainer/config.py LoraConfig) says, plus
    trainable rows for `token_ids` in its vocabulary tensors. Nothing happens when lora.rank is 0."""
    if not lora.rank:
        return
    refuse_targets(model, lora)
    arch, targets = model.cfg.arch, model.lora_targets()
    vocab_modules = [name.removesuffix(".weight") for name in model.vocab_tensors]
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = {name for kind in lora.targets for name in targets[kind]}
    ids = torch.tensor(sorted(token_ids), dtype=torch.long, device=next(model.parameters()).device)
    rows_by_weight = {}  # tied vocabulary tensors share one delta
    for name in sorted(adapted | set(vocab_modules)):
        module = model.get_submodule(name)
        rows = None
        if name in vocab_modules and len(ids):
            rows = rows_by_weight.setdefault(id(module.weight), nn.Parameter(
                torch.zeros(len(ids), module.weight.shape[1], dtype=module.weight.dtype, device=module.weight.device)))
        if isinstance(module, nn.Embedding):
            if rows is not None:
                _replace(model, name, TokenRowsEmbedding(module, rows, ids))
        elif isinstance(module, nn.Linear):
            if name in adapted or rows is not None:
                rank = lora.rank if name in adapted else 0
                _replace(model, name, LoRALinear(module, rank, lora.alpha, lora.dropout, rows,
                                                 ids if rows is not None else None))
        else:
            raise UserError(f"LoRA cannot adapt {name} of model.arch={arch} (a {type(module).__name__})")


def merge_adapters(model: nn.Module):
    """Fold every adapter into its weights, leaving plain nn.Linear / nn.Embedding modules that
    still share what they shared (a tied head stays tied)."""
    merged = {}  # id of a frozen weight -> its merged Parameter
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LoRALinear, TokenRowsEmbedding)):
            continue
        with torch.no_grad():
            weight = merged.setdefault(id(module.weight), nn.Parameter(module.adapted_weight().detach().clone()))
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.bias = module.bias
        else:
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
        plain.weight = weight
        _replace(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)


def chat_token_ids(tokenizer) -> list[int]:
    """The ids whose rows train under LoRA: the tokenizer's chat tokens, where it has them."""
    from chat.template import SPECIAL_TOKENS

    return [tokenizer.special_tokens[t] for t in SPECIAL_TOKENS if t in tokenizer.special_tokens]
