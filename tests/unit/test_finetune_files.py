"""Fine-tuning files: every refusal of a line names the line and the problem; nothing bad is stored."""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import Gateway
from worker.training_data import MAX_LINE_BYTES, MAX_MESSAGES, TrainingDataError, parse_line, read_examples

USER = {"role": "user", "content": "Hi"}
ANSWER = {"role": "assistant", "content": "Beep."}


def line(*messages: object, **extra: object) -> bytes:
    return json.dumps({"messages": list(messages), **extra}).encode()


def jsonl(rows: int, answer: str = "Beep.") -> bytes:
    return b"".join(line({"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer})
                    + b"\n" for i in range(rows))


@pytest.mark.parametrize(("raw", "names"), [
    (b"{not json", "not valid JSON"),
    (b'{"messages": [{"role": "assistant", "content": "x", "weight": NaN}]}', "NaN is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 1e999}]}',
     "not a finite number"),
    (b"[1, 2]", "JSON object"),
    (b'{"prompt": "x", "completion": "y"}', "unknown key"),
    (line(USER, ANSWER, tools=[{"type": "function"}]), "tools are not supported"),
    (b'{"messages": []}', "non-empty list"),
    (b'{"messages": "hello"}', "non-empty list"),
    (line(*([USER, ANSWER] * (MAX_MESSAGES // 2 + 1))), f"limit of {MAX_MESSAGES}"),
    (line(USER, {"role": "tool", "content": "42"}), "tool calls are not supported"),
    (line(USER, {"role": "robot", "content": "42"}), "messages[1].role must be one of"),
    (line(USER, {"content": "42"}), "messages[1].role"),
    (line(USER, "just text"), "messages[1] must be an object"),
    (line(USER, {"role": "assistant", "content": 42}), "messages[1].content must be a string"),
    (line(USER, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
     "text-only"),
    (line(USER, {"role": "assistant", "content": "   "}), "assistant message with no content"),
    (line(USER, {"role": "assistant", "content": "x", "tool_calls": []}), "tool calls are not supported"),
    (line(USER, {"role": "assistant", "content": "x", "weight": 2}), "weight must be 0 or 1"),
    (line({"role": "user", "content": "x", "weight": 1}, ANSWER), "only on assistant messages"),
    (line(USER, {"role": "assistant", "content": "x", "weight": 0}), "no assistant message to learn from"),
    (line(USER, USER), "no assistant message to learn from"),
    (line(ANSWER, USER, ANSWER), "starts with an assistant message"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "y"}]}',
     "lone surrogate"),
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b"\xff\xfe{}", "not valid JSON"),
    (line(USER, {"role": "assistant", "content": "x" * MAX_LINE_BYTES}), f"{MAX_LINE_BYTES}-byte limit"),
])
def test_every_bad_line_is_refused_by_name(raw: bytes, names: str) -> None:
    with pytest.raises(TrainingDataError) as refused:
        list(read_examples([line(USER, ANSWER), b"", raw], max_examples=10))
    assert str(refused.value).startswith("line 3"), refused.value
    assert names in str(refused.value)


def test_good_lines_become_turns() -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}
    turns = parse_line(line({"role": "developer", "content": "Be brief."}, parts, ANSWER,
                            {"role": "user", "content": "Again", "name": "bob"},
                            {"role": "assistant", "content": "Boop.", "weight": 0}), 1)
    assert [(t.role, t.content, t.weight) for t in turns] == [
        ("system", "Be brief.", 1), ("user", "Hello", 1), ("assistant", "Beep.", 1), ("user", "Again", 1),
        ("assistant", "Boop.", 0)]


def test_a_byte_order_mark_and_windows_line_ends_are_read() -> None:
    data = b"\xef\xbb\xbf" + jsonl(3).replace(b"\n", b"\r\n")
    assert len(list(read_examples(data.split(b"\n"), max_examples=10))) == 3


def test_a_file_over_its_example_limit_names_the_line_and_the_setting() -> None:
    with pytest.raises(TrainingDataError, match="line 4: over the limit of 3 examples per file"):
        list(read_examples(jsonl(5).splitlines(), max_examples=3))


FILES = "/v1/files"


def upload(gateway: Gateway, tenant: dict[str, str], data: bytes, purpose: str = "fine-tune"):  # type: ignore[no-untyped-def]
    return gateway.client.post(FILES, headers=tenant, files={"file": ("train.jsonl", data)},
                               data={"purpose": purpose})


def stored_blobs(gateway: Gateway) -> set[str]:
    return set(gateway.client.app.state.services.registry.blobs.digests())  # type: ignore[attr-defined]


def test_upload_list_show_content_and_delete(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    data = jsonl(12)
    created = upload(gateway, tenant, data)
    assert created.status_code == 200, created.text
    file = created.json()
    assert (file["object"], file["bytes"], file["examples"], file["purpose"], file["status"]) == (
        "file", len(data), 12, "fine-tune", "processed")
    assert file["id"].startswith("file-")
    listed = gateway.client.get(FILES, headers=tenant).json()
    assert [f["id"] for f in listed["data"]] == [file["id"]] and listed["object"] == "list"
    assert gateway.client.get(f"{FILES}/{file['id']}", headers=tenant).json() == file
    assert gateway.client.get(f"{FILES}/{file['id']}/content", headers=tenant).content == data
    blobs_before = stored_blobs(gateway)
    deleted = gateway.client.delete(f"{FILES}/{file['id']}", headers=tenant)
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert gateway.client.get(f"{FILES}/{file['id']}", headers=tenant).status_code == 404
    assert stored_blobs(gateway) == blobs_before - {__import__("hashlib").sha256(data).hexdigest()}


def test_another_tenants_file_is_not_found(gateway: Gateway) -> None:
    owner, other = gateway.new_tenant("owner"), gateway.new_tenant("other")
    file_id = upload(gateway, owner, jsonl(12)).json()["id"]
    for method, path in (("GET", f"{FILES}/{file_id}"), ("GET", f"{FILES}/{file_id}/content"),
                         ("DELETE", f"{FILES}/{file_id}")):
        resp = gateway.client.request(method, path, headers=other)
        assert resp.status_code == 404, (path, resp.text)
    assert gateway.client.get(FILES, headers=other).json()["data"] == []
    assert gateway.client.get(f"{FILES}/{file_id}", headers=owner).status_code == 200


@pytest.mark.parametrize(("data", "purpose", "status", "names"), [
    (jsonl(3) + b'{"messages": [{"role": "user"}]}\n', "fine-tune", 400, "line 4: messages[0].content"),
    (b"", "fine-tune", 400, "empty"),
    (b"\n\n  \n", "fine-tune", 400, "no examples"),
    (jsonl(12), "assistants", 400, "purpose must be 'fine-tune'"),
    (jsonl(12), "batch", 400, "purpose"),
])
def test_a_bad_file_is_refused_and_nothing_is_stored(gateway: Gateway, data: bytes, purpose: str, status: int,
                                                     names: str) -> None:
    tenant = gateway.new_tenant("acme")
    before = stored_blobs(gateway)
    resp = upload(gateway, tenant, data, purpose)
    assert resp.status_code == status, resp.text
    assert names in resp.json()["error"]["message"]
    assert gateway.client.get(FILES, headers=tenant).json()["data"] == []
    assert stored_blobs(gateway) == before


def test_a_file_over_the_size_limit_is_refused_naming_it(gateway: Gateway) -> None:
    gateway.settings.max_training_file_bytes = 10_000
    resp = upload(gateway, gateway.new_tenant("acme"), jsonl(400))
    assert resp.status_code == 413
    assert "max_training_file_bytes" in resp.json()["error"]["message"]


def test_the_tenants_file_limits_are_429s_that_name_them(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.settings.tenant_max_files = 1
    assert upload(gateway, tenant, jsonl(12)).status_code == 200
    refused = upload(gateway, tenant, jsonl(13))
    assert refused.status_code == 429 and "tenant_max_files" in refused.json()["error"]["message"]
    gateway.settings.tenant_max_files, gateway.settings.tenant_max_file_bytes = 10, len(jsonl(12)) + 10
    refused = upload(gateway, tenant, jsonl(13))
    assert refused.status_code == 429 and "tenant_max_file_bytes" in refused.json()["error"]["message"]
    assert len(gateway.client.get(FILES, headers=tenant).json()["data"]) == 1


def test_files_need_a_tenant_key(gateway: Gateway) -> None:
    assert gateway.client.get(FILES).status_code == 401
    assert upload(gateway, gateway.admin(), jsonl(12)).status_code == 403
