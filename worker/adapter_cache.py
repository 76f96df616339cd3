"""Bounded two-tier adapter cache: device slots in front, parsed host copies behind.

The engine thread is the only one that acquires and releases slots, at step boundaries.
Files are read and parsed on a loader thread (coalesced per adapter), so a cold adapter
never stalls the running batch.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from adapters.blobstore import BlobStore
from adapters.peft_format import (
    FormatError,
    TensorInfo,
    lora_modules,
    module_scaling,
    parse_config,
    read_safetensors_header,
)
from worker import metrics
from worker.cpu_lora import INT8
from worker.lora import MultiLoraLinear
from worker.protocol import AdapterRef

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter's files could not be loaded into this worker (status 422: its content is at fault)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HostAdapter:
    key: str
    rank: int
    # module name -> (A [rank, in], B [out, rank], scale), as stored: views over the file's bytes
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    nbytes: int


class AdapterCache:
    def __init__(
        self,
        layers: dict[str, MultiLoraLinear],
        blobs: BlobStore,
        num_slots: int,
        host_capacity_bytes: int,
        max_rank: int,
        dtype: torch.dtype,
        on_loaded: Callable[[], None] = lambda: None,
        pin_host: bool = False,
        int8_max_error: float = math.inf,
    ) -> None:
        self.layers = layers
        # On CUDA the host tier lives in pinned (page-locked) memory, so filling a slot queues its
        # copies without a host synchronization per layer (`load_slot` copies non-blocking).
        self.pin_host = pin_host
        self.blobs = blobs
        self.num_slots = num_slots
        self.zero_slot = num_slots  # the always-empty slot of rows without an adapter
        self.host_capacity_bytes = host_capacity_bytes
        self.max_rank = max_rank
        self.dtype = dtype
        # int8 slots: the most an adapter's weights may lose to their rounding (`cpu_lora.rounding_error`;
        # WorkerConfig.lora_int8_max_error), no limit unless given
        self.int8_max_error = int8_max_error
        self.on_loaded = on_loaded
        self._lock = threading.Lock()
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU order
        self._pending: dict[str, Future[HostAdapter]] = {}
        self._failed: dict[str, AdapterLoadError] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order
        self._slot_bytes: dict[str, int] = {}
        self._rank_of_slot: dict[int, int] = {}
        self._refs: Counter[str] = Counter()
        self._doomed: set[str] = set()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    # -- host tier -------------------------------------------------------------------
    def prefetch(self, ref: AdapterRef) -> None:
        """Start reading the adapter's files unless it is resident or already loading."""
        with self._lock:
            if ref.key in self._host or ref.key in self._slot_of or ref.key in self._pending:
                return
            if ref.key in self._failed and self._failed[ref.key].status == 422:
                return  # its content is at fault: loading it again cannot help
            self._failed.pop(ref.key, None)
            self._doomed.discard(ref.key)
            future = self._loader.submit(self._read, ref)
            self._pending[ref.key] = future
            metrics.ADAPTER_LOOKUPS.labels("miss").inc()
        # Outside the lock: a future that is already done runs the callback right here, and
        # the callback takes the lock (holding it here deadlocked the engine thread).
        future.add_done_callback(functools.partial(self._finish_load, ref.key))

    def _finish_load(self, key: str, future: Future[HostAdapter]) -> None:
        with self._lock:
            self._pending.pop(key, None)
            exc = future.exception()
            metrics.ADAPTER_LOADS.labels("failed" if exc is not None else "ok").inc()
            if exc is not None:
                self._failed[key] = exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(str(exc))
            else:
                self._host[key] = future.result()
                self._trim_host()
        self.on_loaded()

    def _read(self, ref: AdapterRef) -> HostAdapter:
        with metrics.ADAPTER_LOAD_TIME.time():
            return self._read_untimed(ref)

    def _read_untimed(self, ref: AdapterRef) -> HostAdapter:
        try:
            # Checked against its sha256 as it is read (the store hashes each chunk while it reads
            # the next), so nothing here ever parses bytes that are not the blob's.
            raw_weights = self.blobs.get(ref.weights_sha256)
            if self.pin_host:
                raw_weights = _pinned_copy(raw_weights)
            config = parse_config(self.blobs.get(ref.config_sha256))
            header = read_safetensors_header(raw_weights)
            modules = lora_modules(header)
            tensors = {key: _view(raw_weights, info) for key, info in header.items()}
        except FormatError as exc:
            raise AdapterLoadError(f"adapter {ref.key} could not be loaded: {exc}", status=422) from exc
        except (LookupError, ValueError, OSError) as exc:
            raise AdapterLoadError(f"adapter {ref.key} could not be loaded: {exc}") from exc
        # No arithmetic here: a torch op on this thread would start a second OpenMP team that
        # slowed the engine thread by ~35% on 2 cores. Conversion and scaling happen in `acquire`.
        weights = {}
        for m in modules:
            if m.module not in self.layers or m.rank > self.max_rank:
                raise AdapterLoadError(f"adapter {ref.key} does not fit this worker's base model at {m.module}",
                                       status=422)
            weights[m.module] = (tensors[m.a_key], tensors[m.b_key], module_scaling(config, m.module, m.rank))
        nbytes = len(raw_weights)
        return HostAdapter(ref.key, max(m.rank for m in modules), weights, nbytes)

    def _trim_host(self) -> None:
        # By bytes, not count: adapters differ in size by a thousand times. The newest stays even
        # when it alone is over the budget, or it could never reach a slot.
        while len(self._host) > 1 and sum(h.nbytes for h in self._host.values()) > self.host_capacity_bytes:
            self._host.popitem(last=False)
            metrics.ADAPTER_EVICTIONS.labels("host", "capacity").inc()

    def load_error(self, key: str) -> AdapterLoadError | None:
        with self._lock:
            return self._failed.get(key)

    # -- device slots (engine thread only) ---------------------------------------------
    def pin(self, key: str) -> None:
        """One more pin on a slot already acquired (another choice of the same request)."""
        with self._lock:
            self._refs[key] += 1

    def acquire(self, ref: AdapterRef) -> int | None:
        """A slot holding this adapter, pinned until release; None when not possible yet.

        Raises AdapterLoadError when the adapter failed to load or cannot be served.
        """
        with self._lock:
            if ref.key in self._failed:
                raise self._failed[ref.key]
            if ref.key in self._slot_of:
                # An evicted (deleted) adapter still serves requests admitted before the delete;
                # it stays doomed and leaves when the last of them releases it.
                self._slot_of.move_to_end(ref.key)
                self._refs[ref.key] += 1
                metrics.ADAPTER_LOOKUPS.labels("hit").inc()
                return self._slot_of[ref.key]
            host = self._host.get(ref.key)
            if host is None:
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self._host.move_to_end(ref.key)
        try:
            with metrics.SLOT_FILL_TIME.time():
                sums = torch.stack([self.layers[m].load_slot(slot, a, b, scale)
                                    for m, (a, b, scale) in host.weights.items()])
                finite = bool(sums.isfinite().all()) or all(self.layers[m].slot_is_finite(slot) for m in host.weights)
        except (RuntimeError, ValueError) as exc:
            finite, problem = False, f"its weights could not be copied into a slot: {exc}"
        else:
            problem = f"its scaled weights are not finite in {str(self.dtype).removeprefix('torch.')}"
        if finite and self.dtype == INT8:
            lost, module = max((self.layers[m].rounding[slot], m) for m in host.weights)
            metrics.INT8_ROUNDING.observe(lost)
            if lost > self.int8_max_error:
                finite, problem = False, (
                    f"int8 slots would lose {lost:.2%} of the weights of {module} to rounding (root mean square, "
                    f"relative), more than LORA_INT8_MAX_ERROR allows ({self.int8_max_error:.2%}): a few weights "
                    "far above the rest of their row; a worker with LORA_DTYPE bfloat16 or float32 serves it")
        if not finite:
            self._refuse(ref.key, slot, f"adapter {ref.key} cannot be served: {problem}")
        with self._lock:
            self._slot_of[ref.key] = slot
            self._slot_bytes[ref.key] = host.nbytes
            self._rank_of_slot[slot] = host.rank
            self._refs[ref.key] += 1
        metrics.ADAPTER_LOOKUPS.labels("host_hit").inc()
        return slot

    def _refuse(self, key: str, slot: int, message: str) -> None:
        """Empty the slot, remember why this adapter failed (its next requests fail at once), raise."""
        for layer in self.layers.values():
            layer.clear_slot(slot)
        error = AdapterLoadError(message, status=422)
        with self._lock:
            self._host.pop(key, None)
            self._failed[key] = error
        metrics.ADAPTER_LOADS.labels("failed").inc()
        raise error

    def _free_slot(self) -> int | None:
        used = set(self._slot_of.values())
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        for key in list(self._slot_of):  # least recently used first
            if self._refs[key] == 0:
                metrics.ADAPTER_EVICTIONS.labels("device", "capacity").inc()
                return self._drop_slot(key)
        return None

    def _drop_slot(self, key: str) -> int:
        slot = self._slot_of.pop(key)
        self._slot_bytes.pop(key, None)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._rank_of_slot.pop(slot, None)
        return slot

    def release(self, key: str) -> None:
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] <= 0:
                del self._refs[key]
                if key in self._doomed:
                    self._doomed.discard(key)
                    self._drop_slot(key)
                    metrics.ADAPTER_EVICTIONS.labels("device", "deleted").inc()

    def rank_of(self, slot: int) -> int:
        return self._rank_of_slot.get(slot, 0)

    def evict(self, key: str) -> None:
        """Forget an adapter (deleted upstream); its slot goes once no row uses it.

        Any thread may call this; the slot itself is freed by the engine thread in
        `collect`, at a step boundary, never under a running forward pass.
        """
        with self._lock:
            self._host.pop(key, None)
            if key in self._slot_of:
                self._doomed.add(key)

    def collect(self) -> None:
        """Free the slots of evicted adapters that no running row uses (engine thread)."""
        with self._lock:
            for key in [k for k in self._doomed if self._refs[k] <= 0]:
                self._doomed.discard(key)
                if key in self._slot_of:
                    self._drop_slot(key)
                    metrics.ADAPTER_EVICTIONS.labels("device", "deleted").inc()

    def tier_stats(self) -> dict[str, tuple[int, int]]:
        """tier -> (adapters, bytes of their weights) for the device slots and the host tier."""
        with self._lock:
            return {"device": (len(self._slot_of), sum(self._slot_bytes.values())),
                    "host": (len(self._host), sum(h.nbytes for h in self._host.values()))}

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


