"""Tenants and API keys. Keys are random, shown once, and stored only as sha256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adapters.finetuning import TrainingFiles
from adapters.models import Adapter, ApiKey, FineTuningEvent, FineTuningJob, Tenant, utcnow
from adapters.registry import AdapterRegistry, ResolvedAdapter, hold_tenant
from app.errors import Conflict, NotFound

KEY_PREFIX = "lpx_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so one fast hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


def load_or_create_admin_key(data_dir: Path) -> str:
    """Development mode: the admin key generated at first start, kept in the data directory."""
    path = data_dir / "admin_key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "lpx_admin_" + secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def is_admin_key(candidate: str, admin_key: str) -> bool:
    return hmac.compare_digest(candidate.encode(), admin_key.encode())


LAST_USED_RESOLUTION = timedelta(minutes=1)  # a key's last use is written at most once a minute


class TenantService:
    def __init__(self, sessions: sessionmaker[Session], registry: AdapterRegistry) -> None:
        self.sessions = sessions
        self.registry = registry

    def create(self, name: str, limits: dict[str, int | None] | None = None) -> tuple[Tenant, ApiKey, str]:
        key = new_key()
        try:
            with self.sessions.begin() as session:
                tenant = Tenant(name=name, **(limits or {}))
                session.add(tenant)
                session.flush()
                row = ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:8])
                session.add(row)
                session.flush()
        except IntegrityError as exc:
            raise Conflict(f"a tenant named {name!r} already exists") from exc
        return tenant, row, key

    def all(self) -> list[Tenant]:
        with self.sessions() as session:
            return list(session.scalars(select(Tenant).order_by(Tenant.id)))

    def get(self, tenant_id: int) -> Tenant:
        with self.sessions() as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound(f"tenant {tenant_id} not found")
            return tenant

    def set_limits(self, tenant_id: int, limits: dict[str, int | None]) -> Tenant:
        with self.sessions.begin() as session:
            tenant = self._tenant(session, tenant_id)
            for field, value in limits.items():
                setattr(tenant, field, value)
        return tenant

    def set_suspended(self, tenant_id: int, suspended: bool) -> Tenant:
        """A suspended tenant's every key is refused (403) from the next request on; nothing is deleted."""
        with self.sessions.begin() as session:
            tenant = self._tenant(session, tenant_id)
            if suspended and tenant.suspended_at is None:
                tenant.suspended_at = utcnow()
            elif not suspended:
                tenant.suspended_at = None
        return tenant

    def delete(self, tenant_id: int) -> list[ResolvedAdapter]:
        """The tenant, its keys, adapters and versions, files and fine-tuning jobs in one transaction; then
        the blobs nothing else refers to. Returns the versions that were deleted, so workers can evict them.
        A job of the tenant's that is running stops at its runner's next heartbeat and registers nothing."""
        with self.sessions.begin() as session:
            hold_tenant(session, tenant_id)  # before its rows, in the order every quota-checked write takes
            tenant = self._tenant(session, tenant_id)
            gone = self.registry.delete_tenant_adapters(session, tenant_id)
            files = TrainingFiles(self.sessions, self.registry.blob_refs).delete_tenant_files(session, tenant_id)
            jobs = select(FineTuningJob.id).where(FineTuningJob.tenant_id == tenant_id)
            session.execute(delete(FineTuningEvent).where(FineTuningEvent.job_id.in_(jobs)))
            session.execute(delete(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id))
            session.execute(delete(Adapter).where(Adapter.tenant_id == tenant_id))
            session.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant_id))
            session.delete(tenant)
        self.registry.collect_blobs(gone)
        self.registry.blob_refs.collect(files)
        return gone

    def issue_key(self, tenant_id: int) -> tuple[ApiKey, str]:
        key = new_key()
        with self.sessions.begin() as session:
            self._tenant(session, tenant_id)
            row = ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:8])
            session.add(row)
            session.flush()
        return row, key

    def keys(self, tenant_id: int) -> list[ApiKey]:
        """The tenant's keys that are not revoked (ids and prefixes; the keys themselves are not stored)."""
        with self.sessions() as session:
            self._tenant(session, tenant_id)
            return list(session.scalars(
                select(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None)).order_by(ApiKey.id)
            ))

    def revoke_key(self, key_id: int, tenant_id: int | None = None) -> None:
        """Revoke a key. With `tenant_id` (the tenant acting for itself): only one of its own keys
        (another's is not found), and never its last one, so it cannot lock itself out."""
        with self.sessions.begin() as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None or tenant_id not in (None, row.tenant_id):
                raise NotFound(f"key {key_id} not found")
            if tenant_id is not None:
                tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
                active = session.scalar(select(func.count(ApiKey.id)).where(
                    ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))) or 0
                if tenant is not None and active <= 1:
                    raise Conflict("this is the tenant's only key; issue a new one (POST /keys) before revoking it")
            row.revoked_at = utcnow()

    def authenticate(self, key: str) -> Tenant | None:
        with self.sessions() as session:
            row = session.scalar(
                select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            )
            if row is None:
                return None
            tenant = session.get(Tenant, row.tenant_id)
            now = utcnow()
            if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
                self._touch(row.id, now)
            return tenant

    def _touch(self, key_id: int, now: datetime) -> None:
        try:
            with self.sessions.begin() as session:
                session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
        except OperationalError:
            pass  # a busy database: the last use is a convenience, never a reason to fail a request

    @staticmethod
    def _tenant(session: Session, tenant_id: int) -> Tenant:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id} not found")
        return tenant
