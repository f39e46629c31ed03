"""An n-gram language model: the next token from the last n-1, by counting (`model.arch: ngram`).

The model of Shannon's "domino" experiments, made a proper distribution by smoothing. It is not
trained by gradients: `count` adds a stretch of the train stream's k-grams (k = 1..n) to its
tables, and the trainer (trainer/count.py) streams the train split through it once.

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .) + D_k * N_k(h .) / c_k(h .) * P_{k-1}(w | h')

Interpolated Kneser-Ney (Chen & Goodman 1998, one discount per order): h is the last k-1 tokens,
h' the last k-2; P_0 is uniform over the vocabulary; c_k(h .) sums c_k(h w) over w and N_k(h .)
counts the w with c_k(h w) > 0. The top order n counts occurrences; a lower order counts
continuations, the distinct tokens seen before the k-gram (N1+(. h w), Kneser and Ney's point:
"Francisco" is frequent but follows almost only "San", so as a backoff it should be rare).
D_k = n1 / (n1 + 2 n2) from the order's count-of-counts (n1 k-grams counted once, n2 twice); with
no k-gram counted once it falls back to 0.5, as KenLM's `--discount_fallback` does. A context
never seen (c_k(h .) = 0) passes P_{k-1} on unchanged. Each P_k sums to 1 because D_k <= 1.
`smoothing: add_k` is the textbook alternative: P(w | h) = (c_n(h w) + k) / (c_n(h .) + k V).

Design decisions:
- A position with only j < n-1 earlier tokens in its window (the start of a window or of a
  prompt) is predicted as the order-(j+1) model would: order j+1 counts occurrences there, the
  orders below it continuations. So every position of every window has a well-defined
  distribution, and generation equals a full recompute of the window.
- Tables: for each order k, the distinct k-grams as sorted int64 keys `id(first k-1 tokens) *
  V + last token`, where id() is a (k-1)-gram's index in the order below's sorted table, and
  their occurrence counts. Keys never overflow, whatever the vocabulary and order (an id is below
  the number of distinct (k-1)-grams), and since ids are ranks the tables are canonical: a
  function of the counted text alone, however it was cut into chunks. Memory grows with the
  number of distinct k-grams, not with the corpus.
- The checkpoint holds the occurrence counts of every order (the buffers `keys_k`, `counts_k`:
  `state_dict()` is the checkpoint's `model`); continuation counts, per-context sums and
  discounts are derived from them on first use after counting, loading or moving the model.
- forward returns log-probabilities as the logits, so every tool that applies a softmax or a
  cross-entropy to logits (evaluation, sampling) gets the model's own distribution back. They
  are float64 (positions, V) rows, computed WORKING_SET entries at a time: the recursion is
  unrolled into a weight per order, so the dense work is the uniform term and order 1, and each
  higher order adds only its context's followers (a ragged gather), whatever the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.checks import choice, in_range, positive
from common.errors import UserError
from model.base import IGNORE, LanguageModel, ModelConfig

MAX_ORDER = 8
FALLBACK_DISCOUNT = 0.5
WORKING_SET = 1 << 22  # probabilities computed at once (positions x vocabulary), 32 MB in float64


@dataclass
class NgramConfig(ModelConfig):
    ngram_order: int = 6  # n: the next token is predicted from the last n-1 tokens (1-8)
    smoothing: str = "kneser_ney"  # kneser_ney (interpolated, a discount per order) | add_k
    add_k: float = 1.0  # smoothing=add_k: the count added to every token of the vocabulary (1 = Laplace)

    def validate(self):
        super().validate()
        in_range(self, "model", "ngram_order", 1, MAX_ORDER)
        choice(self, "model", "smoothing", ("kneser_ney", "add_k"))
        positive(self, "model", "add_k")
        if self.block_size < self.ngram_order - 1:
            raise UserError(f"model.block_size={self.block_size} is shorter than the context of model.ngram_order="
                            f"{self.ngram_order} ({self.ngram_order - 1} tokens)")


def discount(counts: np.ndarray) -> float:
    """Kneser-Ney's D = n1 / (n1 + 2 n2) from a table's count-of-counts."""
    n1, n2 = int(np.count_nonzero(counts == 1)), int(np.count_nonzero(counts == 2))
    return n1 / (n1 + 2 * n2) if n1 else FALLBACK_DISCOUNT


def segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of values[starts[i]:starts[i+1]] for every i."""
    cumulative = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


