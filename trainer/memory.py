"""Peak memory of this process, as the run reports it (`peak_mem_mb`): what a user compares with
the machine's memory.

- CUDA: the peak of memory allocated to tensors on the device (`torch.cuda.max_memory_allocated`),
  which is what decides whether a run fits; the caching allocator's reserve and the CUDA context
  come on top.
- CPU (and MPS, whose memory is the host's): the peak resident set size of the process
  (`getrusage`'s ru_maxrss), the torch runtime included, as `/usr/bin/time` would show it.
"""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb(device: torch.device | str) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
