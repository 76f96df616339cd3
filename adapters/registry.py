"""Adapter registry service: versions, lookups and deletion for one tenant at a time."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adapters.bases import BaseCheckpoints
from adapters.blobrefs import BlobReferences
from adapters.blobstore import BlobStore
from adapters.models import Adapter, AdapterVersion, Tenant
from adapters.validation import DEFAULT_MAX_DELTA, AdapterFiles, ValidatedAdapter, validate_adapter

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# What fine-tuning names its results, OpenAI's shape: ft:<base>:<suffix, may be empty>:<job id>. Uploads
# cannot take such a name (':' is not in NAME_PATTERN), so it always means a fine-tuned adapter.
FINE_TUNED_PATTERN = re.compile(r"^ft:[A-Za-z0-9._-]{1,48}:[A-Za-z0-9._-]{0,40}:[a-z0-9]{1,24}$")


class AdapterNotFound(LookupError):
    pass


class AdapterVersionDeleted(AdapterNotFound):
    """The reference names a version (or an adapter) that existed and was deleted."""


class InvalidAdapterName(ValueError):
    pass


_WRITE_ATTEMPTS = 8


class StorageQuotaExceeded(RuntimeError):
    """The tenant is at its limit of adapters or stored adapter bytes; the message names it."""


@dataclass(frozen=True)
class StorageQuota:
    max_adapters: int
    max_adapter_bytes: int


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


def check_name(name: str, fine_tuned: bool = False) -> str:
    if fine_tuned:
        if not FINE_TUNED_PATTERN.match(name):
            raise InvalidAdapterName(f"{name!r} is not a fine-tuned model's name (ft:<base>:<suffix>:<id>)")
        return name
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


@dataclass(frozen=True)
class AdapterView:
    """An adapter as one tenant sees it: all versions of its own, the shared versions of another's."""

    name: str
    owner_id: int
    versions: list[AdapterVersion]
    last_version: int  # the highest number ever given out, deleted or not

    @property
    def public(self) -> bool:
        return any(v.public for v in self.versions)


