"""Blob store on an S3-compatible bucket (AWS S3, MinIO, Ceph, moto), for machines that share no disk."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.exceptions import ClientError

from adapters.blobstore import BlobNotFound, BufferFactory, blob_buffer, check_digest, verify_blob
from adapters.peft_format import Buffer


class S3BlobStore:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, client: Any = None, buffer: BufferFactory | None = None) -> None:
        self.bucket = bucket
        self._buffer = buffer or blob_buffer
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._s3 = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def key_for(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.prefix}sha256/{digest[:2]}/{digest}"

    def put(self, data: Buffer) -> str:
        """Store bytes; return their sha256. Idempotent; one PUT, so never a half object."""
        digest = hashlib.sha256(data).hexdigest()
        key = self.key_for(digest)
        if not self._exists(key):
            checksum = hashlib.md5(data, usedforsecurity=False).digest()
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=bytes(data),
                                ContentMD5=base64.b64encode(checksum).decode())  # the server checks it arrived whole
        return digest

    def get(self, digest: str) -> memoryview:
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=self.key_for(digest))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise BlobNotFound(digest) from exc
            raise
        verify_blob(body, digest)
        data = self._buffer(len(body))
        data[:] = body
        return data

    def delete(self, digest: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self.key_for(digest))

    def digests(self) -> Iterator[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/")
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if len(name) == 64:
                    yield name

    def clean_temp(self) -> int:
        """Abort multipart uploads to loraplex's own keys a crash left behind (PUTs leave nothing);
        return how many. Only under `<prefix>sha256/`: the bucket may hold anyone else's uploads."""
        own = f"{self.prefix}sha256/"
        uploads = self._s3.list_multipart_uploads(Bucket=self.bucket, Prefix=own).get("Uploads", [])
        for upload in uploads:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return len(uploads)

    def _exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True