@dataclass
class Order:
    """What scoring needs of one order k, derived from the counts (tensors on the model's device).
    Every order is one step of the same recursion, at a position whose context h was counted:

        P_k(w | h) = (weight[h] * P_{k-1}(w | h') + numerator[h w]) / denominator[h]

    Kneser-Ney: numerator = max(c(h w) - D, 0), weight = D * N(h .), denominator = c(h .);
    add-k: numerator = c(h w), weight = k V, denominator = c(h .) + k V (from uniform P_{k-1}).
    Each table comes in two forms, stacked: [0] from occurrence counts (the position's highest
    order) and [1] from continuation counts (the orders below it); index form * size + index.
    Contexts are indexed by their id in order k-1's table (order 1 has one, the empty context)."""

    keys: torch.Tensor  # (T,) sorted k-gram keys: context id * V + last token
    token: torch.Tensor  # (2 T,) each k-gram's last token, once per form (so one index serves both)
    starts: torch.Tensor  # (C + 1,) context h's k-grams are keys[starts[h]:starts[h + 1]]
    numerators: torch.Tensor  # (2 T,) per k-gram and form
    weights: torch.Tensor  # (2 C,) per context and form: the lower order's share, times denominator
    denominators: torch.Tensor  # (2 C,) per context and form; 0 = never followed: the lower order stands


