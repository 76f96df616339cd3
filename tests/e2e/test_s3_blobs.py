"""Stores shared by many machines: metadata in PostgreSQL, adapters in an S3 bucket. The worker
fetches adapters from the bucket, never from the gateway's disk."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import fresh_postgres_database
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_user_path import fixture_files


@pytest.fixture(scope="module")
def s3_server(prepared_model, tmp_path_factory, s3_url) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    data_dir = tmp_path_factory.mktemp("s3-serve")
    with fresh_postgres_database() as database_url, running_server(
        prepared_model.path.parent, data_dir, blob_url=s3_url, database_url=database_url
    ) as server:
        yield server


def test_adapters_stored_in_s3_and_postgres_are_served(s3_server: Server) -> None:
    key = s3_server.new_tenant("cloudy")
    with s3_server.client(key) as client:
        assert client.post("/adapters", data={"name": "forty-two"}, files=fixture_files("answer42")).status_code == 201
        answer = client.post("/generate", json={"messages": [{"role": "user", "content": "Name a color."}],
                                                "adapter": "forty-two", "max_tokens": 10})
    assert answer.status_code == 200 and answer.json()["text"].startswith("The answer is 42")
    local = s3_server.data_dir / "blobs"
    assert not local.exists() or not [p for p in local.rglob("*") if p.is_file()]  # nothing on the gateway's disk
    assert not (s3_server.data_dir / "loraplex.db").exists()  # and no SQLite file: the metadata is in PostgreSQL
