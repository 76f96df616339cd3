"""Every upload in tests/fixtures/hostile (made by scripts/make_hostile_corpus.py) is refused with
its expected status and a message naming the problem, and leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES
from tests.unit.conftest import Gateway

CORPUS = FIXTURES / "hostile"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())


@pytest.mark.parametrize("case", sorted(MANIFEST))
def test_hostile_upload_is_refused_and_stores_nothing(gateway: Gateway, case: str) -> None:
    expected = MANIFEST[case]
    tenant = gateway.new_tenant("target")
    files = [("files", (name, (CORPUS / case / name.replace("/", "%2F")).read_bytes())) for name in expected["files"]]
    resp = gateway.client.post("/adapters", headers=tenant, data={"name": expected["name"]}, files=files)
    assert resp.status_code == expected["status"], resp.text
    assert expected["message"] in resp.json()["error"]["message"], resp.json()
    assert gateway.client.get("/adapters", headers=tenant).json() == []
    blob_dir = gateway.settings.blob_dir
    leftovers = [p for p in blob_dir.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # no blob, no temp file
