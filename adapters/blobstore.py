"""Content-addressed blob store on a local directory.

A blob lives at `<root>/sha256/<ab>/<digest>`. Writes go to a temp file in the same
directory tree, are fsynced, then renamed into place, so a crash never leaves a half
file under a digest name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobNotFound(LookupError):
    pass


class BlobCorrupt(ValueError):
    pass


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BlobNotFound(f"not a sha256 digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store bytes; return their sha256. Idempotent."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        if final.exists():
            return digest
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str, *, verify: bool = True) -> bytes:
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc
        if verify and hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest} does not match its digest")
        return data

    def delete(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)

    def clean_temp(self) -> int:
        """Remove temp files left by a crash mid-write; return how many."""
        removed = 0
        for leftover in self._tmp.glob("blob-*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
