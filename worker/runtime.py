"""Assembles a worker: base model, LoRA layers, adapter cache and engine on its thread."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from adapters.blobstore import open_blob_store
from worker.adapter_cache import AdapterCache, host_buffer
from worker.config import KvCacheDtype, LoraDtype, WorkerConfig
from worker.cpu_head import install_panel_head
from worker.cpu_lora import SLOT_DTYPES, lora_delta_kernel
from worker.cpu_nf4 import MAX_TOKENS as NF4_MAX_TOKENS
from worker.cpu_nf4 import install as install_nf4
from worker.cpu_norm import install as install_norms
from worker.engine import BatchEngine, EngineLimits, kv_bytes_per_token
from worker.lora_model import install_lora_layers, slots_in_budget
from worker.lora_routing import LoraRouting
from worker.model import adaptable_linears, load_base_model, pack_output_head, resolve_device
from worker.prompts import PromptEncoder, PromptLimits
from worker.protocol import WorkerHealth

log = logging.getLogger(__name__)


@dataclass
class LoadedWorker:
    engine: BatchEngine
    adapters: AdapterCache
    prompts: PromptEncoder
    device: torch.device
    max_context: int
    quantization: str = "bnb-nf4"


def lora_slot_dtype(choice: LoraDtype, device: torch.device) -> torch.dtype:
    """The adapter slots' dtype. `auto`: bfloat16 on a GPU, and on a CPU where the native kernel is
    built: it widens bfloat16 weights exactly in registers and runs the same float32 sums, on half the
    bytes (batch 16 on a 2-core Xeon, two `make bench` runs, each dtype against its own base rows in
    one run: 16 distinct adapters 0.77-0.79x on float32 slots, 0.79-0.86x on bfloat16; one adapter
    0.83-0.90x against 0.91-0.96x). float32 on a CPU without the kernel: torch's matmuls would widen
    the slots' views every step. The price is float32 adapter files rounded to 8 bits of mantissa;
    `float32` keeps them exact. `int8` (asked for, never `auto`: it rounds each weight to one of 255
    steps of its row's largest) halves the bytes again; only the CPU kernel reads it, so a worker
    without one refuses it at start."""
    if choice == "int8":  # the kernel is what reads int8 rows with their scales; torch's paths only copy them
        if device.type != "cpu" or lora_delta_kernel() is None:
            raise ValueError("lora_dtype int8 needs a CPU worker with the native LoRA kernel "
                             f"(this one: {device.type}{'' if device.type != 'cpu' else ', no kernel built'}); "
                             "use auto, float32 or bfloat16")
        return torch.int8
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda" or (device.type == "cpu" and lora_delta_kernel() is not None):
        return torch.bfloat16
    return torch.float32


def kv_cache_dtype(choice: KvCacheDtype, compute: torch.dtype) -> torch.dtype:
    """The KV pool's dtype for a model that computes in `compute`. `auto`: `compute` itself. bfloat16
    under a float32 model (the CPU) rounds each key and value once, as it is written, and halves the
    pool's bytes: twice the positions in the same memory, half the bytes a decode step reads over a
    long row. A pool wider than the model is refused: its attention would round the keys anyway."""
    if choice == "auto":
        return compute
    dtype: torch.dtype = getattr(torch, choice)
    if dtype.itemsize > compute.itemsize:
        raise ValueError(f"kv_cache_dtype {choice} is wider than the {str(compute).removeprefix('torch.')} this "
                         "model's attention computes in: use auto")
    return dtype


def build_worker(config: WorkerConfig) -> LoadedWorker:
    """Load the base model and wire the engine (slow: call it off the event loop)."""
    torch.set_num_threads(config.torch_threads)
    device = resolve_device(config.device)
    model, tokenizer = load_base_model(config.model_path, device)
    if device.type == "cpu" and (head := install_panel_head(model)) is not None:
        log.info("output projection: %s (its float32 values, each of them)", head.form)
    elif pack_output_head(model):
        log.info("output projection packed for oneDNN")
    if device.type == "cpu" and (taken := install_nf4(model)):
        log.info("4-bit layers: %d take the native kernel (passes of up to %d tokens; larger ones its dequantization)",
                 taken, NF4_MAX_TOKENS)
    if device.type == "cpu" and (norms := install_norms(model)):
        log.info("RMS norm layers: %d take the native kernel", norms)
    slot_dtype = lora_slot_dtype(config.lora_dtype, device)
    log.info("adapter slots hold %s", str(slot_dtype).removeprefix("torch."))
    # The native kernel (CPU) takes the decode tokens' LoRA; the layers lay their B stacks out for it.
    routing = LoraRouting(kernel=lora_delta_kernel() if device.type == "cpu" and slot_dtype in SLOT_DTYPES else None)
    linears = adaptable_linears(model)
    slots = config.adapter_slots
    if config.adapter_slots_mb is not None:
        chunk = routing.kernel.chunk if routing.kernel is not None else None
        slots = slots_in_budget(linears, config.max_lora_rank, slot_dtype, config.adapter_slots_mb * 2**20, chunk)
        log.info("adapter slots: %d in %d MiB", slots, config.adapter_slots_mb)
    layers = install_lora_layers(model, linears, slots, config.max_lora_rank, routing, device, slot_dtype)
    max_context = config.max_context or int(getattr(model.config, "max_position_embeddings", 2048))
    # what attention computes in: float32 on the CPU, bfloat16 on a GPU, a GPTQ/AWQ checkpoint's own dtype
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, model.get_input_embeddings().weight.dtype)
    kv_tokens = config.kv_cache_mb * 2**20 // kv_bytes_per_token(model.config, kv_dtype)
    limits = EngineLimits(config.max_batch_size, config.max_waiting, kv_tokens, config.max_prefill_tokens,
                          config.max_prefill_tokens_idle)
    log.info("KV cache budget: %d MiB = %d token positions in %s", config.kv_cache_mb, kv_tokens,
             str(kv_dtype).removeprefix("torch."))
    adapters = AdapterCache(
        layers, open_blob_store(config.blob_url, host_buffer), slots, config.host_adapter_cache_mb * 2**20,
        config.max_lora_rank, slot_dtype, pin_host=device.type == "cuda", int8_max_error=config.lora_int8_max_error,
    )
    engine = BatchEngine(model, tokenizer, adapters, routing, limits, device, kv_dtype)
    adapters.on_loaded = engine.wake  # a finished load lets a waiting request in at once
    prompt_limits = PromptLimits(max_context, kv_tokens, limits.max_batch_size)
    prompts = PromptEncoder(tokenizer, prompt_limits, engine.output.grammars)
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    quantization = "bnb-nf4" if method in (None, "bitsandbytes") else str(getattr(method, "value", method))
    return LoadedWorker(engine, adapters, prompts, device, max_context, quantization)


class WorkerRuntime:
    """Loads the worker in the background and runs its engine thread."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.loaded: LoadedWorker | None = None
        self.error: str | None = None
        self.reloading: str | None = None  # the base model it is moving to; new requests get 503 meanwhile
        self._admitting = 0  # requests past the reloading check whose prompt the engine does not hold yet
        self._admit_lock = threading.Lock()  # the reloading check and the count, against a move starting
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        # Chat templating and tokenization: one thread of their own, never the engine's.
        self.prompt_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompts")

    def start(self) -> None:
        self._thread.start()

    def begin_admission(self) -> str | None:
        """Why a new request is refused now (a move is under way), or None: then it counts as
        admitting until `end_admission`, and a move that starts meanwhile waits for it."""
        with self._admit_lock:
            if self.reloading is not None:
                return f"the worker is moving to base model {self.reloading!r}"
            self._admitting += 1
            return None

    def end_admission(self) -> None:
        """The request's prompt is in the engine (or was refused)."""
        with self._admit_lock:
            self._admitting -= 1

    def reload(self, model_path: str, model_name: str, drain_s: float) -> bool:
        """Move onto another base model in this process (blocking: run it off the event loop).

        New requests are refused (503: the gateway sends them elsewhere) and running ones get up
        to `drain_s` to finish; what is left then fails with a 503. The old model is dropped before
        the new one loads, so the memory is never needed twice. False if a reload is already under way.
        """
        if not self._reload_lock.acquire(blocking=False):
            return False
        try:
            with self._admit_lock:
                self.reloading = model_name
            loaded = self.loaded
            deadline = time.monotonic() + drain_s
            while (loaded is not None and (self._admitting or loaded.engine.stats() != (0, 0))
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            self._stop.set()
            if loaded is not None:
                loaded.engine.wake()
            self._thread.join()
            if loaded is not None:
                loaded.engine.fail_everything(f"the worker moved to base model {model_name!r}; retry")
                loaded.adapters.shutdown()
            self.loaded, loaded = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.config = dataclasses.replace(self.config, model_path=Path(model_path), model_name=model_name)
            self.error = None
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
            self._thread.start()
            return True
        finally:
            self.reloading = None
            self._reload_lock.release()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.loaded is not None:
            self.loaded.engine.wake()
            self.loaded.adapters.shutdown()
        self.prompt_thread.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.loaded = build_worker(self.config)
        except Exception as exc:
            log.exception("worker failed to load its base model")
            self.error = f"{type(exc).__name__}: {exc}"
            return
        log.info("worker ready: %s on %s", self.config.model_name, self.loaded.device)
        self.loaded.engine.run(self._stop)

    def liveness_problem(self) -> str | None:
        """Why this worker cannot serve any more (its engine died, stalled or never loaded); None if live."""
        if self.error is not None:
            return self.error
        if self.loaded is None:
            return None  # still loading
        engine = self.loaded.engine
        if engine.death is not None or (not self._thread.is_alive() and not self._stop.is_set()):
            return f"the engine thread died: {engine.death or 'unknown cause'}"
        stalled = engine.stalled_for()
        if stalled > self.config.stall_timeout_s:
            return f"the engine has made no step for {stalled:.0f} s (stall timeout {self.config.stall_timeout_s:g} s)"
        return None

    def health(self) -> WorkerHealth:
        problem = self.liveness_problem()
        if self.reloading is not None:  # not ready from the moment it was asked to move, until the new base runs
            return WorkerHealth(ready=False, live=problem is None, model=self.config.model_name,
                                error=f"moving to base model {self.reloading!r}")
        if self.loaded is None or problem is not None:
            return WorkerHealth(ready=False, live=problem is None, model=self.config.model_name, error=problem)
        running, waiting = self.loaded.engine.stats()
        return WorkerHealth(
            ready=True,
            model=self.config.model_name,
            device=str(self.loaded.device),
            running=running,
            waiting=waiting,
            adapters_resident=self.loaded.adapters.resident(),
            max_context=self.loaded.max_context,
            memory_bytes=memory_in_use(self.loaded.device),
        )


def memory_in_use(device: torch.device) -> int:
    """Device memory allocated on CUDA; the process's resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return int(psutil.Process().memory_info().rss)
