"""Making writes survive a crash of the machine: flushing a file's bytes and a folder's names to disk. Used by
the checkpoints (hf_streamlm.train.checkpoint) and the document trace (hf_streamlm.data.trace)."""

from __future__ import annotations

import os
from pathlib import Path


def sync_dir(path: Path) -> None:
    """fsync a folder: makes the names in it (a rename, a new file) durable (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; nothing more can be done there
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to disk before returning."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
