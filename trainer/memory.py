"""Memory as the process sees it: what it uses now, its peak so far, and what the device has free.

- Peak: on CUDA, `torch.cuda.max_memory_allocated` (the tensors' bytes; the caching allocator's
  reserve and the CUDA context are not in it). On CPU, the peak resident set size of this
  process, the torch runtime's own baseline included: `VmHWM` from /proc/self/status where
  there is one (it belongs to the current program, so a launcher's memory never leaks into it,
  which `getrusage`'s ru_maxrss can do across fork and exec), else ru_maxrss (kilobytes on Linux,
  bytes on macOS). MPS: the driver's allocation now (MPS keeps no peak).
- Available: on CUDA the free memory of the device (`torch.cuda.mem_get_info`); on CPU
  `MemAvailable` from /proc/meminfo, lowered to what a cgroup (container) limit leaves, plus
  what this process already holds (the estimate counts the runtime's own memory). The
  environment variable `GPT_TRAINER_MEMORY_LIMIT_MB` replaces it with a fixed figure, the
  memory the process may use in all: for tests, and for planning a run for a smaller machine.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

LIMIT_ENV = "GPT_TRAINER_MEMORY_LIMIT_MB"
MB = 2**20


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """This process's resident memory now (0 where the platform does not say)."""
    kb = _proc_status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def peak_memory_mb(device: torch.device | str) -> float | None:
    """The peak memory of this process on `device` so far, in MiB (None where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / MB
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def _cgroup_headroom() -> int | None:
    """Bytes a cgroup v2 memory limit still allows this container, or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes this process could still allocate on `device`, where that figure comes from)."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        return int(float(limit) * MB), f"{LIMIT_ENV}={limit}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(), "MPS recommended maximum"
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # the platform does not say: nothing to check against
            return sys.maxsize, "unknown"
    where = "available RAM"
    headroom = _cgroup_headroom()
    if headroom is not None and headroom < free:
        free, where = headroom, "the container's memory limit"
    # The estimate counts this process's own memory (the runtime), so that is available to it too.
    return free + current_rss_bytes(), where
