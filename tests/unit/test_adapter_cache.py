"""The adapter cache's bookkeeping, without a model (torch only)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch

from adapters.blobstore import LocalBlobStore
from worker.adapter_cache import AdapterCache
from worker.protocol import AdapterRef

REF = AdapterRef(key="k", weights_sha256="0" * 64, config_sha256="1" * 64)


def test_a_load_that_finishes_at_once_does_not_deadlock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = threading.Event()
    cache = AdapterCache({}, LocalBlobStore(tmp_path), num_slots=2, host_capacity_bytes=2**20, max_rank=8,
                         dtype=torch.float32, on_loaded=loaded.set)

    def submit_done(fn, ref):  # type: ignore[no-untyped-def]
        future: Future[object] = Future()
        try:
            future.set_result(fn(ref))
        except Exception as exc:
            future.set_exception(exc)
        return future

    cache._loader.submit = submit_done  # type: ignore[method-assign]
    worker = threading.Thread(target=cache.prefetch, args=(REF,), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "prefetch deadlocked on an already finished load"
    assert loaded.is_set()
    assert "could not be loaded" in str(cache.load_error("k"))  # the blobs do not exist
    cache.shutdown()


def test_an_evicted_adapter_leaves_after_its_last_user_even_if_acquired_after_the_evict(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from torch import nn

    from tests.factory import adapter_files
    from worker.lora import MultiLoraLinear
    from worker.lora_routing import LoraRouting
    from worker.protocol import AdapterRef

    layer = MultiLoraLinear(nn.Linear(16, 16), 16, 16, 2, 8, LoraRouting(), torch.device("cpu"), torch.float32)
    blobs = LocalBlobStore(tmp_path)
    config, weights = adapter_files({"model.layers.0.self_attn.q_proj": [16, 16]})
    ref = AdapterRef(key="doomed", weights_sha256=blobs.put(weights), config_sha256=blobs.put(config))
    loaded = threading.Event()
    cache = AdapterCache({"model.layers.0.self_attn.q_proj": layer}, blobs, num_slots=2, host_capacity_bytes=2**20,
                         max_rank=8, dtype=torch.float32, on_loaded=loaded.set)
    cache.prefetch(ref)
    assert loaded.wait(10)
    assert cache.acquire(ref) is not None  # a running request
    cache.evict(ref.key)  # the adapter is deleted upstream
    assert cache.acquire(ref) is not None  # a request admitted just before the delete arrives late
    cache.release(ref.key)
    cache.collect()
    assert cache.resident() == ["doomed"]  # still in use by one request
    cache.release(ref.key)
    cache.collect()
    assert cache.resident() == []  # gone with its last user
    cache.shutdown()


def test_the_host_tier_is_bounded_by_bytes_not_by_count(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Adapters differ in size by a thousand times: a count bound lets a few big ones take gigabytes."""
    from torch import nn

    from tests.factory import adapter_files
    from worker.lora import MultiLoraLinear
    from worker.lora_routing import LoraRouting
    from worker.protocol import AdapterRef

    layer = MultiLoraLinear(nn.Linear(256, 256), 256, 256, 2, 8, LoraRouting(), torch.device("cpu"), torch.float32)
    blobs = LocalBlobStore(tmp_path)
    refs = []
    for seed in range(3):
        config, weights = adapter_files({"model.layers.0.self_attn.q_proj": [256, 256]}, rank=8, seed=seed)
        refs.append(AdapterRef(key=f"a{seed}", weights_sha256=blobs.put(weights), config_sha256=blobs.put(config)))
    size = len(weights)
    loaded = threading.Semaphore(0)
    cache = AdapterCache({"model.layers.0.self_attn.q_proj": layer}, blobs, num_slots=2,
                         host_capacity_bytes=int(2.5 * size), max_rank=8,
                         dtype=torch.float32, on_loaded=loaded.release)
    for ref in refs:
        cache.prefetch(ref)
        assert loaded.acquire(timeout=10)
        assert cache.load_error(ref.key) is None
    count, held = cache.tier_stats()["host"]
    assert count == 2 and held <= 2.5 * size  # the oldest went
    cache.shutdown()


