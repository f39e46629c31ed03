"""The training loss: the LM head's matmul fused with its cross-entropy (llm.c's "fused classifier").

Why: at GPT-2's vocabulary the logits are a step's largest tensor (batch x context x 50k). The
plain path (`F.cross_entropy(lm_head(x))`) writes them, reads them for the loss, reads them
again in backward and writes their gradient. Here the forward pass computes the gradient of the
logits from the same read that computes the loss, and keeps only that gradient, so backward is
the head's two matmuls: one pass over the logits fewer, and the logits are freed at once.
GPT.forward takes this path only under torch.compile: Inductor turns it into one kernel over
the logits, while eager PyTorch would materialise each step's temporaries (1.6-1.7x slower
than the plain path at GPT-2's vocabulary on CPU: `python bench/cpu_step.py loss`).

The kept gradient is softmax - one-hot per token, unscaled (within [-1, 1], so bf16 or fp16
holds it without overflow); the mean over tokens and the incoming gradient (a GradScaler's
scale included) are applied after the matmuls, in float32. Logit soft-capping (c * tanh(z / c))
is applied here too, so the capped and uncapped heads share the path. Targets of -1 are
ignored, as in F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap: float):
        rows = x.reshape(-1, x.size(-1))
        logits = F.linear(rows, weight)  # in autocast's dtype, if on
        # Autocast does not reach backward: keep the matmul's operands in the dtype it used.
        dtype = logits.dtype
        xc, wc = rows.to(dtype), weight.to(dtype)
        targets = targets.reshape(-1)
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in float32 at least
        if softcap:
            tanh = torch.tanh(z / softcap)
            z = softcap * tanh
        valid = targets != -1
        safe_targets = torch.where(valid, targets, 0)
        lse = torch.logsumexp(z, dim=-1)
        token_loss = lse - z.gather(1, safe_targets[:, None]).squeeze(1)
        count = valid.sum()
        loss = torch.where(valid, token_loss, 0.0).sum() / count
        # d loss_i / d z = softmax(z) - onehot(target), zero for ignored tokens.
        dz = torch.exp(z - lse[:, None])
        dz = dz - (torch.arange(z.size(-1), device=z.device) == safe_targets[:, None]).to(dz.dtype)
        if softcap:
            dz = dz * (1.0 - tanh * tanh)
        dlogits = (dz * valid[:, None]).to(dtype)
        ctx.save_for_backward(dlogits, xc, wc, count)
        ctx.shapes = (x.shape, x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dlogits, xc, wc, count = ctx.saved_tensors
        x_shape, x_dtype, w_dtype = ctx.shapes
        scale = grad_loss.to(torch.promote_types(grad_loss.dtype, torch.float32)) / count
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((dlogits @ wc).to(scale.dtype) * scale).to(x_dtype).view(x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = ((dlogits.t() @ xc).to(scale.dtype) * scale).to(w_dtype)
        return grad_x, grad_w, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits x @ weight.T (soft-capped if softcap > 0) against targets;
    equal to the plain path's loss, with the same gradients."""
    return LinearCrossEntropy.apply(x, weight, targets, softcap)