def host_buffer(size: int) -> memoryview:
    """Writable memory for an adapter file's bytes as the host tier reads them (the worker's blob
    stores' `buffer`), not zeroed: every byte is read into before anyone sees it.

    torch's allocator, not numpy's (`adapters.blobstore.blob_buffer`): numpy asks for transparent
    huge pages for an array this large, and where the host's memory is fragmented the kernel
    compacts it to find them, on the loader thread; torch's takes plain pages, often ones the
    engine's freed temporaries leave. The bench's cold loads of 19 MB adapters, a worker process a
    try on a 2-core AMD host, store -> host: 30.6-49.2 ms in four tries with numpy's, 23.3-34.1 ms in
    three with this (an anonymous mmap, always new pages: 25-63 ms in five). An allocation, no
    arithmetic: no OpenMP team starts on the loader thread.
    """
    return torch.empty(size, dtype=torch.uint8).numpy().data


def _pinned_copy(raw: memoryview) -> Any:
    """The file's bytes in page-locked memory (a byte copy, no torch arithmetic on this thread)."""
    try:
        pinned = torch.empty(len(raw), dtype=torch.uint8, pin_memory=True)
    except RuntimeError:  # no pinned memory to be had: pageable copies are slower, not wrong
        log.warning("pinned host memory unavailable; adapter copies to the device stay synchronous")
        return raw
    view = pinned.numpy()
    view[:] = memoryview(raw).cast("B")
    return view.data  # a writable buffer over the pinned bytes, for torch.frombuffer


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _view(raw: Any, info: TensorInfo) -> torch.Tensor:
    """A tensor over the file's bytes, no copy (safetensors is little-endian, like every host we run on)."""
    dtype = _TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise FormatError(f"tensor dtype {info.dtype} is not a float type")
    count = (info.end - info.start) // dtype.itemsize
    return torch.frombuffer(raw, dtype=dtype, count=count, offset=info.start).view(info.shape)
