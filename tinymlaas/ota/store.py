"""A content-addressed artifact store: files named by their SHA-256, written once, atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyError(digest)
        return self.root / digest[:2] / digest

    def __contains__(self, digest: str) -> bool:
        try:
            return self.path(digest).exists()
        except KeyError:
            return False

    def put_file(self, src: Path) -> str:
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        dst = self.path(digest)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".incoming-")
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            except BaseException:  # a full disk: no partial file left behind
                os.unlink(tmp)
                raise
        return digest

    def put_bytes(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:  # removed however it ends: a full disk leaves no partial file behind
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.put_file(Path(tmp))
        finally:
            os.unlink(tmp)

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()
