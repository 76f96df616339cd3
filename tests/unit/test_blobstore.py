"""Both blob stores: a local directory and an S3 bucket (moto's server on localhost)."""

from __future__ import annotations

import hashlib

import pytest

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
