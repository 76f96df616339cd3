"""Blob lifetime: reference counts kept in the same transactions as the rows that refer to blobs.

Blobs are content-addressed and shared across tenants, so "no row refers to it" must be decided
under a lock, or an upload of identical content racing a delete can commit a version whose blob
was just removed. The rule: a blob is written, and removed, only while its `blobs` row is locked
(an UPDATE or INSERT in the writer's transaction). An upload holds the row until it commits; a
removal happens only for a row at count zero, before its own transaction commits. Whichever comes
second sees the other's result: the upload writes the blob again, or the removal finds it in use.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adapters.blobstore import BlobStore
from adapters.models import Blob, utcnow
from adapters.peft_format import Buffer

log = logging.getLogger(__name__)


class BlobReferences:
    def __init__(self, sessions: sessionmaker[Session], blobs: BlobStore) -> None:
        self.sessions = sessions
        self.blobs = blobs

    def hold(self, session: Session, data: Buffer, digest: str | None = None) -> str:
        """In the caller's transaction: count one more reference, and make sure the blob is stored."""
        digest = digest or hashlib.sha256(data).hexdigest()
        counted = session.execute(
            update(Blob).where(Blob.digest == digest).values(refcount=Blob.refcount + 1, updated_at=utcnow())
        )
        if not getattr(counted, "rowcount", 0):
            session.add(Blob(digest=digest, refcount=1))
            session.flush()  # a concurrent first upload of the same content: IntegrityError, the caller retries
        stored = self.blobs.put(data)
        assert stored == digest, "the blob store hashed the data differently"
        return digest

    def release(self, session: Session, digests: Iterable[str]) -> None:
        """In the caller's transaction: one reference fewer for each digest (repeats count)."""
        for digest in digests:
            session.execute(
                update(Blob).where(Blob.digest == digest).values(refcount=Blob.refcount - 1, updated_at=utcnow())
            )

    def collect(self, digests: Iterable[str]) -> None:
        """After the releasing transaction committed: remove the blobs nothing refers to any more."""
        for digest in sorted(set(digests)):
            self._remove_if_unused(digest)

    def _remove_if_unused(self, digest: str) -> bool:
        try:
            with self.sessions.begin() as session:
                removed = session.execute(delete(Blob).where(Blob.digest == digest, Blob.refcount <= 0))
                if not getattr(removed, "rowcount", 0):
                    return False
                self.blobs.delete(digest)  # under the row's lock, before the commit
        except Exception as exc:  # a busy database, a store that is down: the row stays at zero
            log.warning("blob %s: not removed now (%s); the next sweep retries", digest, exc)
            return False
        return True

    def sweep(self) -> int:
        """Remove unreferenced blobs: rows at count zero (a removal that failed) and files with no
        row at all (a process killed between writing a blob and committing its row). Returns how
        many were removed. Safe beside uploads and other sweepers, on any number of gateways."""
        with self.sessions() as session:
            counted = dict(session.execute(select(Blob.digest, Blob.refcount)).tuples().all())
        removed = sum(self._remove_if_unused(d) for d, count in counted.items() if count <= 0)
        for digest in self.blobs.digests():
            if digest not in counted:
                removed += self._remove_orphan(digest)
        return removed

    def _remove_orphan(self, digest: str) -> bool:
        """A file without a row: claim the row (an upload writing it holds the row, so this waits or
        fails), remove the file, and leave no row behind."""
        try:
            with self.sessions.begin() as session:
                claim = Blob(digest=digest, refcount=0)
                session.add(claim)
                session.flush()
                self.blobs.delete(digest)
                session.delete(claim)
        except (IntegrityError, OperationalError):
            return False  # an upload holds it: it is about to be referenced
        log.info("blob %s: removed, no adapter version referred to it", digest)
        return True
