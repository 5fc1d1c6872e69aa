"""Atomic file writes without torch (so `bertforge prepare` and its workers never import it): write a
temporary sibling, fsync it, rename it over the target, fsync the folder. A killed write leaves the old
file (or none) and a hidden `.NAME.*.tmp` that later runs ignore or clear. Checkpoints
(`bertforge.train.checkpoint`) build on these.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))