def _one_adapter_cache(tmp_path, device: torch.device, pin_host: bool):  # type: ignore[no-untyped-def]
    from torch import nn

    from tests.factory import adapter_files
    from worker.lora import MultiLoraLinear
    from worker.lora_routing import LoraRouting

    name = "model.layers.0.self_attn.q_proj"
    layer = MultiLoraLinear(nn.Linear(16, 16).to(device), 16, 16, 2, 8, LoraRouting(), device, torch.float32)
    blobs = LocalBlobStore(tmp_path)
    config, weights = adapter_files({name: [16, 16]}, rank=4, seed=1)
    ref = AdapterRef(key="a", weights_sha256=blobs.put(weights), config_sha256=blobs.put(config))
    loaded = threading.Semaphore(0)
    cache = AdapterCache({name: layer}, blobs, num_slots=2, host_capacity_bytes=2**20, max_rank=8,
                         dtype=torch.float32, on_loaded=loaded.release, pin_host=pin_host)
    cache.prefetch(ref)
    assert loaded.acquire(timeout=10) and cache.load_error(ref.key) is None
    return cache, layer, ref


def test_without_pinned_memory_the_host_tier_falls_back_to_pageable_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A CPU-only torch has no pinned allocator: asking for one must not fail the adapter's load."""
    pinned, layer, ref = _one_adapter_cache(tmp_path / "p", torch.device("cpu"), pin_host=not torch.cuda.is_available())
    plain, plain_layer, _ = _one_adapter_cache(tmp_path / "q", torch.device("cpu"), pin_host=False)
    slot, plain_slot = pinned.acquire(ref), plain.acquire(ref)
    assert slot is not None and plain_slot is not None
    assert torch.equal(layer.lora_a[slot], plain_layer.lora_a[plain_slot])
    assert torch.equal(layer.lora_b[slot], plain_layer.lora_b[plain_slot])
    pinned.shutdown()
    plain.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_host_tier_is_pinned_and_fills_a_slot_like_pageable_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cuda = torch.device("cuda")
    pinned, layer, ref = _one_adapter_cache(tmp_path / "p", cuda, pin_host=True)
    plain, plain_layer, _ = _one_adapter_cache(tmp_path / "q", cuda, pin_host=False)
    host = pinned._host[ref.key].weights
    assert all(a.is_pinned() and b.is_pinned() for a, b, _ in host.values())
    slot, plain_slot = pinned.acquire(ref), plain.acquire(ref)
    assert slot is not None and plain_slot is not None
    torch.cuda.synchronize()
    assert torch.equal(layer.lora_a[slot], plain_layer.lora_a[plain_slot])
    assert torch.equal(layer.lora_b[slot], plain_layer.lora_b[plain_slot])
    pinned.shutdown()
    plain.shutdown()


@pytest.mark.parametrize("where", ["weights", "header"])
def test_a_blob_changed_on_disk_is_refused_by_its_digest_not_served(tmp_path, where: str) -> None:  # type: ignore[no-untyped-def]
    """The digest is checked beside the parse, not before it: a blob altered after upload (a bad disk,
    someone with access to the volume) must still never reach the host tier, and the error says why."""
    from torch import nn

    from tests.factory import adapter_files
    from worker.lora import MultiLoraLinear
    from worker.lora_routing import LoraRouting

    name = "model.layers.0.self_attn.q_proj"
    layer = MultiLoraLinear(nn.Linear(16, 16), 16, 16, 2, 8, LoraRouting(), torch.device("cpu"), torch.float32)
    blobs = LocalBlobStore(tmp_path)
    config, weights = adapter_files({name: [16, 16]})
    ref = AdapterRef(key="altered", weights_sha256=blobs.put(weights), config_sha256=blobs.put(config))
    path = blobs.path_for(ref.weights_sha256)
    altered = bytearray(path.read_bytes())
    altered[-1 if where == "weights" else 10] ^= 0xFF  # one weight byte, or a byte inside the JSON header
    path.write_bytes(bytes(altered))
    loaded = threading.Event()
    cache = AdapterCache({name: layer}, blobs, num_slots=2, host_capacity_bytes=2**20, max_rank=8,
                         dtype=torch.float32, on_loaded=loaded.set)
    cache.prefetch(ref)
    assert loaded.wait(10)
    error = cache.load_error("altered")
    assert error is not None and "does not match its digest" in str(error)
    assert cache.tier_stats()["host"] == (0, 0)
    with pytest.raises(Exception, match="does not match its digest"):
        cache.acquire(ref)
    assert cache.resident() == []
    cache.shutdown()