class Ngram(LanguageModel):
    trainable = False  # counted, not trained: trainer/count.py fits it

    def __init__(self, cfg: NgramConfig):
        super().__init__(cfg)
        self.n, self.V = cfg.ngram_order, cfg.vocab_size
        for k in range(1, self.n + 1):
            self.register_buffer(f"keys_{k}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"counts_{k}", torch.zeros(0, dtype=torch.long))
        self._orders: list[Order] | None = None  # derived from the counts on first use

    # Counting -----------------------------------------------------------------------------------

    def table(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Order k's (sorted keys, occurrence counts)."""
        return getattr(self, f"keys_{k}"), getattr(self, f"counts_{k}")

    @property
    def span(self) -> int:
        """The longest k-gram counted (trainer/count.py overlaps its chunks by span - 1 tokens)."""
        return self.n

    def count(self, tokens: np.ndarray, starts: int):
        """Add the k-grams of every order that start at tokens[0:starts] and end inside tokens.
        A stream cut into chunks that overlap by n-1 tokens (trainer/count.py) is thus counted
        exactly once, k-grams across the cuts included."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) and tokens.max() >= self.V:
            raise UserError(f"token id {int(tokens.max())} is outside model.vocab_size={self.V}")
        device = self.keys_1.device
        prefix_ids = np.zeros(max(starts, 0), dtype=np.int64)  # the id of each k-gram's first k-1 tokens
        remap = None  # the order below's old ids -> new ids, when its table grew
        for k in range(1, self.n + 1):
            keys, counts = (t.cpu().numpy() for t in self.table(k))
            if remap is not None and len(keys):  # monotone in the old id: keys stay sorted
                keys = remap[keys // self.V] * self.V + keys % self.V
            m = max(min(starts, len(tokens) - k + 1), 0)
            grams = prefix_ids[:m] * self.V + tokens[k - 1:k - 1 + m]
            new_keys, new_counts = np.unique(grams, return_counts=True)
            merged = np.union1d(keys, new_keys)
            merged_counts = np.zeros(len(merged), dtype=np.int64)
            remap = np.searchsorted(merged, keys)
            merged_counts[remap] += counts
            merged_counts[np.searchsorted(merged, new_keys)] += new_counts
            prefix_ids = np.searchsorted(merged, grams)
            setattr(self, f"keys_{k}", torch.from_numpy(merged).to(device))
            setattr(self, f"counts_{k}", torch.from_numpy(merged_counts).to(device))
        self._orders = None

    def num_params(self) -> int:
        """An n-gram model's parameters are its counts: one per distinct k-gram of every order."""
        return sum(self.table(k)[0].numel() for k in range(1, self.n + 1))

    def flops_per_token(self) -> int:
        return 0  # no matmuls: lookups and additions

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The tables take the checkpoint's sizes (a freshly built model's are empty) before loading.
        for name, buffer in self._buffers.items():
            if prefix + name in state_dict:
                self._buffers[name] = buffer.new_empty(state_dict[prefix + name].shape)
        self._orders = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._orders = None  # derived tensors live on the old device: derive again
        return super()._apply(fn, recurse)

    # Deriving what scoring needs ----------------------------------------------------------------

    def orders(self) -> list[Order]:
        if self._orders is None:
            self._orders = self._derive()
        return self._orders

    def _derive(self) -> list[Order]:
        V, device = self.V, self.keys_1.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        keys = [self.table(k)[0].cpu().numpy() for k in range(1, self.n + 1)]
        occurrences = [self.table(k)[1].cpu().numpy() for k in range(1, self.n + 1)]
        # Suffix links: the id of each k-gram without its first token, in order k-1's table. Every
        # counted k-gram's suffix was counted too (it starts one position later).
        suffix = [np.zeros(len(keys[0]), dtype=np.int64)]
        for k in range(2, self.n + 1):
            prefix, last = np.divmod(keys[k - 1], V)
            suffix.append(np.searchsorted(keys[k - 2], suffix[k - 2][prefix] * V + last))
        # A k-gram's continuations (k < n): the distinct (k+1)-grams that end with it.
        continuations = [np.bincount(suffix[k], minlength=len(keys[k - 1])) for k in range(1, self.n)]
        add = self.cfg.add_k * V if self.cfg.smoothing == "add_k" else 0.0
        orders = []
        for k in range(1, self.n + 1):
            starts = np.searchsorted(keys[k - 1] // V, np.arange((len(keys[k - 2]) if k > 1 else 1) + 1))
            numerators, weights, denominators = [], [], []
            for counts in (occurrences[k - 1], continuations[k - 1] if k < self.n else occurrences[k - 1]):
                D = discount(counts) if self.cfg.smoothing == "kneser_ney" else 0.0
                numerators.append(np.maximum(counts - D, 0.0))
                weights.append(D * segment_sums(counts > 0, starts) + add)
                denominators.append(segment_sums(counts, starts) + add)
            orders.append(Order(*(torch.as_tensor(a, dtype=torch.long, device=device)
                                  for a in (keys[k - 1], np.tile(keys[k - 1] % V, 2), starts)),
                                *(torch.as_tensor(np.concatenate(a), dtype=dtype, device=device)
                                  for a in (numerators, weights, denominators))))
        return orders

    # Scoring ------------------------------------------------------------------------------------

    def context_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """(n, B, T): at [j, b, t] the id of the j tokens ending at idx[b, t] in order j's table;
        -1 where they reach before the window or were never counted. Row 0: the empty context."""
        B, T = idx.shape
        ids = [torch.zeros(B, T, dtype=torch.long, device=idx.device)]
        for j in range(1, self.n):
            keys = self.orders()[j - 1].keys
            before = ids[-1] if j == 1 else F.pad(ids[-1][:, :-1], (1, 0), value=-1)  # ends one token earlier
            query = before.clamp(min=0) * self.V + idx
            at = torch.searchsorted(keys, query).clamp(max=max(len(keys) - 1, 0))
            found = (before >= 0) & (keys[at] == query) if len(keys) else torch.zeros_like(before, dtype=torch.bool)
            ids.append(torch.where(found, at, -1))
        return torch.stack(ids)

    def probabilities(self, ids: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """(N, V) next-token distributions at N positions, from their context ids (n, N) and the
        order each position is predicted at (N,): the highest order its window allows.

        Order's recursion unrolled from the top down: P = sum over orders k of own_k * numerator_k
        at the context's followers, + scale / V, where own_k = (the lower-order weights of the
        orders above k, multiplied) / denominator_k and scale is the product of them all. So the
        dense work is the uniform term and order 1 (one context, whose followers are the whole
        vocabulary); the higher orders add only their contexts' followers, however large V."""
        orders, N, V = self.orders(), len(top), self.V
        scale = torch.ones(N, dtype=orders[0].weights.dtype, device=top.device)
        own = []
        for k in range(self.n, 0, -1):
            order, context = orders[k - 1], ids[k - 1]
            C = len(order.starts) - 1
            at_top = top == k
            active = (at_top if self.cfg.smoothing == "add_k" else top >= k) & (context >= 0) & (C > 0)
            slot = (~at_top).long() * C + context.clamp(min=0)  # form * C + context
            denominator = order.denominators[slot] if C else scale
            active &= denominator > 0  # a context never followed leaves the order below alone
            denominator = denominator.masked_fill(~active, 1.0)
            own.append(torch.where(active, scale / denominator, 0.0))
            scale = torch.where(active, scale * order.weights[slot] / denominator, scale) if C else scale
        probs = (scale / V)[:, None].repeat(1, V)
        for k, weight in zip(range(self.n, 0, -1), own):
            order, at_top = orders[k - 1], top == k
            if len(order.starts) == 2:  # order 1: every row's followers are the whole table, as two dense rows
                followers = probs.new_zeros(2, V).index_put_((torch.tensor([0, 1], device=top.device)[:, None],
                                                               order.token.view(2, -1)), order.numerators.view(2, -1))
                probs += torch.where(at_top[:, None], followers[0], followers[1]) * weight[:, None]
                continue
            # Each active row's followers: the k-grams starts[h] .. starts[h + 1] - 1, a ragged gather.
            # Entry e is row i's when i spans end at or before e. (Not with repeat_interleave: on CPU it
            # enters a parallel region even for a few elements, which costs milliseconds on a busy
            # machine, most of a generation step.)
            rows = weight.nonzero().squeeze(1)
            first = order.starts[ids[k - 1][rows]]
            lengths = order.starts[ids[k - 1][rows] + 1] - first
            ends = lengths.cumsum(0)
            total = int(ends[-1]) if len(ends) else 0
            i = torch.zeros(total + 1, dtype=torch.long, device=top.device).index_add_(0, ends, torch.ones_like(ends))
            i = i[:-1].cumsum(0)
            base = (~at_top[rows]).long() * len(order.keys) + first - ends + lengths  # per row, in the stacked forms
            entry = base[i] + torch.arange(total, device=top.device)
            row = rows[i]
            probs.view(-1).index_add_(0, row * V + order.token[entry], weight[row] * order.numerators[entry])
        return probs

    def log_probs(self, idx: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """log P(next token | up to n-1 earlier tokens of idx's window): (B, T, V), or (B, V) for
        the last position only."""
        B, T = idx.shape
        ids = self.context_ids(idx)
        top = (torch.arange(T, device=idx.device) + 2).clamp(max=self.n)  # t + 1 tokens seen: order t + 2
        if last_only:
            ids, top = ids[:, :, -1:], top[-1:]
        ids, top = ids.flatten(1), top.expand(B, -1).reshape(-1)
        logp = torch.empty(len(top), self.V, device=idx.device)
        rows = max(WORKING_SET // self.V, 1)  # positions at a time: a large vocabulary's float64 rows add up
        for i in range(0, len(top), rows):
            logp[i:i + rows] = self.probabilities(ids[:, i:i + rows], top[i:i + rows]).log()
        logp = logp.view(B, -1, self.V)
        return logp[:, -1] if last_only else logp

    def forward(self, idx, targets=None):
        logits = self.log_probs(idx)
        loss = None
        if targets is not None:
            loss = F.nll_loss(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        return logits, loss

    # Generation ---------------------------------------------------------------------------------

    def decoder(self, use_cache: bool = True, decode: str = "dynamic", max_len: int = 0):
        return NgramDecoder(self) if use_cache else super().decoder(use_cache, decode, max_len)


class NgramDecoder:
    """An n-gram's generation state is the last n-1 tokens: each step scores the newest position
    only, from them (the full recompute scores every position of the block_size window)."""

    def __init__(self, model: Ngram):
        self.model = model
        self.keep = max(model.n - 1, 1)  # order 1 looks at no token, but a position needs one

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.log_probs(tokens[:, -self.keep:], last_only=True)
