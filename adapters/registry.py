"""Adapter registry service: versions, lookups and deletion for one tenant at a time."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adapters.blobstore import BlobStore
from adapters.models import Adapter, AdapterVersion, BaseModel
from adapters.validation import DEFAULT_MAX_DELTA, AdapterFiles, ValidatedAdapter, validate_adapter

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterNotFound(LookupError):
    pass


class InvalidAdapterName(ValueError):
    pass


_WRITE_ATTEMPTS = 8


class StorageQuotaExceeded(RuntimeError):
    """The tenant is at its limit of adapters or stored adapter bytes; the message names it."""


@dataclass(frozen=True)
class StorageQuota:
    max_adapters: int
    max_adapter_bytes: int


class NoActiveBaseModel(RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter name resolved to one immutable version, as a request will run it."""

    name: str
    version: int
    weights_sha256: str
    config_sha256: str

    @property
    def cache_key(self) -> str:
        # Content-addressed: identical uploads share one worker slot, and a new
        # version always gets a new key.
        return f"{self.weights_sha256[:32]}-{self.config_sha256[:16]}"


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidAdapterName(
            "adapter name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_reference(ref: str) -> tuple[str, int | None]:
    """`name` → latest version; `name@3` → version 3."""
    name, sep, version = ref.partition("@")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise AdapterNotFound(ref)
    return name, int(version)


class AdapterRegistry:
    def __init__(
        self, sessions: sessionmaker[Session], blobs: BlobStore, max_rank: int, max_delta: float = DEFAULT_MAX_DELTA
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.max_rank = max_rank
        self.max_delta = max_delta

    def active_base_model(self, session: Session) -> BaseModel:
        base = session.scalar(select(BaseModel).where(BaseModel.active.is_(True)))
        if base is None:
            raise NoActiveBaseModel("no base model is registered; run `loraplex models prepare`")
        return base

    def create_version(
        self, tenant_id: int, name: str, files: AdapterFiles, quota: StorageQuota | None = None
    ) -> tuple[Adapter, AdapterVersion]:
        """Validate, check the quota, store the blobs, then record a new version.

        Every refusal comes before anything is stored. Concurrent uploads to one name get
        distinct, consecutive versions: a transaction that loses the race is run again.
        """
        check_name(name)
        with self.sessions() as session:
            base = self.active_base_model(session)
            linear_modules, base_id = dict(base.linear_modules), base.id
        # Outside the session: validation takes time in proportion to the upload, and must not hold
        # one of the pool's connections meanwhile.
        checked = validate_adapter(files, linear_modules, self.max_rank, self.max_delta)
        for attempt in range(_WRITE_ATTEMPTS - 1):
            try:
                return self._record_version(tenant_id, name, files, checked, base_id, quota)
            except (IntegrityError, OperationalError):
                # Another upload to this name (or SQLite's single writer) won; read again and retry.
                time.sleep(0.05 * (attempt + 1))
        return self._record_version(tenant_id, name, files, checked, base_id, quota)

    def _record_version(
        self, tenant_id: int, name: str, files: AdapterFiles, checked: ValidatedAdapter, base_id: int,
        quota: StorageQuota | None,
    ) -> tuple[Adapter, AdapterVersion]:
        with self.sessions.begin() as session:
            adapter = session.scalar(
                select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name).with_for_update()
            )
            if quota is not None:
                _check_quota(session, tenant_id, quota, new_name=adapter is None, new_bytes=len(files.weights))
            weights_sha = self.blobs.put(files.weights)
            config_sha = self.blobs.put(checked.stored_config)  # patterns resolved: workers run no regex
            if adapter is None:
                adapter = Adapter(tenant_id=tenant_id, name=name)
                session.add(adapter)
                session.flush()
            latest = session.scalar(
                select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)
            )
            version = AdapterVersion(
                adapter_id=adapter.id,
                version=(latest or 0) + 1,
                rank=checked.rank,
                lora_alpha=checked.lora_alpha,
                target_modules=checked.target_modules,
                weights_sha256=weights_sha,
                config_sha256=config_sha,
                size_bytes=len(files.weights),
                declared_base_model=checked.declared_base_model,
                base_model_id=base_id,
            )
            session.add(version)
            session.flush()
            return adapter, version

    def list_adapters(self, tenant_id: int) -> list[Adapter]:
        with self.sessions() as session:
            visible = (Adapter.tenant_id == tenant_id) | Adapter.public.is_(True)
            adapters = session.scalars(select(Adapter).where(visible).order_by(Adapter.name)).all()
            for a in adapters:
                _ = a.versions  # load before the session closes
            return list(adapters)

    def set_public(self, tenant_id: int, name: str, public: bool) -> None:
        """Public adapters can be used (not changed) by every tenant."""
        with self.sessions.begin() as session:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
            if adapter is None:
                raise AdapterNotFound(name)
            adapter.public = public

    def get(self, tenant_id: int, name: str) -> Adapter:
        with self.sessions() as session:
            adapter = self._visible(session, tenant_id, name)
            _ = adapter.versions
            return adapter

    def resolve(self, tenant_id: int, ref: str) -> ResolvedAdapter:
        """Pin `name` or `name@N` to one immutable version, once, at admission."""
        name, number = parse_reference(ref)
        with self.sessions() as session:
            adapter = self._visible(session, tenant_id, name)
            versions = {v.version: v for v in adapter.versions}
            if not versions or (number is not None and number not in versions):
                raise AdapterNotFound(ref)
            chosen = versions[number if number is not None else max(versions)]
            return ResolvedAdapter(name, chosen.version, chosen.weights_sha256, chosen.config_sha256)

    def delete(self, tenant_id: int, name: str) -> list[ResolvedAdapter]:
        """Delete an adapter with all its versions; return them so workers can free them."""
        with self.sessions.begin() as session:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
            if adapter is None:
                raise AdapterNotFound(name)
            gone = [ResolvedAdapter(name, v.version, v.weights_sha256, v.config_sha256) for v in adapter.versions]
            session.delete(adapter)
        self._drop_unreferenced_blobs(gone)
        return gone

    def delete_version(self, tenant_id: int, name: str, number: int) -> ResolvedAdapter:
        """Delete one version; the adapter goes with its last version."""
        with self.sessions.begin() as session:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
            version = next((v for v in adapter.versions if v.version == number), None) if adapter else None
            if adapter is None or version is None:
                raise AdapterNotFound(f"{name}@{number}")
            gone = ResolvedAdapter(name, version.version, version.weights_sha256, version.config_sha256)
            if len(adapter.versions) == 1:
                session.delete(adapter)
            else:
                adapter.versions.remove(version)
        self._drop_unreferenced_blobs([gone])
        return gone

    def _drop_unreferenced_blobs(self, gone: list[ResolvedAdapter]) -> None:
        with self.sessions() as session:
            for digest in {d for g in gone for d in (g.weights_sha256, g.config_sha256)}:
                still_used = session.scalar(
                    select(func.count())
                    .select_from(AdapterVersion)
                    .where((AdapterVersion.weights_sha256 == digest) | (AdapterVersion.config_sha256 == digest))
                )
                if not still_used:
                    self.blobs.delete(digest)

    @staticmethod
    def _visible(session: Session, tenant_id: int, name: str) -> Adapter:
        # Own adapters first; another tenant's public one only when no own one has that name.
        own = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
        if own is not None:
            return own
        public = session.scalar(select(Adapter).where(Adapter.name == name, Adapter.public.is_(True)))
        if public is None:
            raise AdapterNotFound(name)
        return public


def _check_quota(session: Session, tenant_id: int, quota: StorageQuota, *, new_name: bool, new_bytes: int) -> None:
    if new_name:
        count = session.scalar(select(func.count(Adapter.id)).where(Adapter.tenant_id == tenant_id)) or 0
        if count >= quota.max_adapters:
            raise StorageQuotaExceeded(
                f"the tenant already has {count} adapters, its limit (tenant limit max_adapters); delete one first"
            )
    stored = session.scalar(
        select(func.coalesce(func.sum(AdapterVersion.size_bytes), 0))
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .where(Adapter.tenant_id == tenant_id)
    ) or 0
    if stored + new_bytes > quota.max_adapter_bytes:
        raise StorageQuotaExceeded(
            f"storing {new_bytes} more bytes would put the tenant at {stored + new_bytes} bytes of adapters, "
            f"over its limit of {quota.max_adapter_bytes} (tenant limit max_adapter_bytes); delete old versions first"
        )
