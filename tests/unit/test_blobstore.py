"""Both blob stores: a local directory and an S3 bucket (moto's server on localhost)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters import blobstore
from adapters.blobstore import BlobCorrupt, BlobNotFound, BlobStore, LocalBlobStore, open_blob_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> BlobStore:  # type: ignore[no-untyped-def]
    if request.param == "local":
        return open_blob_store(str(tmp_path / "blobs"))
    return open_blob_store(request.getfixturevalue("s3_url").replace("/adapters?", f"/{tmp_path.name}?"))


def test_put_get_delete_round_trip(store: BlobStore) -> None:
    data = b"adapter weights " * 1000
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.put(data) == digest  # idempotent
    assert bytes(store.get(digest)) == data
    store.delete(digest)
    with pytest.raises(BlobNotFound):
        store.get(digest)
    with pytest.raises(BlobNotFound):
        store.get("not-a-digest")
    assert store.clean_temp() == 0


def test_a_blob_changed_behind_the_stores_back_is_refused(store: BlobStore) -> None:
    digest = store.put(b"the real bytes")
    if isinstance(store, LocalBlobStore):
        store.path_for(digest).write_bytes(b"tampered")
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store.key_for(digest), Body=b"tampered")  # type: ignore[attr-defined]
    with pytest.raises(BlobCorrupt):
        store.get(digest)


@pytest.mark.parametrize("flip_at", [0, 2999, 3000, 9998, None])
def test_a_blob_read_in_chunks_comes_back_whole_and_any_changed_byte_is_refused(
    tmp_path, monkeypatch, flip_at: int | None  # type: ignore[no-untyped-def]
) -> None:
    """Local reads hash each chunk while the next is read: first, middle, chunk-edge and last bytes."""
    monkeypatch.setattr(blobstore, "READ_CHUNK", 3000)  # 9,999 bytes: three whole chunks and a 999-byte tail
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(9999)
    digest = store.put(data)
    if flip_at is None:
        assert bytes(store.get(digest)) == data
        return
    tampered = bytearray(data)
    tampered[flip_at] ^= 1
    store.path_for(digest).write_bytes(tampered)
    with pytest.raises(BlobCorrupt, match="does not match"):
        store.get(digest)


def test_a_blob_cut_short_or_grown_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(blobstore, "READ_CHUNK", 3000)
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(9999)
    digest = store.put(data)
    for changed in (data[:5000], data + b"more"):
        store.path_for(digest).write_bytes(changed)
        with pytest.raises(BlobCorrupt):
            store.get(digest)


def test_concurrent_reads_of_many_chunked_blobs_each_check_their_own_digest(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every read's chunks share two hashing threads; each blob's must still be hashed in its own order."""
    monkeypatch.setattr(blobstore, "READ_CHUNK", 4096)
    store = LocalBlobStore(tmp_path / "blobs")
    blobs = [os.urandom(50_000 + i) for i in range(12)]
    digests = [store.put(b) for b in blobs]
    corrupt = bytearray(blobs[5])
    corrupt[-1] ^= 1
    store.path_for(digests[5]).write_bytes(corrupt)

    def read(i: int) -> bytes | str:
        try:
            return bytes(store.get(digests[i % 12]))
        except BlobCorrupt:
            return "corrupt"

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, range(96)))
    assert got == [("corrupt" if i % 12 == 5 else blobs[i % 12]) for i in range(96)]


def test_unknown_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="scheme"):
        open_blob_store("ftp://somewhere/blobs")


def test_temp_files_left_by_a_crash_are_removed_when_the_gateway_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    from app.main import build_app
    from app.settings import Settings
    from app.workers.pool import WorkerPool

    leftover = tmp_path / "blobs" / "tmp" / "blob-half-written"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an adapter")
    build_app(Settings(data_dir=tmp_path, admin_key=SecretStr("k" * 20)), pool=WorkerPool([]))
    assert not leftover.exists()


def test_digests_lists_every_stored_blob(store: BlobStore) -> None:
    stored = {store.put(f"blob {i}".encode()) for i in range(3)}
    assert stored <= set(store.digests())


def test_s3_temp_cleanup_leaves_other_uploads_in_a_shared_bucket_alone(s3_url: str) -> None:
    """With no prefix, the cleanup used to abort every multipart upload in the bucket."""
    import boto3

    endpoint = s3_url.split("endpoint=")[1]
    s3 = boto3.client("s3", endpoint_url=endpoint)
    theirs = s3.create_multipart_upload(Bucket="loraplex-test", Key="backups/db.tar")["UploadId"]
    ours = s3.create_multipart_upload(Bucket="loraplex-test", Key="sha256/ab/" + "ab" * 32)["UploadId"]
    store = open_blob_store(f"s3://loraplex-test?endpoint={endpoint}")
    assert store.clean_temp() == 1
    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket="loraplex-test").get("Uploads", [])}
    assert theirs in left and ours not in left
    s3.abort_multipart_upload(Bucket="loraplex-test", Key="backups/db.tar", UploadId=theirs)


def test_a_store_reads_into_the_buffers_its_owner_gives_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The worker hands its stores `host_buffer` (torch's allocator) for what adapter loads read."""
    from worker.adapter_cache import host_buffer

    sizes: list[int] = []

    def counted(size: int) -> memoryview:
        sizes.append(size)
        return host_buffer(size)

    data = os.urandom(3 * blobstore.READ_CHUNK + 5)
    for store in (LocalBlobStore(tmp_path / "a", counted), open_blob_store(str(tmp_path / "b"), counted)):
        digest = store.put(data)
        got = store.get(digest)
        assert bytes(got) == data and not got.readonly
    assert sizes == [len(data), len(data)]
    empty = LocalBlobStore(tmp_path / "c", counted)
    assert bytes(empty.get(empty.put(b""))) == b""