def test_int8_slots_refuse_an_adapter_whose_weights_their_rounding_would_wipe_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On int8 slots (LORA_DTYPE=int8) an adapter whose weights would lose more than `int8_max_error` to
    the rounding (here: in each row one weight ~250x the rest, which all round to zero) is refused with a
    422 that names the layer, the loss and the limit; its slot is emptied, its next request fails at once,
    and an ordinary adapter beside it is served. A higher limit lets the same adapter in."""
    import numpy as np
    from safetensors.numpy import save
    from torch import nn

    from tests.factory import adapter_files
    from worker.adapter_cache import AdapterLoadError
    from worker.cpu_lora import INT8, lora_delta_kernel
    from worker.lora import MultiLoraLinear
    from worker.lora_routing import LoraRouting

    kernel = lora_delta_kernel()
    if kernel is None:
        pytest.skip("int8 slots need the native kernel (no C compiler here)")
    name, width = "model.layers.0.self_attn.q_proj", 256
    prefix = f"base_model.model.{name}"
    config, ordinary = adapter_files({name: [width, width]}, rank=4, seed=2)
    spiky_a = np.full((4, width), 0.0036, dtype=np.float32)  # 0.46 of a step (1.0 / 127): rounds to zero
    spiky_a[:, 0] = 1.0
    spiky = save({f"{prefix}.lora_A.weight": spiky_a,
                  f"{prefix}.lora_B.weight": np.random.default_rng(3).standard_normal((width, 4)).astype(np.float32)})
    blobs = LocalBlobStore(tmp_path)

    def cache_with(limit: float) -> tuple[AdapterCache, dict[str, AdapterRef]]:
        layer = MultiLoraLinear(nn.Linear(width, width), width, width, 2, 8, LoraRouting(kernel=kernel),
                                torch.device("cpu"), INT8)
        refs = {key: AdapterRef(key=key, weights_sha256=blobs.put(weights), config_sha256=blobs.put(config))
                for key, weights in (("ordinary", ordinary), ("spiky", spiky))}
        loaded = threading.Semaphore(0)
        cache = AdapterCache({name: layer}, blobs, num_slots=2, host_capacity_bytes=2**22, max_rank=8, dtype=INT8,
                             on_loaded=loaded.release, int8_max_error=limit)
        for ref in refs.values():
            cache.prefetch(ref)
            assert loaded.acquire(timeout=10) and cache.load_error(ref.key) is None  # the files themselves are fine
        return cache, refs

    from worker import metrics

    def fills(up_to: float | None = None) -> float:  # int8 fills so far, those that lost at most `up_to`
        samples = metrics.INT8_ROUNDING.collect()[0].samples
        if up_to is None:
            return next(s.value for s in samples if s.name.endswith("_count"))
        return next(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == str(up_to))

    spiky_before, low_before = fills() - fills(0.05), fills(0.01)
    cache, refs = cache_with(0.02)
    with pytest.raises(AdapterLoadError) as refused:
        cache.acquire(refs["spiky"])
    assert refused.value.status == 422
    message = str(refused.value)
    assert "spiky" in message and name in message and "LORA_INT8_MAX_ERROR" in message and "(2.00%)" in message
    lost = float(message.split("would lose ")[1].split("%")[0])
    assert 5 < lost < 7, message  # 255 weights of 0.0036 against one of 1.0: sqrt(255 * 0.0036^2) = 5.7%
    assert cache.resident() == []  # the slot it took is empty again
    with pytest.raises(AdapterLoadError, match="LORA_INT8_MAX_ERROR"):  # remembered: no second fill
        cache.acquire(refs["spiky"])
    slot = cache.acquire(refs["ordinary"])
    assert slot is not None and cache.layers[name].rounding[slot] < 0.01
    assert fills() - fills(0.05) == spiky_before + 1  # the refused fill, on the operators' histogram
    assert fills(0.01) == low_before + 1  # the ordinary one
    cache.shutdown()

    lenient, refs = cache_with(0.1)
    assert lenient.acquire(refs["spiky"]) is not None
    lenient.shutdown()
