"""The one atomic writer, for files and folders, without torch (so `bertforge prepare` and its workers
never import it): write a temporary sibling, fsync it, rename it over the target, fsync the parent. A killed
write leaves the old target (or none) and a hidden `.NAME.*.tmp` / `.NAME.tmp-*` beside it that later runs
ignore or clear. Models (`model/loading.py`), checkpoints (`train/checkpoint.py`), embeddings, corpora and
every JSON/text output go through here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """Yield a temp file's path beside `path`; when the block ends without an error, fsync it and rename it
    over `path`; otherwise delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_replace(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path` (torch.save, np.save ...), then put it in place."""
    with _replacing(Path(path)) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))


@contextmanager
def atomic_open(path: Path, mode: str = "wb", **kwargs) -> Iterator:
    """`with atomic_open(path, "w") as fh:` writes a temp sibling that replaces `path` only when the block
    ends without an error."""
    with _replacing(Path(path)) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def atomic_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` on a temp folder beside `target`, fsync every file, then put it in `target`'s
    place (an older `target` is moved aside first and deleted after; restored if the rename fails)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    old = None
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            _fsync_file(f) if f.is_file() else fsync_dir(f)
        fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and old.exists() and target.exists():
            shutil.rmtree(old)


def clear_stale(folder: Path, name: str = "*") -> None:
    """Remove the temp leftovers of killed atomic writes of `name` in `folder`."""
    for stale in [*Path(folder).glob(f".{name}.tmp-*"), *Path(folder).glob(f".{name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
