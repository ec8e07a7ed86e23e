"""File and terminal helpers. Atomic file writes: a reader sees the old file or the new one, never half.

The bytes go to a temporary file in the target's directory (same file system), are flushed to
disk, and the temporary file is renamed over the target (`os.replace` is atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "interactive"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> str:
    """Call write(file) on a temporary binary file next to `path`, then rename it to `path`.
    On any error the temporary file is removed and `path` is left as it was. Returns str(path)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> str:
    """JSON of `payload` (values JSON does not know are written as str), with a final newline."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, default=str) + "\n")


def interactive(stream: IO | None = None) -> bool:
    """True when `stream` (default: sys.stderr) is a terminal: progress bars are drawn only then."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
