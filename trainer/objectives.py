"""What a training step minimises, chosen by `train.objective`: next-token loss, or DPO.

train.py's loop is the same for both; it asks the objective for each micro-batch's weight in
the step, its loss (and statistics to log), and the evaluation on the held-out split:

- `lm` (`LanguageModeling`): the model's own mean cross-entropy over the counted targets,
  micro-batches weighted by their trained tokens (trainer/loss_weights.py); evaluation gives
  `val_loss` (nats per target) and `val_bpb` (bits per UTF-8 byte of the targets).
- `dpo` (`DPO`, Rafailov et al., 2023): batches of preference pairs (data/preferences.py: the B
  chosen rows, then the B rejected rows), and the loss
      -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])
  with each log-probability summed over the completion's tokens (the final assistant reply and
  its end token; the targets that are not IGNORE). `beta * (log pi - log pi_ref)` is a reply's
  implicit reward; the log gets `dpo_loss`, `reward_chosen`, `reward_rejected`,
  `reward_margin` and `reward_accuracy` (the share of pairs whose chosen reward is the larger)
  for the training batches, and the same prefixed `val_` over the held-out pairs, with
  `val_loss` = `val_dpo_loss` for choosing the best checkpoint. Micro-batches weigh their
  number of pairs. `dpo.nll` > 0 adds that weight times the chosen replies' next-token loss
  (nats per token; RPO, Pang et al., 2024) to the loss trained on, not to `dpo_loss`: DPO alone
  may lower both replies' likelihoods as long as the margin grows, and this keeps the chosen
  ones likely.

The reference model is the starting model, frozen. Design decision: a frozen copy evaluated
alongside the policy (full fine-tuning), or, with LoRA, the policy itself with its adapters
switched off (model/lora.py `adapters_off`: the frozen weights are the starting model, so the
reference costs no memory at all). Not log-probabilities computed once per example: that needs
a pass over the whole data set before the first step and a table that must follow the data,
resumes, ranks and block_size; the copy costs one forward pass per step (a third of a step's
compute) and one copy of the weights, and the adapters-off reference not even that.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from model.base import IGNORE
from trainer.dist import all_reduce_sum
from trainer.loss_weights import token_weights


class LanguageModeling:
    stats: tuple[str, ...] = ()  # nothing to log beyond the loss

    def weights(self, targets: list[torch.Tensor], d) -> torch.Tensor:
        return token_weights(targets, d)

    def loss(self, model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        _, loss = model(x, y)
        return loss, loss.new_zeros(0)

    @torch.no_grad()
    def evaluate(self, model, batches, rt, d, token_bytes: torch.Tensor) -> dict:
        """val_loss in nats per target, val_bpb in bits per UTF-8 byte of the targets, and
        val_tokens, the targets counted, over this rank's share of the batches ((batch, weight):
        weight 0 for the filler that keeps the ranks' forwards paired), summed over the ranks.
        Both are sums over the counted targets (not IGNORE), so masked batches weigh each target once."""
        model.eval()
        nats, count, nbytes = (torch.zeros((), dtype=torch.float64, device=rt.device) for _ in range(3))
        for (x, y), weight in batches:
            with rt.autocast:
                logits, _ = model(x)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
            counted = y.flatten() != IGNORE
            nats += weight * losses.sum()
            count += weight * counted.sum()
            nbytes += weight * token_bytes[y.flatten().clamp(min=0)][counted].sum()
        all_reduce_sum(d, nats, count, nbytes)
        model.train()
        return {"val_loss": (nats / count).item(), "val_bpb": (nats / (math.log(2) * nbytes)).item(),
                "val_tokens": int(count.item())}

    def describe(self, evals: dict) -> str:
        return f"val {evals['val_loss']:.4f} ({evals['val_bpb']:.4f} bits/byte)"


def completion_logps(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows,) log-probability of each row's counted targets (not IGNORE), summed."""
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logp * (y != IGNORE)).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean loss, (5,) stats: loss, reward_chosen, reward_rejected, reward_margin, reward_accuracy) of a batch."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen - rejected)
    stats = torch.stack([losses.mean(), chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                         (chosen > rejected).float().mean()])
    return losses.mean(), stats.detach()


class DPO:
    stats = ("dpo_loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

    def __init__(self, model, beta: float, lora: bool, nll: float = 0.0):
        self.beta, self.lora, self.nll = beta, lora, nll
        self.policy = model  # unwrapped: the reference runs outside DDP/compile
        if lora:
            self.reference = None
        else:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logps(self, x, y) -> torch.Tensor:
        if self.reference is not None:
            return completion_logps(self.reference, x, y)
        from model.lora import adapters_off

        with adapters_off(self.policy):
            return completion_logps(self.policy, x, y)

    def weights(self, targets: list[torch.Tensor], d) -> torch.Tensor:
        pairs = torch.tensor([y.shape[0] // 2 for y in targets], dtype=torch.float32, device=targets[0].device)
        total = pairs.sum()
        all_reduce_sum(d, total)
        return pairs / total

    def loss(self, model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.reference_logps(x, y)
        policy = completion_logps(model, x, y)
        b = x.shape[0] // 2
        loss, stats = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.beta)
        if self.nll:
            loss = loss - self.nll * (policy[:b] / (y[:b] != IGNORE).sum(dim=-1)).mean()
        return loss, stats

    @torch.no_grad()
    def evaluate(self, model, batches, rt, d, token_bytes) -> dict:
        """The DPO statistics over the held-out pairs, each pair weighing the same."""
        model.eval()
        sums, pairs = torch.zeros(len(self.stats), dtype=torch.float64, device=rt.device), torch.zeros(
            (), dtype=torch.float64, device=rt.device)
        for (x, y), weight in batches:
            with rt.autocast:
                _, stats = self.loss(model, x, y)
            sums += weight * stats.double() * (x.shape[0] // 2)
            pairs += weight * (x.shape[0] // 2)
        all_reduce_sum(d, sums, pairs)
        model.train()
        evals = {f"val_{name}": v for name, v in zip(self.stats, (sums / pairs).tolist())}
        return {"val_loss": evals["val_dpo_loss"], **evals}

    def describe(self, evals: dict) -> str:
        return (f"val dpo loss {evals['val_dpo_loss']:.4f}, reward accuracy {evals['val_reward_accuracy']:.1%}, "
                f"margin {evals['val_reward_margin']:.3f}")


def build_objective(cfg, model):
    """The objective `train.objective` names, for `model` (unwrapped, on its device)."""
    if cfg.train.objective == "dpo":
        return DPO(model, cfg.dpo.beta, lora=cfg.lora.rank > 0, nll=cfg.dpo.nll)
    return LanguageModeling()
