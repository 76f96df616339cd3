"""Bounded two-tier adapter cache: device slots in front, parsed host copies behind.

The engine thread is the only one that acquires and releases slots, at step boundaries.
Files are read and parsed on a loader thread (coalesced per adapter), so a cold adapter
never stalls the running batch.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from adapters.blobstore import LocalBlobStore
from adapters.peft_format import FormatError, lora_modules, module_scaling, parse_config, read_safetensors_header
from worker.lora import MultiLoraLinear
from worker.protocol import AdapterRef

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter's files could not be loaded into this worker."""


@dataclass(frozen=True)
class HostAdapter:
    key: str
    rank: int
    # module name -> (A [rank, in], B·scale [out, rank]), on the host in the compute dtype
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


class AdapterCache:
    def __init__(
        self,
        layers: dict[str, MultiLoraLinear],
        blobs: LocalBlobStore,
        num_slots: int,
        host_capacity: int,
        max_rank: int,
        dtype: torch.dtype,
        on_loaded: Callable[[], None] = lambda: None,
    ) -> None:
        self.layers = layers
        self.blobs = blobs
        self.num_slots = num_slots
        self.zero_slot = num_slots  # the always-empty slot of rows without an adapter
        self.host_capacity = host_capacity
        self.max_rank = max_rank
        self.dtype = dtype
        self.on_loaded = on_loaded
        self._lock = threading.Lock()
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU order
        self._pending: dict[str, Future[HostAdapter]] = {}
        self._failed: dict[str, str] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order
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
            self._failed.pop(ref.key, None)
            self._doomed.discard(ref.key)
            future = self._loader.submit(self._read, ref)
            self._pending[ref.key] = future
            future.add_done_callback(lambda f, key=ref.key: self._finish_load(key, f))

    def _finish_load(self, key: str, future: Future[HostAdapter]) -> None:
        with self._lock:
            self._pending.pop(key, None)
            exc = future.exception()
            if exc is not None:
                self._failed[key] = str(exc)
            else:
                self._host[key] = future.result()
                self._trim_host()
        self.on_loaded()

    def _read(self, ref: AdapterRef) -> HostAdapter:
        try:
            raw_weights = self.blobs.get(ref.weights_sha256)  # verified against its sha256
            config = parse_config(self.blobs.get(ref.config_sha256))
            modules = lora_modules(read_safetensors_header(raw_weights))
            tensors = load_safetensors(raw_weights)
        except (FormatError, LookupError, ValueError, OSError) as exc:
            raise AdapterLoadError(f"adapter {ref.key} could not be loaded: {exc}") from exc
        weights = {}
        for m in modules:
            if m.module not in self.layers or m.rank > self.max_rank:
                raise AdapterLoadError(f"adapter {ref.key} does not fit this worker's base model at {m.module}")
            a = tensors[m.a_key].to(self.dtype)
            b = (tensors[m.b_key].float() * module_scaling(config, m.module, m.rank)).to(self.dtype)
            weights[m.module] = (a, b)
        nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
        return HostAdapter(ref.key, max(m.rank for m in modules), weights, nbytes)

    def _trim_host(self) -> None:
        while len(self._host) > self.host_capacity:
            self._host.popitem(last=False)

    def load_error(self, key: str) -> str | None:
        with self._lock:
            return self._failed.get(key)

    # -- device slots (engine thread only) ---------------------------------------------
    def acquire(self, ref: AdapterRef) -> int | None:
        """A slot holding this adapter, pinned until release; None when not possible yet."""
        with self._lock:
            if ref.key in self._slot_of:
                self._doomed.discard(ref.key)  # uploaded again with the same content
                self._slot_of.move_to_end(ref.key)
                self._refs[ref.key] += 1
                return self._slot_of[ref.key]
            host = self._host.get(ref.key)
            if host is None:
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self._host.move_to_end(ref.key)
        for module, (a, b) in host.weights.items():
            self.layers[module].load_slot(slot, a, b)
        with self._lock:
            self._slot_of[ref.key] = slot
            self._rank_of_slot[slot] = host.rank
            self._refs[ref.key] += 1
        return slot

    def _free_slot(self) -> int | None:
        used = set(self._slot_of.values())
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        for key in list(self._slot_of):  # least recently used first
            if self._refs[key] == 0:
                return self._drop_slot(key)
        return None

    def _drop_slot(self, key: str) -> int:
        slot = self._slot_of.pop(key)
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

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

