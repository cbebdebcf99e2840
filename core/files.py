"""Atomic file writes: the one helper every module that replaces a file uses (bundles, plans, state, frames)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a reader sees the old file or the new one, never half of either.

    The temporary name carries the process and thread, so two writers of one path never share a temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (bundles hold files of hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
