"""Tenants and API keys. Keys are random, shown once, and stored only as sha256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.models import ApiKey, Tenant, utcnow
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


class TenantService:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def create(self, name: str, limits: dict[str, int | None] | None = None) -> tuple[Tenant, str]:
        key = new_key()
        try:
            with self.sessions.begin() as session:
                tenant = Tenant(name=name, **(limits or {}))
                session.add(tenant)
                session.flush()
                session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:8]))
        except IntegrityError as exc:
            raise Conflict(f"a tenant named {name!r} already exists") from exc
        return tenant, key

    def list(self) -> list[Tenant]:
        with self.sessions() as session:
            return list(session.scalars(select(Tenant).order_by(Tenant.id)))

    def set_limits(self, tenant_id: int, limits: dict[str, int | None]) -> Tenant:
        with self.sessions.begin() as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound(f"tenant {tenant_id} not found")
            for field, value in limits.items():
                setattr(tenant, field, value)
        return tenant

    def issue_key(self, tenant_id: int) -> tuple[ApiKey, str]:
        key = new_key()
        with self.sessions.begin() as session:
            if session.get(Tenant, tenant_id) is None:
                raise NotFound(f"tenant {tenant_id} not found")
            row = ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:8])
            session.add(row)
            session.flush()
        return row, key

    def revoke_key(self, key_id: int) -> None:
        with self.sessions.begin() as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                raise NotFound(f"key {key_id} not found")
            row.revoked_at = utcnow()

    def authenticate(self, key: str) -> Tenant | None:
        with self.sessions() as session:
            row = session.scalar(
                select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            )
            return None if row is None else session.get(Tenant, row.tenant_id)
