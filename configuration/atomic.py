"""Atomic file writes: a file that marks a step done (a completion marker, `analysis.json`, `cell.json`,
`timings.json`, a rewritten log) is either absent or whole, whenever the process writing it is killed.

The text goes to a sibling `<name>.partial` first, is flushed to disk, and is renamed over the final name
(`os.replace`, atomic on POSIX and Windows within one file system). A reader that checks a file's presence, or
parses it, never sees half of it; a kill leaves at most a stale `.partial` beside it, overwritten by the next write.

Dependency-free, like `configuration.contract`: any module may import it at no cost.
"""

from __future__ import annotations

import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` all at once: the old content or the new, never a mix."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        # The rename must not reach the disk before the data does (a crash or power loss, not only a kill).
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


__all__ = ["PARTIAL_SUFFIX", "write_atomic"]
