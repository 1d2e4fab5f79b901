"""Crash-safe file writes: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path` atomically,
    so a crash never leaves a half-written file under the final name."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp, which makes the file 0600: opened as open() would, the umask gives the mode
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
