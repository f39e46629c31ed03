"""GPT's generation state: a KV cache per block, and the policy at the end of the context window.

The prompt is prefilled in one forward pass that fills each block's `KVCache`; every new token
then costs one position. What happens when the context window (block_size) fills depends on
how the model encodes positions, and `KVDecoder` owns that policy for both paths:

- Learned positions have no embedding past block_size and cannot slide (every token's
  position would change), so the window restarts from its last half: one prefill of
  block_size/2 tokens per block_size/2 new tokens, an amortised cost. A prompt longer than
  the window keeps its last block_size tokens.
- Rotary positions only ever enter attention as offsets, so the cache rolls: it keeps the
  last block_size keys, already rotated at their absolute positions (the rotary tables grow
  on demand), and each query sees the block_size latest keys, as in training. This is
  sliding-window attention; deeper layers still carry older context through the cached keys.

`use_cache=False` is the slow reference path (`sample.py --no-kv-cache`): it recomputes, for
every token, a full forward pass of exactly what the cached path computes, so the two give the
same tokens and can be checked against each other. For learned positions that is the current
window; for rotary ones the last n_layer * (block_size - 1) + 1 tokens at their absolute
positions, since a sliding window of block_size per layer reaches back exactly that far.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from model.layers import attention_mask


_update_outside_compile = None  # KVCache._update behind torch.compiler.disable, made on first need


class KVCache:
    """Keys and values of one block for its latest `window` positions.

    A ring buffer: position p lives in slot p % window, allocated on first use with the
    batch, heads (n_kv_head: grouped-query attention caches only the shared heads) and dtype
    of the keys it is given (so autocast needs no special case), and kept for the cache's
    life (a restart only rewinds `pos`), so a captured CUDA graph stays valid. `update`
    returns what the new queries attend to and the mask for it (None: no mask, or causal):
    - several new tokens (a prefill): the cached keys in order, then the new ones;
    - one new token: the valid slots (in any order once the ring has wrapped, which attention
      does not mind, and all within its window);
    - one new token in `DecodeStep`, which sets `fixed` for its steps only (the slot to write,
      a (1,) device tensor, and the (1, window) mask of the valid slots): every slot, masked.
      Fixed shapes, nothing read on the host: the same kernels serve every position, which is
      what a captured step (a CUDA graph, a trace) needs."""

    def __init__(self, window: int):
        self.window = window
        self.pos = 0  # positions seen so far
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.k = self.v = None

    def reset(self):
        self.pos = 0

    def update(self, k, v):
        # Kept out of torch.compile: its Python-int bookkeeping would make the compiler specialise
        # (and recompile) on every position; the model's math around it compiles with dynamic
        # shapes. Only once the compiler is loaded (nothing compiles before): importing it takes
        # about a second, which an eager run, the CPU default, need not pay.
        if "torch._dynamo" in sys.modules:
            global _update_outside_compile
            _update_outside_compile = _update_outside_compile or torch.compiler.disable(KVCache._update)
            return _update_outside_compile(self, k, v)
        return self._update(k, v)

    def _update(self, k, v):
        B, H, T, D = k.shape
        W = self.window
        if self.k is None:
            self.k = k.new_zeros(B, H, W, D)
            self.v = torch.zeros_like(self.k)
        if self.fixed is not None:  # the fixed-shape decode step (one token); DecodeStep advances pos
            slot, mask = self.fixed
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            return self.k, self.v, mask
        if T == 1:  # the decode step: no copy of the past, no mask
            slot = self.pos % W
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.pos += 1
            n = min(self.pos, W)
            return self.k[:, :, :n], self.v[:, :, :n], None
        cached = torch.arange(self.pos - min(self.pos, W), self.pos, device=k.device) % W
        k_all = torch.cat([self.k[:, :, cached], k], dim=2)
        v_all = torch.cat([self.v[:, :, cached], v], dim=2)
        keep = min(T, W)
        slots = torch.arange(self.pos + T - keep, self.pos + T, device=k.device) % W
        self.k[:, :, slots] = k[:, :, T - keep:]
        self.v[:, :, slots] = v[:, :, T - keep:]
        self.pos += T
        return k_all, v_all, attention_mask(T, k_all.shape[2], W, k.device)


class DecodeStep:
    """The one-token step (every row gets one new token) over fixed-shape caches, optionally
    captured once and replayed for every token (`capture`):

    - "graph": a CUDA graph. At batch 1 a small model's decode step is a few hundred tiny
      kernels, and launching them from Python costs more than running them; a replay launches
      them all at once. Autocast runs without its weight-cast cache here: casts cached outside
      the graph could be freed while the graph still reads them.
    - "trace": a TorchScript trace, for the CPU in float32. There the kernels are cheap but
      Python is not: module calls, views and argument parsing around ~250 operators cost about
      a third of a token of nanoGPT's Shakespeare shape (bench/generate.py --profile). The
      trace runs the same operators from C++, so its logits are the eager step's bit for bit.
      Tracing freezes whatever the step reads on the host, which is why a step that converts a
      tensor to a Python number (a TracerWarning) is not traced but run eagerly.

    The inputs live in fixed tensors (the token, its model position, the caches' fill) that are
    written before each replay, and nothing in the step is read back on the host."""

    def __init__(self, model, caches: list[KVCache], batch: int, device, capture: str | None):
        self.model, self.caches = model, caches
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # the token's model position
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # positions already cached
        self.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        self.capture = capture
        self.replay = None  # the captured step: a callable returning the logits

    def _forward(self):
        # The caches take their fixed-shape path for this step only: a prefill (a restarted
        # window) may run between steps. Telling them so, rather than letting them test the
        # token count, keeps the shapes out of Python conditions, which a trace would freeze.
        window = self.caches[0].window
        fixed = (self.filled % window).view(1), (torch.arange(window, device=self.filled.device) <= self.filled)[None]
        for cache in self.caches:
            cache.fixed = fixed
        enabled, dtype = self.autocast
        try:
            with torch.autocast(self.token.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
                return self.model(self.token, kv_caches=self.caches, start_pos=self.start)[0][:, -1]
        finally:
            for cache in self.caches:
                cache.fixed = None

    def _capture_graph(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation, compilation
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward()  # a static tensor that every replay writes again

        def replay():
            graph.replay()
            return logits
        return replay

    def _capture_trace(self):
        step = _TracedStep(self)
        inputs = (self.token, self.start, self.filled)
        with warnings.catch_warnings(record=True) as caught:
            # TorchScript is deprecated in favour of torch.compile, whose compilation takes longer on
            # a CPU than a whole sample; without it (a future torch) decoding runs eagerly.
            warnings.simplefilter("always")
            traced = torch.jit.trace(step, inputs, check_trace=False)
        frozen = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        if frozen:
            where = f"{Path(frozen[0].filename).name}:{frozen[0].lineno}"
            raise RuntimeError(f"the step reads a tensor on the host ({where}), which a trace would freeze")
        return lambda: traced(*inputs)

    def __call__(self, token: torch.Tensor, start_pos: int) -> torch.Tensor:
        # The warm-up and the capture write this token's keys to its own slot: the same values
        # the replay then writes.
        self.token.copy_(token)
        self.start.fill_(start_pos)
        self.filled.fill_(self.caches[0].pos)
        rotary = self.model.rotary
        if rotary is not None and start_pos >= rotary.cos.shape[0]:
            rotary.reserve(start_pos + 1)  # new tables: a capture that read the old ones is stale
            self.replay = None
        if self.capture and self.replay is None:
            try:
                self.replay = self._capture_graph() if self.capture == "graph" else self._capture_trace()
            except Exception as e:  # an op the capture cannot hold: decode on without one
                kind, self.capture, self.replay = self.capture, None, None
                reason = (str(e).strip().splitlines() or [""])[0][:160]
                what = "CUDA graph capture" if kind == "graph" else "TorchScript trace"
                print(f"{what} failed ({type(e).__name__}: {reason}); decoding without it", file=sys.stderr)
        logits = self._forward() if self.replay is None else self.replay()
        for cache in self.caches:
            cache.pos += 1
        return logits


class _TracedStep(torch.nn.Module):
    """What `torch.jit.trace` records: the step as a module, so the weights stay the model's own
    parameters (a trace keeps other tensors as constants, and refuses ones that need grad). The
    tracer binds the step's input tensors to the graph's inputs by identity, which is how the
    token, position and fill written before each call reach the replay."""

    def __init__(self, step: DecodeStep):
        super().__init__()
        self.model = step.model
        self.forward_step = step._forward

    def forward(self, token, start, filled):
        return self.forward_step()


CAPTURES = ("graph", "trace")  # the decode modes whose one-token step DecodeStep captures


class KVDecoder:
    """GPT's decoder (model/base.py): what the model sees of a growing token sequence, and its
    logits for the next token.

    `next_logits(tokens)` takes the whole sequence so far (B, N), prompt included, and returns
    (B, vocab) logits; with the cache it feeds only the tokens it has not seen yet. `decode`
    picks how one-token steps run: "dynamic" (the cache's valid slots), "static" (fixed
    shapes, `DecodeStep`), or fixed shapes captured once and replayed: "graph" (a CUDA graph)
    or "trace" (a TorchScript trace on the CPU; under autocast the steps run "dynamic", whose
    weight casts are cached). A capture needs the rotary tables sized up front for `max_len`
    positions: growing them later means capturing again."""

    def __init__(self, model, use_cache: bool = True, decode: str = "dynamic", max_len: int = 0):
        self.model = model
        if decode == "trace" and torch.is_autocast_enabled(next(model.parameters()).device.type):
            decode = "dynamic"  # a trace would redo autocast's weight casts at every step
        if decode in CAPTURES and model.rotary is not None:
            model.rotary.reserve(max_len)
        self.use_cache = use_cache
        self.decode = decode
        cfg = model.cfg
        self.window = cfg.block_size
        self.rolling = cfg.pos == "rope"
        # How far back a rotary model's last position can see through n_layer sliding windows.
        self.reach = cfg.n_layer * (cfg.block_size - 1) + 1
        self.start = None  # first token of the current window (learned positions)
        self.fed = 0  # tokens already in the caches
        self.caches = None
        self.step = None  # the DecodeStep, made at the first one-token step

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._rolling(tokens) if self.rolling else self._restarting(tokens)

    def _rolling(self, tokens):
        n = tokens.shape[1]
        if not self.use_cache:
            s = max(0, n - self.reach)
            return self.model(tokens[:, s:], start_pos=s)[0][:, -1]
        if self.caches is None:
            self.fed = max(0, n - self.reach)  # older tokens cannot reach the next one
            self.caches = self._new_caches()
        return self._feed(tokens, start_pos=self.fed)

    def _restarting(self, tokens):
        n = tokens.shape[1]
        if self.start is None:
            self.start = max(0, n - self.window)
        elif n - self.start > self.window:
            self.start = n - max(1, self.window // 2)
            self.fed = self.start
            for cache in self.caches or ():
                cache.reset()
        if not self.use_cache:
            return self.model(tokens[:, self.start:])[0][:, -1]
        if self.caches is None:
            self.caches, self.fed = self._new_caches(), self.start
        return self._feed(tokens, start_pos=self.fed - self.start)

    def _feed(self, tokens, start_pos: int):
        new = tokens[:, self.fed:]
        if new.shape[1] == 1 and self.decode != "dynamic":
            if self.step is None:
                capture = self.decode if self.decode in CAPTURES else None
                self.step = DecodeStep(self.model, self.caches, new.shape[0], new.device, capture)
            logits = self.step(new, start_pos)
        else:
            logits = self.model(new, kv_caches=self.caches, start_pos=start_pos)[0][:, -1]
        self.fed = tokens.shape[1]
        return logits

    def _new_caches(self) -> list[KVCache]:
        return [KVCache(self.window) for _ in range(self.model.cfg.n_layer)]
