"""Content-addressed blob stores: a local directory (default) or an S3-compatible bucket.

A blob lives at `sha256/<ab>/<digest>`. Local writes go to a temp file in the same
directory tree, are fsynced, then renamed into place, so a crash never leaves a half
file under a digest name; an S3 PUT is atomic by itself. Reads check the digest.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

from adapters.peft_format import Buffer


class BlobNotFound(LookupError):
    pass


class BlobCorrupt(ValueError):
    pass


class BlobStore(Protocol):
    def put(self, data: Buffer) -> str: ...
    def get(self, digest: str, *, verify: bool = True) -> bytearray: ...
    def delete(self, digest: str) -> None: ...
    def digests(self) -> Iterator[str]: ...
    def clean_temp(self) -> int: ...


def open_blob_store(url: str) -> BlobStore:
    """`s3://bucket/prefix` (endpoint and region from the query, `?endpoint=http://...&region=...`,
    or the usual AWS settings), `file:///path`, or a plain directory path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from adapters.s3store import S3BlobStore  # boto3 only where S3 is used

        query = parse_qs(parsed.query)
        return S3BlobStore(parsed.netloc, parsed.path.strip("/"), endpoint_url=query.get("endpoint", [None])[0],
                           region=query.get("region", [None])[0])
    if parsed.scheme == "file":
        return LocalBlobStore(Path(parsed.path))
    if parsed.scheme:
        raise ValueError(f"unknown blob store URL scheme {parsed.scheme!r}: use a path, file:// or s3://")
    return LocalBlobStore(Path(url))


def verify_blob(data: Buffer, digest: str) -> None:
    """Raise BlobCorrupt unless `data` hashes to `digest` (for callers that read with verify=False
    to check on another thread while they parse)."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise BlobCorrupt(f"blob {digest} does not match its digest")


def check_digest(digest: str) -> str:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BlobNotFound(f"not a sha256 digest: {digest!r}")
    return digest


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: Buffer) -> str:
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

    def get(self, digest: str, *, verify: bool = True) -> bytearray:
        """The blob's bytes (writable, so tensors can view them without a copy), checked against the digest."""
        path = self.path_for(digest)
        try:
            with path.open("rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                if f.readinto(data) != len(data):
                    raise BlobCorrupt(f"blob {digest} changed size while being read")
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc
        if verify:
            verify_blob(data, digest)
        return data

    def delete(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        """Every stored blob's digest."""
        for path in (self.root / "sha256").glob("*/*"):
            if len(path.name) == 64 and path.parent.name == path.name[:2]:
                yield path.name

    def clean_temp(self) -> int:
        """Remove temp files left by a crash mid-write; return how many."""
        removed = 0
        for leftover in self._tmp.glob("blob-*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
