"""Content-addressed blob stores: a local directory (default) or an S3-compatible bucket.

A blob lives at `sha256/<ab>/<digest>`. Local writes go to a temp file in the same
directory tree, are fsynced, then renamed into place, so a crash never leaves a half
file under a digest name; an S3 PUT is atomic by itself. Reads check the digest.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

import numpy as np

from adapters.peft_format import Buffer

READ_CHUNK = 2 << 20  # hashed while the next is read; 256 KiB to 4 MiB measured alike
_HASH_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="blob-sha256")  # shared by every store


class BlobNotFound(LookupError):
    pass


class BlobCorrupt(ValueError):
    pass


class BlobStore(Protocol):
    def put(self, data: Buffer) -> str: ...
    def get(self, digest: str) -> memoryview: ...
    def delete(self, digest: str) -> None: ...
    def digests(self) -> Iterator[str]: ...
    def clean_temp(self) -> int: ...


BufferFactory = Callable[[int], memoryview]  # writable memory for a blob of that many bytes (`blob_buffer`)


def open_blob_store(url: str, buffer: BufferFactory | None = None) -> BlobStore:
    """`s3://bucket/prefix` (endpoint and region from the query, `?endpoint=http://...&region=...`,
    or the usual AWS settings), `file:///path`, or a plain directory path. `buffer`: where `get`
    puts a blob's bytes (`blob_buffer` unless given)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from adapters.s3store import S3BlobStore  # boto3 only where S3 is used

        query = parse_qs(parsed.query)
        return S3BlobStore(parsed.netloc, parsed.path.strip("/"), endpoint_url=query.get("endpoint", [None])[0],
                           region=query.get("region", [None])[0], buffer=buffer)
    if parsed.scheme == "file":
        return LocalBlobStore(Path(parsed.path), buffer)
    if parsed.scheme:
        raise ValueError(f"unknown blob store URL scheme {parsed.scheme!r}: use a path, file:// or s3://")
    return LocalBlobStore(Path(url), buffer)


def verify_blob(data: Buffer, digest: str) -> None:
    """Raise BlobCorrupt unless `data` hashes to `digest`."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise BlobCorrupt(f"blob {digest} does not match its digest")


def blob_buffer(size: int) -> memoryview:
    """Writable memory for a blob's bytes, not zeroed: every byte is read into before anyone sees it.

    A `bytearray` zero-fills its pages and the read then writes them again; new pages are what an
    adapter load pays most for on a VM (~2 ms per MB here). numpy also asks for transparent huge
    pages for an array this large. Read + sha256 of a 19 MB adapter in a running worker, six
    interleaved rounds: 63.6 ms median with a bytearray, 56.3 ms with this. (The worker's adapter
    loads now use its own, `worker.adapter_cache.host_buffer`: those huge pages cost it more.)
    """
    return np.empty(size, dtype=np.uint8).data


def check_digest(digest: str) -> str:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BlobNotFound(f"not a sha256 digest: {digest!r}")
    return digest


class LocalBlobStore:
    def __init__(self, root: Path, buffer: BufferFactory | None = None) -> None:
        self.root = Path(root)
        self._buffer = buffer or blob_buffer
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

    def get(self, digest: str) -> memoryview:
        """The blob's bytes (writable, so tensors can view them without a copy), checked against the digest.

        Read in chunks, each hashed on another thread while the next is read (hashlib lets go of the
        GIL): a 19 MB adapter not in the page cache took 27.5 ms (median) so, 36.8 ms read whole and
        then hashed; from the page cache 20 ms either way.
        """
        path = self.path_for(digest)
        hasher = hashlib.sha256()
        hashed: Future[None] | None = None  # the latest chunk's update; each waits for the one before
        try:
            with path.open("rb") as f:
                data = self._buffer(os.fstat(f.fileno()).st_size)
                done = 0
                while done < len(data):
                    got = f.readinto(data[done : done + READ_CHUNK])
                    if not got:
                        raise BlobCorrupt(f"blob {digest} changed size while being read")
                    if hashed is not None:
                        hashed.result()  # updates in file order
                    hashed = _HASH_THREADS.submit(hasher.update, data[done : done + got])
                    done += got
                if f.read(1):
                    raise BlobCorrupt(f"blob {digest} changed size while being read")
        except FileNotFoundError as exc:
            raise BlobNotFound(digest) from exc
        finally:
            if hashed is not None:
                hashed.result()  # nothing hashes the buffer after this returns
        if hasher.hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest} does not match its digest")
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
