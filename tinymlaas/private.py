"""Files only their owner may read, private from the moment they exist (never written first and restricted after):
signing keys, tokens, device secrets, databases."""

from __future__ import annotations

import os
from pathlib import Path


def _folder(path: Path) -> Path:
    """`path`, its folder made (0700) if it is new."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def create_private(path: Path) -> Path:
    """`path` created empty with mode 0600 if it does not exist. An existing file is never opened: closing any
    descriptor of a SQLite database drops every lock this process holds on it (POSIX), under SQLite's feet."""
    path = _folder(path)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    return path


def write_private(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically through a 0600 temporary file: no moment where others may read it."""
    path = _folder(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path