class AdapterRegistry:
    def __init__(
        self, sessions: sessionmaker[Session], blobs: BlobStore, max_rank: int, max_delta: float = DEFAULT_MAX_DELTA,
        bases: BaseCheckpoints | None = None,
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.bases = bases or BaseCheckpoints(sessions)
        self.max_rank = max_rank
        self.max_delta = max_delta
        self.blob_refs = BlobReferences(sessions, blobs)

    def create_version(
        self, tenant_id: int, name: str, files: AdapterFiles, quota: StorageQuota | None = None,
        fine_tuned: bool = False,
    ) -> tuple[Adapter, AdapterVersion]:
        """Validate, check the quota, store the blobs, then record a new version.

        Every refusal comes before anything is stored. Concurrent uploads to one name get
        distinct, consecutive versions: a transaction that loses the race is run again.
        """
        check_name(name, fine_tuned)
        base = self.bases.active()
        linear_modules, base_id = base.linear_modules, base.id
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
            if quota is not None:
                hold_tenant(session, tenant_id)
            adapter = session.scalar(
                select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name).with_for_update()
            )
            if quota is not None:
                new_name = adapter is None or not adapter.versions
                check_quota(session, tenant_id, quota, new_name=new_name, new_bytes=files.weights_size)
            if adapter is None:
                adapter = Adapter(tenant_id=tenant_id, name=name, last_version=0)
                session.add(adapter)
                session.flush()
            # Never max(existing) + 1: a deleted number stays used. Incremented in SQL, not from the row read
            # above: on SQLite that read is not in the transaction (pysqlite begins one at the first write),
            # so two uploads could both read 5, and once the first's version 6 was deleted the second wrote
            # another version 6 with other weights.
            number = session.execute(
                update(Adapter).where(Adapter.id == adapter.id).values(last_version=Adapter.last_version + 1)
                .returning(Adapter.last_version).execution_options(synchronize_session=False)
            ).scalar_one()
            session.refresh(adapter)
            version = AdapterVersion(
                adapter_id=adapter.id,
                version=number,
                rank=checked.rank,
                lora_alpha=checked.lora_alpha,
                target_modules=checked.target_modules,
                # The blobs are written under their reference rows' locks, inside this transaction.
                weights_sha256=self.blob_refs.hold(session, files.weights, files.weights_sha256),
                config_sha256=self.blob_refs.hold(session, checked.stored_config),  # patterns resolved
                size_bytes=files.weights_size,
                declared_base_model=checked.declared_base_model,
                base_model_id=base_id,
            )
            session.add(version)
            session.flush()
            return adapter, version

    def list_adapters(self, tenant_id: int) -> list[AdapterView]:
        """The tenant's adapters and others' shared ones, each with the versions it may use."""
        with self.sessions() as session:
            shared_ids = select(AdapterVersion.adapter_id).where(AdapterVersion.public.is_(True))
            visible = (Adapter.tenant_id == tenant_id) | Adapter.id.in_(shared_ids)
            adapters = session.scalars(select(Adapter).where(visible).order_by(Adapter.name, Adapter.id)).all()
            views = [_view(a, tenant_id) for a in adapters]
            return [v for v in views if v.versions]

    def set_public(self, tenant_id: int, name: str, public: bool, version: int | None = None) -> list[int]:
        """Share (or stop sharing) one version with every tenant; `None` means the latest when
        sharing, every version when unsharing. Returns the versions now shared.

        Sharing is per version: a version uploaded later stays private until it is shared too,
        so an owner can never swap the weights under the tenants who use the shared one.
        """
        with self.sessions.begin() as session:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
            if adapter is None or not adapter.versions:
                raise AdapterNotFound(name)
            if version is None:
                chosen = [adapter.versions[-1]] if public else adapter.versions
            else:
                chosen = [v for v in adapter.versions if v.version == version]
                if not chosen:
                    raise AdapterNotFound(f"{name}@{version}")
            for v in chosen:
                v.public = public
            return [v.version for v in adapter.versions if v.public]

    def get(self, tenant_id: int, name: str) -> AdapterView:
        with self.sessions() as session:
            return self._visible(session, tenant_id, name)

    def resolve(self, tenant_id: int, ref: str) -> ResolvedAdapter:
        """Pin `name` or `name@N` to one immutable version, once, at admission."""
        name, number = parse_reference(ref)
        with self.sessions() as session:
            view = self._visible(session, tenant_id, name)
            versions = {v.version: v for v in view.versions}
            if number is not None and number not in versions:
                if view.owner_id == tenant_id and number <= view.last_version:
                    raise AdapterVersionDeleted(ref)
                raise AdapterNotFound(ref)
            chosen = versions[number if number is not None else max(versions)]
            return ResolvedAdapter(name, chosen.version, chosen.weights_sha256, chosen.config_sha256)

    def delete(self, tenant_id: int, name: str) -> list[ResolvedAdapter]:
        """Delete every version of an adapter; return them so workers can free them.

        The adapter's row stays as a tombstone that keeps its version numbers used.
        """
        with self.sessions.begin() as session:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
            if adapter is None or not adapter.versions:
                raise AdapterNotFound(name)
            gone = self._remove_versions(session, adapter, list(adapter.versions))
        self.collect_blobs(gone)
        return gone

    def delete_version(self, tenant_id: int, name: str, number: int) -> ResolvedAdapter:
        with self.sessions.begin() as session:
            adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
            version = next((v for v in adapter.versions if v.version == number), None) if adapter else None
            if adapter is None or version is None:
                raise AdapterNotFound(f"{name}@{number}")
            gone = self._remove_versions(session, adapter, [version])
        self.collect_blobs(gone)
        return gone[0]

    def collect_blobs(self, gone: list[ResolvedAdapter]) -> None:
        """After the transaction that deleted `gone` committed: remove the blobs nothing refers to now."""
        self.blob_refs.collect(_digests(gone))

    def delete_tenant_adapters(self, session: Session, tenant_id: int) -> list[ResolvedAdapter]:
        """Within the caller's transaction (deleting the tenant): release every version's blobs;
        `collect_blobs` after the commit removes the unshared ones."""
        gone: list[ResolvedAdapter] = []
        for adapter in session.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id)).all():
            gone += self._remove_versions(session, adapter, list(adapter.versions))
        return gone

    def _remove_versions(
        self, session: Session, adapter: Adapter, versions: list[AdapterVersion]
    ) -> list[ResolvedAdapter]:
        gone = [ResolvedAdapter(adapter.name, v.version, v.weights_sha256, v.config_sha256) for v in versions]
        for v in versions:
            adapter.versions.remove(v)
        session.flush()
        self.blob_refs.release(session, _digests(gone))
        return gone

    @staticmethod
    def _visible(session: Session, tenant_id: int, name: str) -> AdapterView:
        # Own adapters first; another tenant's shared versions only when no own one has that name.
        own = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))
        if own is not None and own.versions:
            return _view(own, tenant_id)
        shared = session.scalar(
            select(Adapter)
            .where(Adapter.name == name, Adapter.tenant_id != tenant_id,
                   Adapter.id.in_(select(AdapterVersion.adapter_id).where(AdapterVersion.public.is_(True))))
            .order_by(Adapter.id)
            .limit(1)
        )
        if shared is not None:
            return _view(shared, tenant_id)
        if own is not None:
            raise AdapterVersionDeleted(name)  # every version deleted: the name is known, its weights gone
        raise AdapterNotFound(name)


def _digests(gone: list[ResolvedAdapter]) -> list[str]:
    return [d for g in gone for d in (g.weights_sha256, g.config_sha256)]


def _view(adapter: Adapter, tenant_id: int) -> AdapterView:
    mine = adapter.tenant_id == tenant_id
    versions = [v for v in adapter.versions if mine or v.public]
    return AdapterView(adapter.name, adapter.tenant_id, versions, adapter.last_version)


def hold_tenant(session: Session, tenant_id: int) -> None:
    """Make this transaction the tenant's only writer until it ends, so a limit it checks by counting stays
    true until its own row is in: a row lock on PostgreSQL, the database's write lock on SQLite (whose reads
    before the first write are not in the transaction at all). Take it first: tenant, then its rows."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id))


def check_quota(session: Session, tenant_id: int, quota: StorageQuota, *, new_name: bool, new_bytes: int) -> None:
    """Refuse what would put the tenant over its adapter limits; call it after `hold_tenant`."""
    if new_name:
        count = session.scalar(
            select(func.count(func.distinct(AdapterVersion.adapter_id)))
            .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
            .where(Adapter.tenant_id == tenant_id)
        ) or 0
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
