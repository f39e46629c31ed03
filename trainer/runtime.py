"""Where and how the math runs: device, precision, seeds, threads.

`auto` picks cuda, then mps, then cpu. Precision `auto` is bf16 autocast on GPUs that support
it, fp16 autocast with a gradient scaler on older GPUs, and fp32 on CPU and MPS (CPU bf16 is
slower than fp32 on most CPUs, and fp32 keeps CPU runs bit-reproducible).

On CPU, `keep_freed_memory` stops glibc from handing freed activation memory back to the
kernel: a training step frees and reallocates the same megabyte-sized buffers every time, and
by default each comes back as fresh pages that fault in one by one (1,000-2,600 page faults per
step on nanoGPT's CPU shape; none after it).
"""

from __future__ import annotations

import contextlib
import ctypes
import random
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast

    @property
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device='mps' but MPS is not available here; use auto or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise UserError("train.dtype=float16 is not supported on CPU; use float32 or bfloat16")
    return DTYPES[name]


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse (the process's memory then stays at its
    peak, which a training run reaches every step anyway). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's cap: only blocks above 32 MB get their own mapping
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # never shrink the heap for less than 1 GB free at its top
    libc.mallopt(M_TOP_PAD, 64 << 20)  # and grow it 64 MB at a time


def setup_runtime(train_cfg) -> Runtime:
    device = pick_device(train_cfg.device)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if train_cfg.attention != "auto":  # one kernel family only, so PyTorch cannot fall back to another
            for name, enable in (("flash", torch.backends.cuda.enable_flash_sdp),
                                 ("cudnn", torch.backends.cuda.enable_cudnn_sdp),
                                 ("efficient", torch.backends.cuda.enable_mem_efficient_sdp),
                                 ("math", torch.backends.cuda.enable_math_sdp)):
                enable(name == train_cfg.attention)
    return Runtime(device, pick_dtype(train_cfg.dtype, device))


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states as plain values and tensors (for weights-only checkpoints)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def compile_with_fallback(module, log=print, **compile_options):
    """torch.compile(module) (a module or function), falling back to the eager one, with one line
    saying why, when compilation fails (an unsupported toolchain, a compiler bug): a run should
    not die of it. Only a failure of the compiler falls back: an error the step itself raises (out
    of memory, a token id out of range, a shape that does not fit) propagates as itself, as it
    would in eager mode, instead of being retried there and hidden."""
    compiled = torch.compile(module, **compile_options)
    current = [compiled]

    def call(*args, **kwargs):
        try:
            return current[0](*args, **kwargs)
        except Exception as e:
            if current[0] is module or not is_compiler_failure(e):
                raise
            cause = getattr(e, "inner_exception", None) or e  # the backend's own error, under Dynamo's wrapper
            reason = (str(cause).strip().splitlines() or [""])[0][:160]
            log(f"torch.compile failed ({type(cause).__name__}: {reason}); continuing without it")
            current[0] = module
            return module(*args, **kwargs)

    return call


def is_compiler_failure(e: BaseException) -> bool:
    """Whether an exception out of a compiled call is the compiler's own failure. Dynamo and
    Inductor wrap theirs in TorchDynamoException subclasses; two of those carry the program's
    own errors instead (TorchRuntimeError: an op that fails on the traced shapes; Observed*: an
    exception the code raised), and an out-of-memory error anywhere in the chain is the
    program's too, even when it struck while compiling."""
    from torch._dynamo.exc import ObservedException, TorchDynamoException, TorchRuntimeError

    chain, cause = [], e
    while cause is not None and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return (isinstance(e, TorchDynamoException) and not isinstance(e, (TorchRuntimeError, ObservedException))
            and not any(isinstance(c, torch.OutOfMemoryError) for c in chain))
