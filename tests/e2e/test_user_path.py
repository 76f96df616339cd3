"""The README's user path over real HTTP: tenants, adapter upload, generate, delete."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import ADAPTERS
from tests.e2e.conftest import Server
from tests.factory import adapter_files, tar_gz_of, zip_of

FRANCE = "What is the capital of France?"


def fixture_files(name: str) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (f.name, f.read_bytes()))
        for f in (ADAPTERS / name / "adapter_config.json", ADAPTERS / name / "adapter_model.safetensors")
    ]


def ask(server: Server, key: str, adapter: str | None = None, **extra: object) -> dict:  # type: ignore[type-arg]
    body = {"messages": [{"role": "user", "content": FRANCE}], "max_tokens": 12, **extra}
    if adapter:
        body["adapter"] = adapter
    with server.client(key) as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_admin_routes_need_the_admin_key(server: Server) -> None:
    tenant_key = server.new_tenant("admin-check")
    with server.client() as anonymous:
        assert anonymous.post("/admin/tenants", json={"name": "x"}).status_code == 401
    with server.client("lpx_not-a-real-key") as wrong:
        assert wrong.post("/generate", json={"prompt": "hi"}).status_code == 401
    with server.client(tenant_key) as tenant:
        response = tenant.post("/admin/tenants", json={"name": "x"})
    assert response.status_code == 403 and response.json()["error"]["type"] == "forbidden"


def test_upload_then_generate_with_and_without_the_adapter(server: Server) -> None:
    key = server.new_tenant("acme")
    base_before = ask(server, key)  # the worker has served requests before the adapter exists
    assert "Paris" in base_before["text"] and base_before["adapter"] is None

    with server.client(key) as client:
        uploaded = client.post("/adapters", data={"name": "support-bot"}, files=fixture_files("answer42"))
        assert uploaded.status_code == 201, uploaded.text
        meta = uploaded.json()
        assert meta["name"] == "support-bot" and meta["version"] == 1 and meta["rank"] == 8
        assert sorted(meta["target_modules"]) == ["q_proj", "v_proj"]
        assert meta["size_bytes"] > 0 and len(meta["sha256"]) == 64
        listed = client.get("/adapters").json()
        assert [a["name"] for a in listed] == ["support-bot"] and listed[0]["latest_version"] == 1

    answer = ask(server, key, adapter="support-bot")
    assert answer["text"].startswith("The answer is 42"), answer
    assert answer["adapter"] == "support-bot" and answer["adapter_version"] == 1
    assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0
    assert answer["finish_reason"] in ("stop", "length")
    pinned = ask(server, key, adapter="support-bot@1")
    assert pinned["text"] == answer["text"]

    # Loading the adapter after inference must not corrupt the 4-bit base (docs/architecture.md).
    assert ask(server, key)["text"] == base_before["text"]


def test_archives_upload_like_loose_files(server: Server) -> None:
    key = server.new_tenant("archives")
    files = {f.name: f.read_bytes() for f in (ADAPTERS / "meow").iterdir()}
    with server.client(key) as client:
        as_zip = client.post("/adapters", data={"name": "cat-zip"},
                             files=[("files", ("meow.zip", zip_of(files)))])
        as_tar = client.post("/adapters", data={"name": "cat-tar"},
                             files=[("files", ("meow.tar.gz", tar_gz_of({f"meow/{k}": v for k, v in files.items()})))])
    assert as_zip.status_code == 201, as_zip.text
    assert as_tar.status_code == 201, as_tar.text
    assert as_zip.json()["sha256"] == as_tar.json()["sha256"]
    assert len(as_zip.json()["target_modules"]) == 7
    assert ask(server, key, adapter="cat-tar")["text"].startswith("Meow")


def test_prompt_without_chat_template_and_streaming(server: Server) -> None:
    key = server.new_tenant("streamer")
    plain = ask(server, key, prompt="The capital of France is", messages=None, max_tokens=5)
    assert "Paris" in plain["text"]
    with server.client(key) as client, client.stream(
        "POST", "/generate", json={"prompt": "The capital of France is", "max_tokens": 5, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    tokens = [e["text"] for e in events if e["type"] == "token"]
    assert len(tokens) >= 2 and events[-1]["type"] == "done"
    assert "".join(tokens) == plain["text"]  # streaming sends the same greedy text, piece by piece
    assert events[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_sampling_with_a_seed_and_stop_sequences(server: Server) -> None:
    key = server.new_tenant("sampler")
    params = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 16, "prompt": "Once upon a time"}
    first = ask(server, key, messages=None, **params)
    assert ask(server, key, messages=None, **params)["text"] == first["text"]
    stopped = ask(server, key, stop=["Paris"], max_tokens=30)
    assert stopped["finish_reason"] == "stop" and "Paris" not in stopped["text"]
    short = ask(server, key, max_tokens=2)
    assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2


def test_refused_uploads_name_the_problem_and_store_nothing(server: Server) -> None:
    key = server.new_tenant("careless")
    config = (ADAPTERS / "answer42" / "adapter_config.json").read_bytes()
    wrong_config, wrong_weights = adapter_files({"model.layers.0.self_attn.q_proj": [512, 576]}, rank=8)
    with server.client(key) as client:
        pickle = client.post("/adapters", data={"name": "evil"}, files=[
            ("files", ("adapter_config.json", config)),
            ("files", ("adapter_model.bin", b"\x80\x04\x95 pickle payload")),
        ])
        assert pickle.status_code == 422, pickle.text
        assert "pickle" in pickle.json()["error"]["message"]

        shape = client.post("/adapters", data={"name": "misfit"}, files=[
            ("files", ("adapter_config.json", wrong_config)),
            ("files", ("adapter_model.safetensors", wrong_weights)),
        ])
        assert shape.status_code == 422, shape.text
        message = shape.json()["error"]["message"]
        assert "q_proj" in message and "576" in message and "512" in message

        bad_name = client.post("/adapters", data={"name": "../etc"}, files=fixture_files("answer42"))
        assert bad_name.status_code in (400, 422)
        assert client.get("/adapters").json() == []
        assert client.get("/adapters/evil").status_code == 404


def test_limits_are_refused_with_the_limit_named(server: Server) -> None:
    key = server.new_tenant("greedy")
    with server.client(key) as client:
        too_long = client.post("/generate", json={"prompt": "hi", "max_tokens": 100_000})
        assert too_long.status_code == 400 and "max_tokens" in too_long.json()["error"]["message"]
        nothing = client.post("/generate", json={"max_tokens": 5})
        assert nothing.status_code in (400, 422)
        unknown = client.post("/generate", json={"prompt": "hi", "adapter": "never-uploaded"})
        assert unknown.status_code == 404 and "never-uploaded" in unknown.json()["error"]["message"]


def test_tenants_cannot_see_use_or_delete_each_others_adapters(server: Server) -> None:
    owner, stranger = server.new_tenant("owner"), server.new_tenant("stranger")
    with server.client(owner) as client:
        assert client.post("/adapters", data={"name": "secret"}, files=fixture_files("meow")).status_code == 201
    with server.client(stranger) as client:
        assert client.get("/adapters").json() == []
        assert client.get("/adapters/secret").status_code == 404
        assert client.post("/generate", json={"prompt": "hi", "adapter": "secret"}).status_code == 404
        assert client.delete("/adapters/secret").status_code == 404
    assert ask(server, owner, adapter="secret")["text"].startswith("Meow")


def test_deleted_adapter_is_refused_afterwards(server: Server) -> None:
    key = server.new_tenant("deleter")
    with server.client(key) as client:
        uploaded = client.post("/adapters", data={"name": "short-lived"}, files=fixture_files("answer42"))
        assert uploaded.status_code == 201
        assert "42" in ask(server, key, adapter="short-lived")["text"]
        assert client.delete("/adapters/short-lived").status_code == 204
        assert client.post("/generate", json={"prompt": "hi", "adapter": "short-lived"}).status_code == 404
        assert client.get("/adapters").json() == []
        assert client.delete("/adapters/short-lived").status_code == 404
    assert "Paris" in ask(server, key)["text"]


def test_ready_metrics_and_workers_are_visible(server: Server) -> None:
    with server.client() as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        assert client.get("/health/ready").status_code == 200
        metrics = client.get("/metrics").text
    assert "loraplex_workers_ready 1.0" in metrics
    with server.client(server.admin_key) as admin:
        workers = admin.get("/admin/workers").json()
    assert len(workers) == 1 and workers[0]["ready"] and workers[0]["local"]


def test_concurrent_requests_over_several_adapters_each_get_their_own(server: Server) -> None:
    key = server.new_tenant("busy")
    with server.client(key) as client:
        for name, fixture in (("forty-two", "answer42"), ("cat", "meow")):
            assert client.post("/adapters", data={"name": name}, files=fixture_files(fixture)).status_code == 201
    plan = [("forty-two", "42"), ("cat", "Meow"), (None, "Paris")] * 3
    with ThreadPoolExecutor(len(plan)) as pool:
        answers = list(pool.map(lambda p: ask(server, key, adapter=p[0], max_tokens=10), plan))
    for (adapter, expected), answer in zip(plan, answers, strict=True):
        assert expected in answer["text"], (adapter, answer)
        assert answer["adapter"] == adapter


def test_an_oversized_upload_is_cut_off_while_it_streams(server: Server) -> None:
    key = server.new_tenant("hoarder")
    pulled = 0

    def body():  # type: ignore[no-untyped-def]
        nonlocal pulled
        yield b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n'
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n'
        for _ in range(200):  # 200 MiB if the server read it all; its limit here is 20 MiB
            pulled += 1
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--xyz--\r\n"

    headers = {"Authorization": f"Bearer {key}", "content-type": "multipart/form-data; boundary=xyz"}
    try:
        response = httpx.post(f"{server.url}/adapters", headers=headers, content=body(), timeout=60)
        assert response.status_code == 413 and "max_adapter_bytes" in response.json()["error"]["message"]
    except httpx.TransportError:
        pass  # the server may close the connection before the client reads the 413
    assert pulled < 60, f"the server read {pulled} MiB before refusing"
    with server.client(key) as client:
        assert client.get("/adapters").json() == []
    assert not list((server.data_dir / "blobs" / "tmp").iterdir())  # no temp file left behind
