"""Registry bookkeeping: versions, resolution, deletion and blob lifetime."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.blobstore import LocalBlobStore
from adapters.db import make_engine, make_sessionmaker
from adapters.models import BaseCheckpoint, Tenant
from adapters.registry import AdapterNotFound, AdapterRegistry, InvalidAdapterName
from adapters.validation import AdapterFiles, InvalidAdapter
from tests.factory import TINY_BASE, adapter_files


@pytest.fixture
def registry(tmp_path, database_url) -> Iterator[AdapterRegistry]:  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        session.add_all([Tenant(name="a"), Tenant(name="b")])
        session.add(BaseCheckpoint(name="tiny", path="/x", quantization="none", linear_modules=TINY_BASE,
                              max_context=512, active=True))
    yield AdapterRegistry(sessions, LocalBlobStore(tmp_path / "blobs"), max_rank=8)
    engine.dispose()


def files(seed: int = 0) -> AdapterFiles:
    config, weights = adapter_files(TINY_BASE, seed=seed)
    return AdapterFiles(config=config, weights=weights)


def test_uploads_to_one_name_get_consecutive_versions_and_name_means_latest(registry: AdapterRegistry) -> None:
    _, v1 = registry.create_version(1, "support", files(seed=1))
    _, v2 = registry.create_version(1, "support", files(seed=2))
    assert (v1.version, v2.version) == (1, 2)
    assert registry.resolve(1, "support").version == 2
    assert registry.resolve(1, "support@1").weights_sha256 == v1.weights_sha256
    with pytest.raises(AdapterNotFound):
        registry.resolve(1, "support@3")


def test_other_tenants_adapters_are_invisible(registry: AdapterRegistry) -> None:
    registry.create_version(1, "secret", files())
    with pytest.raises(AdapterNotFound):
        registry.resolve(2, "secret")
    with pytest.raises(AdapterNotFound):
        registry.delete(2, "secret")
    assert [a.name for a in registry.list_adapters(2)] == []
    assert registry.resolve(1, "secret").version == 1


def test_refused_upload_stores_nothing(registry: AdapterRegistry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config, weights = adapter_files(TINY_BASE, rank=16)  # over max_rank
    with pytest.raises(InvalidAdapter):
        registry.create_version(1, "big", AdapterFiles(config, weights))
    assert registry.list_adapters(1) == []
    assert not list((tmp_path / "blobs").rglob("sha256/*/*"))


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "x" * 65, "bad\nname", ".hidden"])
def test_bad_names_are_refused(registry: AdapterRegistry, name: str) -> None:
    with pytest.raises(InvalidAdapterName):
        registry.create_version(1, name, files())


def test_delete_removes_versions_and_unshared_blobs(registry: AdapterRegistry) -> None:
    _, mine = registry.create_version(1, "mine", files(seed=1))
    _, shared_a = registry.create_version(1, "shared", files(seed=2))
    registry.create_version(2, "shared-copy", files(seed=2))  # identical content, other tenant
    gone = registry.delete(1, "mine")
    assert [g.version for g in gone] == [1]
    with pytest.raises(LookupError):
        registry.blobs.get(mine.weights_sha256)
    registry.delete(1, "shared")
    assert registry.blobs.get(shared_a.weights_sha256)  # still used by tenant 2
    with pytest.raises(AdapterNotFound):
        registry.resolve(1, "shared")


def test_a_database_from_an_older_version_gets_the_new_nullable_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    from adapters.db import make_engine

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the tenants table as the first release created it
        conn.execute("CREATE TABLE tenants (id INTEGER PRIMARY KEY, name VARCHAR(128) UNIQUE, created_at DATETIME)")
        conn.execute("INSERT INTO tenants (name, created_at) VALUES ('old', '2026-01-01 00:00:00')")
    engine = make_engine(f"sqlite:///{path}")
    from sqlalchemy.orm import Session

    from adapters.models import Tenant

    with Session(engine) as session:
        tenant = session.get(Tenant, 1)
        assert tenant is not None and tenant.name == "old" and tenant.tokens_per_minute is None


def test_concurrent_uploads_to_one_name_get_distinct_consecutive_versions(registry: AdapterRegistry) -> None:
    from concurrent.futures import ThreadPoolExecutor

    uploads = [files(seed=i) for i in range(8)]  # validated up front so the writes really overlap
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda f: registry.create_version(1, "busy", f)[1].version, uploads))
    assert sorted(versions) == list(range(1, 9))
    assert len(registry.list_adapters(1)) == 1


def test_one_version_can_be_deleted_and_the_last_takes_the_adapter_with_it(registry: AdapterRegistry) -> None:
    _, v1 = registry.create_version(1, "support", files(seed=1))
    registry.create_version(1, "support", files(seed=2))
    gone = registry.delete_version(1, "support", 2)
    assert gone.version == 2
    assert registry.resolve(1, "support").version == 1  # the name now means the remaining one
    with pytest.raises(AdapterNotFound):
        registry.delete_version(1, "support", 2)
    registry.delete_version(1, "support", 1)
    assert registry.list_adapters(1) == []
    with pytest.raises(LookupError):
        registry.blobs.get(v1.weights_sha256)  # no version refers to it any more


def test_migrations_build_exactly_the_models_schema(database_url) -> None:  # type: ignore[no-untyped-def]
    """A model change without its Alembic revision fails here, on SQLite and on PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from adapters.db import make_engine
    from adapters.models import Base

    engine = make_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []
    make_engine(database_url).dispose()  # a second start finds nothing to do


