"""Atomic file writes: a reader, or a crash at any moment, sees the old file or the new one whole.

The one recipe, used for checkpoints, metrics rewinds, configs, token shards and meta.json:
write `<name>.tmp` beside the target, flush and fsync it, rename it over the target (atomic on
POSIX), then fsync the folder so the rename itself survives a power loss. A failure removes the
temporary file and leaves the target as it was.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path`'s temporary twin for writing; on a clean exit it replaces `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str):
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def publish(tmp: Path, path: Path):
    """Rename a complete, fsynced temporary file into place, durably."""
    os.replace(tmp, path)
    fsync_dir(path.parent)
