"""Muon: MomentUm Orthogonalized by Newton-Schulz (after Keller Jordan's modded-nanogpt).

Update rule, per 2-D weight matrix W of shape (rows, cols), gradient G:

    buf    <- momentum * buf + (1 - momentum) * G                  (EMA momentum)
    U      <- lerp(G, buf, momentum) if nesterov else buf
    O      <- NewtonSchulz5(U)                                      (~ U_svd V_svd^T)
    W      <- W * (1 - lr * weight_decay)                           (decoupled decay)
    W      <- W - lr * scale * O

Design decisions:

* Why orthogonalise. The momentum of a weight matrix's gradient is typically
  dominated by a few singular directions, so a plain SGD step spends almost all
  of its length on them. Replacing U = P S Q^T by its polar factor P Q^T (all
  singular values set to 1) makes the step equally long along every direction
  the gradient spans, so rare-but-useful directions are learned too. This is
  steepest descent under the spectral norm, the natural norm for a linear map;
  in modded-nanogpt it reaches a given loss in fewer tokens than AdamW.

* Why Newton-Schulz instead of an SVD. An SVD is slow and poorly supported in
  low precision on GPUs. Five steps of the quintic iteration
  X <- aX + b(XX^T)X + c(XX^T)^2 X with the tuned (a, b, c) =
  (3.4445, -4.7750, 2.0315) use only matmuls, are stable in bfloat16, and map
  every singular value sigma with sigma / ||U||_F >= ~1.5e-3 into about
  [0.68, 1.2] rather than onto exactly 1; smaller ones (e.g. the tail of a
  square random matrix) stay below 0.5. The coefficients trade exactness for
  a steep slope at 0, which is what the optimiser needs. bfloat16 is the
  default on CUDA; on CPU the default is float32 because CPU bfloat16 matmuls
  are slow, not because the iteration needs it.

* Why only hidden 2-D matrices. The argument above is about linear maps acting
  on a hidden representation. Embeddings are lookup tables (each row is only
  touched by its own token; orthogonalising couples unrelated rows), the output
  head and embeddings empirically train better with AdamW's per-coordinate
  steps, and norm gains / biases are vectors with no matrix structure. Those go
  to AdamW; the integrator builds the two optimisers' parameter groups. Any
  non-2-D parameter raises ValueError so a mistake in that split fails loudly
  (conv kernels would have to be flattened by the caller).

* Scaling (``adjust_lr``). O has unit singular values, so its RMS entry is
  1/sqrt(max(rows, cols)) and depends on the shape.
  - ``"original"`` (default, modded-nanogpt): scale = max(1, rows/cols) ** 0.5.
    With it every shape gets entry RMS 1/sqrt(cols), i.e. each output row of
    the update has norm ~1 (exactly 1 when rows <= cols, on average when
    rows > cols, e.g. an MLP up-projection). Use Muon's own lr, typically
    ~0.02 (the default here).
  - ``"match_rms"`` (Moonshot, "Muon is Scalable for LLM Training"):
    scale = 0.2 * sqrt(max(rows, cols)), so the update's RMS is ~0.2, like an
    AdamW update. Use an AdamW-like lr (e.g. 1e-3 .. 3e-4) and AdamW-like
    weight decay with this option; lr=0.02 would be far too large.
  "rows" and "cols" are the parameter's ``shape[0]`` and ``shape[1]``; for
  ``nn.Linear`` that is (out_features, in_features).

* Weight decay is decoupled and multiplied by lr (as in AdamW / modded-nanogpt),
  so it follows any lr schedule applied to ``group["lr"]``.

* A matrix that stacks several linear maps by rows (attention's c_attn: W_q, W_k, W_v) is
  orthogonalised one map at a time (``row_blocks``, from the model's ``row_blocks()``), each
  block scaled for its own shape, as modded-nanogpt does: measured against one (3C, C)
  matrix, three blocks reach a lower val loss at equal steps (`python bench/muon.py qkv`,
  bench/RESULTS.md). Orthogonalising the stack would couple the three maps' steps (their
  directions share one set of singular values) and scale them as one tall matrix.

* Rows > cols is handled by orthogonalising the transpose, so the Gram matrix
  X X^T is always the smaller (min, min) one.

* Same-shaped matrices (a transformer has a few shapes, once per layer) are
  orthogonalised together as one batch, each step two fused multiply-adds
  (baddbmm) and a Gram product: a handful of larger ops per step instead of
  five per matrix (`python bench/muon.py step` times both).

* State is only ``state[p]["momentum_buffer"]`` (a tensor like ``p``);
  hyperparameters live in ``param_groups`` as plain Python floats/bools/ints/
  strings. So ``state_dict()`` is loadable with ``torch.load(weights_only=True)``.
  The Newton-Schulz dtype is a constructor argument kept off the state dict.

* Deterministic: no randomness, no data-dependent control flow; results depend
  only on inputs and the matmul backend.

* torch.compile: the step mutates parameters in place under ``no_grad`` like any
  built-in optimiser, so a compiled model is unaffected. The step itself is eager.

* Distributed. Under DDP every rank holds the same all-reduced gradients and
  computes the same update. Under FSDP2 a parameter, its gradient and its
  momentum are DTensors sharded by rows, and a shard is not a matrix whose
  orthogonalisation means anything: each step gathers every matrix's whole
  update (one all-gather per matrix), runs Newton-Schulz on it on every rank
  (the same input, so the same result everywhere) and keeps this rank's rows.
  The update therefore equals DDP's within float tolerance; what sharding saves
  (the momentum buffers and the parameters at rest) it still saves, and what it
  costs is the gathered matrix and the Newton-Schulz work repeated on each rank,
  small next to the forward and backward for transformer-sized matrices.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

__all__ = ["Muon", "zeropower_via_newtonschulz5"]

_NS_COEFFS = (3.4445, -4.7750, 2.0315)
_ADJUST_LR = ("original", "match_rms")


def _default_ns_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of ``G`` (last two dims).

    Quintic Newton-Schulz with coefficients tuned for speed, not exactness:
    singular values of ``G`` above ~1.5e-3 * ||G||_F come out in about
    [0.68, 1.2]; smaller ones stay small (5 steps can only lift them so far).
    Computed in ``dtype`` (default: bfloat16 on CUDA, float32 elsewhere) and
    returned in ``G.dtype``. Batched inputs (..., rows, cols) work too.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = _NS_COEFFS
    X = G.to(dtype or _default_ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        # Iterate on the wide orientation so the Gram matrix is min(rows, cols)^2.
        X = X.mT
    # Spectral norm <= Frobenius norm, so this puts every singular value in
    # [0, 1], inside the iteration's basin of convergence.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    # As a batch of matrices, so each step is two fused multiply-adds (baddbmm: beta*C + alpha*A@B)
    # and one Gram product, however many matrices come at once.
    X = X.reshape(-1, *X.shape[-2:])
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    X = X.reshape(G.mT.shape if transposed else G.shape)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov by default) with Newton-Schulz-orthogonalised updates.

    Only for 2-D hidden weight matrices; see the module docstring for the rule,
    the ``adjust_lr`` scaling conventions and what to give AdamW instead.

    Args:
        params: iterable of 2-D tensors or of param-group dicts. Each group may
            override ``lr``, ``momentum``, ``nesterov``, ``ns_steps``,
            ``weight_decay`` and ``adjust_lr``.
        lr: learning rate (0.02 suits ``adjust_lr="original"``).
        momentum: EMA coefficient of the momentum buffer, in [0, 1).
        nesterov: use the Nesterov look-ahead ``lerp(grad, buf, momentum)``.
        ns_steps: Newton-Schulz iterations.
        weight_decay: decoupled decay, applied as ``p *= 1 - lr * weight_decay``.
        adjust_lr: ``"original"`` -> scale ``max(1, rows/cols) ** 0.5``;
            ``"match_rms"`` -> scale ``0.2 * sqrt(max(rows, cols))``.
        ns_dtype: dtype for Newton-Schulz; ``None`` picks bfloat16 for CUDA
            params and float32 otherwise.
        row_blocks: ``{id(param): (rows, rows, ...)}`` for parameters that stack
            several maps by rows; each block is orthogonalised and scaled alone.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adjust_lr: str = "original",
        ns_dtype: torch.dtype | None = None,
        row_blocks: dict[int, tuple[int, ...]] | None = None,
    ):
        self.ns_dtype = ns_dtype
        self.row_blocks = dict(row_blocks or {})
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            adjust_lr=adjust_lr,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(
                    f"Muon only handles 2-D weight matrices, got a parameter of shape "
                    f"{tuple(p.shape)}; put embeddings, the output head, norms and biases "
                    f"in AdamW (flatten conv kernels to 2-D yourself if wanted)"
                )
        g = {**self.defaults, **param_group, "params": params}
        # Validate before registering so a bad group leaves the optimiser untouched.
        if g["lr"] < 0:
            raise ValueError(f"invalid lr {g['lr']}")
        if not 0.0 <= g["momentum"] < 1.0:
            raise ValueError(f"invalid momentum {g['momentum']}, need 0 <= momentum < 1")
        if g["weight_decay"] < 0:
            raise ValueError(f"invalid weight_decay {g['weight_decay']}")
        if int(g["ns_steps"]) != g["ns_steps"] or g["ns_steps"] < 1:
            raise ValueError(f"invalid ns_steps {g['ns_steps']}")
        if g["adjust_lr"] not in _ADJUST_LR:
            raise ValueError(f"adjust_lr must be one of {_ADJUST_LR}, got {g['adjust_lr']!r}")
        super().add_param_group({**param_group, "params": params})

    @staticmethod
    def _scale(shape: torch.Size, adjust_lr: str) -> float:
        rows, cols = shape
        if adjust_lr == "original":
            return max(1.0, rows / cols) ** 0.5
        return 0.2 * max(rows, cols) ** 0.5

    def _orthogonalised(self, params: list[Tensor], updates: list[Tensor], steps: int, adjust_lr: str) -> list[Tensor]:
        """Each update orthogonalised and scaled for its shape: a matrix, or each of its row
        blocks (`row_blocks`) on its own. Same-shaped matrices go together as one batch: one
        batched matmul per Newton-Schulz step instead of one per matrix (fewer, larger ops; a
        transformer's matrices come in a few shapes, once per layer). An FSDP2 shard (a
        DTensor) is gathered into its whole matrix first, and this rank keeps its rows of the
        result (src_data_rank=None: every rank computed the same whole, so nothing needs
        scattering)."""
        wholes = [u.full_tensor() if hasattr(u, "full_tensor") else u for u in updates]
        pieces = [list(w.split(self.row_blocks[id(p)])) if id(p) in self.row_blocks else [w]
                  for p, w in zip(params, wholes)]
        flat = [piece for ps in pieces for piece in ps]
        by_shape: dict[tuple, list[int]] = {}
        for j, piece in enumerate(flat):
            by_shape.setdefault((piece.shape, piece.dtype, piece.device), []).append(j)
        done: list[Tensor | None] = [None] * len(flat)
        for members in by_shape.values():
            batch = zeropower_via_newtonschulz5(torch.stack([flat[j] for j in members]), steps, self.ns_dtype)
            for j, o in zip(members, batch.unbind(0)):
                done[j] = o * self._scale(o.shape, adjust_lr)
        out, j = [], 0
        for u, ps in zip(updates, pieces):
            whole = done[j] if len(ps) == 1 else torch.cat(done[j:j + len(ps)])
            j += len(ps)
            if hasattr(u, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                whole = distribute_tensor(whole, u.device_mesh, u.placements, src_data_rank=None)
            out.append(whole)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                # EMA form (not buf*m + g): same direction after orthogonalisation,
                # but the buffer stays on the gradient's scale, which is friendlier
                # to low-precision NS inputs and makes momentum=0 mean plain gradient.
                buf.lerp_(grad, 1 - mom)
                # Out of place so p.grad is left intact for logging / clipping by the caller.
                updates.append(grad.lerp(buf, mom) if group["nesterov"] else buf)
            for p, update in zip(params, self._orthogonalised(params, updates, group["ns_steps"], group["adjust_lr"])):
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
        return loss
