"""GPT's decoder for rows that come and go (continuous batching): one KV cache with a slot per row.

This is GPT's `RowsDecoder` (model/engine.py): `next_logits({row id: its whole sequence so
far})` feeds each row only what it has not seen and returns each row's next-token logits. Rows
join at any step and leave with `drop`; each keeps its own position, cache fill and window.

Storage: per block, keys and values of shape (capacity, n_kv_head, block_size, head_dim), a
ring of block_size slots per row as in `KVCache` (model/kv_cache.py). The rows held occupy the
first entries; a row that leaves is replaced by the last one (one row's cache copied), so a
step reads views of the storage and never gathers the whole cache.

Per call, each row falls in one of two paths:
- exactly one new token: all such rows step together, one forward of (B, 1) with a per-row
  position tensor (`GPT.forward(start_pos=(B,))`); each row writes its key to its own slot and
  attends over its valid slots (a (B, 1, 1, S) mask over the first S slots, S the fullest row's).
- a new row, a row given several new tokens at once (forced tokens, e.g. a tool's output), or a
  learned-position row whose window is full: fed alone, one forward of (1, T) over its cached
  keys and the new ones.

Positions and windows follow `KVDecoder` exactly (learned positions restart the window from its
last half when it fills; rotary ones roll, attending over the latest block_size keys), so a row
decodes the same tokens as `generate` gives it alone (tests/test_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.layers import attention_mask


@dataclass
class _Row:
    index: int  # its entry in the storage
    offset: int  # sequence index of the first token the cache covers (the window start)
    fed: int  # tokens of the sequence fed so far

    @property
    def filled(self) -> int:
        return self.fed - self.offset


class _Layer:
    """One block's keys and values for every row, allocated at the first keys it is given (their
    heads, head size, dtype and device, so autocast needs no special case)."""

    def __init__(self, capacity: int, window: int):
        self.capacity, self.window = capacity, window
        self.k = self.v = None
        self.op = None  # what the current forward does: _Alone or _Together

    def update(self, k, v):
        if self.k is None:
            _, H, _, D = k.shape
            self.k = k.new_zeros(self.capacity, H, self.window, D)
            self.v = torch.zeros_like(self.k)
        return self.op(self, k, v)


class _Alone:
    """T new tokens of one row, after the `filled` positions its cache holds."""

    def __init__(self, index: int, filled: int, window: int):
        self.index, self.filled, self.window = index, filled, window

    def __call__(self, layer: _Layer, k, v):
        W, f, T, r = self.window, self.filled, k.shape[2], self.index
        cached = torch.arange(f - min(f, W), f, device=k.device) % W
        k_all = torch.cat([layer.k[r:r + 1, :, cached], k], dim=2)
        v_all = torch.cat([layer.v[r:r + 1, :, cached], v], dim=2)
        keep = min(T, W)
        slots = torch.arange(f + T - keep, f + T, device=k.device) % W
        layer.k[r][:, slots] = k[0, :, T - keep:]
        layer.v[r][:, slots] = v[0, :, T - keep:]
        return k_all, v_all, attention_mask(T, k_all.shape[2], W, k.device)


class _Together:
    """One new token for each of B rows: `index` (B,) their storage entries, `filled` (B,) the
    positions each holds. `prefix`: the rows are exactly entries 0..B-1, read as views."""

    def __init__(self, index, filled, window: int, prefix: bool):
        W = window
        self.index, self.slot, self.prefix = index, filled % W, prefix
        valid = torch.clamp(filled + 1, max=W)  # this token included
        self.S = int(valid.max())
        self.mask = (torch.arange(self.S, device=index.device) < valid[:, None]).view(-1, 1, 1, self.S)

    def __call__(self, layer: _Layer, k, v):
        layer.k[self.index, :, self.slot] = k[:, :, 0]
        layer.v[self.index, :, self.slot] = v[:, :, 0]
        if self.prefix:
            B = self.index.shape[0]
            return layer.k[:B, :, :self.S], layer.v[:B, :, :self.S], self.mask
        return layer.k[self.index, :, :self.S], layer.v[self.index, :, :self.S], self.mask


class KVRows:
    def __init__(self, model, capacity: int):
        self.model, self.capacity = model, capacity
        cfg = model.cfg
        self.window = cfg.block_size
        self.rolling = cfg.pos == "rope"
        self.reach = cfg.n_layer * (cfg.block_size - 1) + 1  # as KVDecoder: what n_layer windows see
        self.layers = [_Layer(capacity, self.window) for _ in range(cfg.n_layer)]
        self.rows: dict = {}  # row id -> _Row
        self.order: list = []  # row ids by storage entry

    def drop(self, row_id):
        row = self.rows.pop(row_id, None)
        if row is None:
            return
        last = self.order.pop()
        if last != row_id:  # the last entry moves into the freed one
            moved = self.rows[last]
            for layer in self.layers:
                if layer.k is not None:
                    layer.k[row.index] = layer.k[moved.index]
                    layer.v[row.index] = layer.v[moved.index]
            moved.index = row.index
            self.order[row.index] = last

    def next_logits(self, rows: dict) -> torch.Tensor:
        together, alone = [], []
        for row_id, seq in rows.items():
            n = seq.shape[0]
            row = self.rows.get(row_id)
            if row is None:
                if len(self.order) == self.capacity:
                    raise RuntimeError(f"more rows than the decoder's capacity ({self.capacity})")
                row = self.rows[row_id] = _Row(len(self.order), 0, 0)
                self.order.append(row_id)
                row.offset = row.fed = max(0, n - (self.reach if self.rolling else self.window))
            elif not self.rolling and n - row.offset > self.window:  # the window is full: restart it
                row.offset = row.fed = n - max(1, self.window // 2)
            (together if n - row.fed == 1 and row.fed > row.offset else alone).append(row_id)
        out = self._together(together, rows) if together else {}
        for row_id in alone:
            out[row_id] = self._alone(row_id, rows[row_id])
        return torch.stack([out[row_id] for row_id in rows])

    def _position(self, row: _Row) -> int:
        """The model position of the row's next token: absolute for rotary, in-window for learned."""
        return row.fed if self.rolling else row.filled

    def _alone(self, row_id, seq):
        row = self.rows[row_id]
        new = seq[row.fed:][None]
        op = _Alone(row.index, row.filled, self.window)
        logits = self._forward(new, op, self._position(row))
        row.fed = seq.shape[0]
        return logits[0]

    def _together(self, ids: list, rows: dict) -> dict:
        ids = sorted(ids, key=lambda i: self.rows[i].index)
        device = next(iter(rows.values())).device
        entries = [self.rows[i] for i in ids]
        index = torch.tensor([r.index for r in entries], device=device)
        filled = torch.tensor([r.filled for r in entries], device=device)
        positions = torch.tensor([self._position(r) for r in entries], device=device)
        if self.model.rotary is not None:
            self.model.rotary.reserve(int(positions.max()) + 1)  # a position tensor reads the tables as they are
        prefix = all(r.index == i for i, r in enumerate(entries))
        tokens = torch.stack([rows[i][-1:] for i in ids])
        logits = self._forward(tokens, _Together(index, filled, self.window, prefix), positions)
        for r in entries:
            r.fed += 1
        return dict(zip(ids, logits))

    def _forward(self, tokens, op, start_pos):
        for layer in self.layers:
            layer.op = op
        return self.model(tokens, kv_caches=self.layers, start_pos=start_pos)[0][:, -1]