def _stored(registry: AdapterRegistry) -> set[str]:
    return set(registry.blobs.digests())


def test_a_delete_racing_an_upload_of_identical_content_never_loses_the_new_versions_blob(
    registry: AdapterRegistry,
) -> None:
    """Blobs are shared by content across tenants: tenant 1 deletes while tenant 2 uploads the same
    bytes. Whatever the interleaving, every version that exists afterwards has its blobs."""
    import threading

    same = files(seed=7)
    for round_ in range(12):
        registry.create_version(1, "original", same)
        start = threading.Barrier(2)

        def delete(start: threading.Barrier = start) -> None:
            start.wait()
            registry.delete(1, "original")

        def upload(start: threading.Barrier = start, name: str = f"copy{round_}") -> None:
            start.wait()
            registry.create_version(2, name, same)

        threads = [threading.Thread(target=delete), threading.Thread(target=upload)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        resolved = registry.resolve(2, f"copy{round_}")
        assert {resolved.weights_sha256, resolved.config_sha256} <= _stored(registry), f"round {round_}"
        registry.blobs.get(resolved.weights_sha256)  # readable, and matches its digest


def test_the_sweep_removes_orphaned_blobs_and_keeps_referenced_ones(registry: AdapterRegistry) -> None:
    _, kept = registry.create_version(1, "kept", files(seed=1))
    orphan = registry.blobs.put(b"written, then the process died before its row committed")
    assert registry.blob_refs.sweep() == 1
    assert _stored(registry) == {kept.weights_sha256, kept.config_sha256}
    assert registry.blob_refs.sweep() == 0
    assert orphan not in _stored(registry)


def test_a_gateway_killed_between_writing_a_blob_and_committing_leaves_an_orphan_the_sweep_removes(
    registry: AdapterRegistry, database_url: str, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    """A real process, killed (os._exit, no cleanup) right after the blob is written."""
    import subprocess
    import sys

    script = f"""
import os
from adapters.blobstore import LocalBlobStore
from adapters.blobrefs import BlobReferences
from adapters.db import make_engine, make_sessionmaker
from adapters.registry import AdapterRegistry
from adapters.validation import AdapterFiles
from tests.factory import TINY_BASE, adapter_files

hold = BlobReferences.hold
def hold_then_die(self, session, data, digest=None):
    done = hold(self, session, data, digest)
    os._exit(9)  # the blob is on disk; its row is not committed
BlobReferences.hold = hold_then_die
blobs = LocalBlobStore({str(tmp_path / 'blobs')!r})
registry = AdapterRegistry(make_sessionmaker(make_engine({database_url!r})), blobs, 8)
config, weights = adapter_files(TINY_BASE, seed=3)
registry.create_version(1, "doomed", AdapterFiles(config, weights))
"""
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    assert len(_stored(registry)) == 1  # the orphan
    with pytest.raises(AdapterNotFound):
        registry.resolve(1, "doomed")
    assert registry.blob_refs.sweep() == 1
    assert _stored(registry) == set()


def test_uploads_racing_deletes_never_give_one_number_to_two_sets_of_weights(registry: AdapterRegistry) -> None:
    """Every number handed out is handed out once; every surviving version keeps its own weights."""
    from concurrent.futures import ThreadPoolExecutor

    uploads = [files(seed=i) for i in range(10)]
    given: dict[int, str] = {}

    def upload(f: AdapterFiles) -> None:
        version = registry.create_version(1, "churn", f)[1]
        assert given.setdefault(version.version, version.weights_sha256) == version.weights_sha256
        registry.delete_version(1, "churn", version.version) if version.version % 3 == 0 else None

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, uploads))
    assert sorted(given) == list(range(1, 11))
    for number, sha in given.items():
        if number % 3:
            assert registry.resolve(1, f"churn@{number}").weights_sha256 == sha
        else:
            with pytest.raises(AdapterNotFound, match=f"churn@{number}"):
                registry.resolve(1, f"churn@{number}")
    registry.delete(1, "churn")
    assert registry.create_version(1, "churn", files(seed=99))[1].version == 11
