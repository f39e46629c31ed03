"""How much each micro-batch's loss counts in an optimizer step: its share of the trained tokens.

The model's loss is a mean over a micro-batch's counted targets (not IGNORE). Averaging those
means over micro-batches (dividing each by grad_accum) weighs a micro-batch with 10 trained
tokens as much as one with 1,000, so with masked targets (chat: only assistant tokens count)
the step's gradient would not be the gradient of the mean loss over its tokens. Weighting each
micro-batch's mean by n_i / N, its trained tokens over the step's total across micro-batches
and ranks, makes the sum over micro-batches and ranks exactly that mean. With nothing masked
every n_i is the same and the weight is 1 / (grad_accum * world_size), as before.

DDP and FSDP average gradients over ranks, so each rank scales its backward by world_size on
top of its weight; the step's loss (for the log and the fault guard) is the plain weighted sum,
all-reduced. The counts stay on the device: the one extra all-reduce needs no host sync.
"""

from __future__ import annotations

import torch

from model.base import IGNORE
from trainer.dist import all_reduce_sum


def token_weights(targets: list[torch.Tensor], d) -> torch.Tensor:
    """(grad_accum,) weights n_i / N of the micro-batches whose targets are given (this rank's),
    N summed over every rank's micro-batches. A step with no trained token at all gets weights
    of NaN, so the fault guard skips it instead of applying a zero update as if it were one."""
    counts = torch.stack([(y != IGNORE).sum() for y in targets]).float()
    total = counts.sum()
    all_reduce_sum(d, total)
    return counts / total
