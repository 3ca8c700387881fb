"""File helpers every part shares: atomic writes (temp file or folder beside the target, rename) and file hashing.

A reader never sees half a file: it sees the old one or the new one, and an interrupted write leaves no file behind.
This module imports nothing from ``finetune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_dir", "atomic_file", "finetune_home", "free_bytes", "sha256_file", "write_atomic"]


def finetune_home() -> Path:
    """Where finetune keeps its registry and caches: ``$FINETUNE_HOME``, default ``~/.finetune``."""
    return Path(os.environ.get("FINETUNE_HOME") or Path.home() / ".finetune").expanduser()


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on a clean exit it replaces ``path``.

    For outputs too large to hold in memory (a dataset zip is streamed through it). The file gets the permissions a
    plain ``open(path, "wb")`` would; ``mkstemp`` alone would leave it 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A new hidden folder beside ``path`` to fill; on a clean exit it is renamed to ``path``, else removed.

    ``path`` must not exist when the block ends (a caller that replaces a folder removes the old one last, inside
    the block). Readers see the whole folder or none of it; an interrupted write leaves only a hidden temp folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; the partial folder otherwise


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (a str is UTF-8 encoded) to ``path`` atomically; parent folders are created."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (memory stays flat for large zips and weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds ``path``, or that will hold it (its nearest existing parent)."""
    probe = Path(path).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
