"""The worker's one configuration object: validated once, passed to the worker process whole.

The gateway builds it from its settings and hands it to a local worker as JSON
(`loraplex worker --config-json ...`); a remote worker is started with one flag per field
(`loraplex worker --model-path ... --max-batch-size 32`), generated from the fields below.
Defaults live here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

# Older flag spellings still accepted on the command line.
_FLAG_ALIASES = {"torch_threads": ["--threads"], "stall_timeout_s": ["--stall-timeout"]}
_HELP = {
    "blob_url": "adapter blob store: a directory, file://, or s3://bucket/prefix?endpoint=...",
    "max_waiting": "requests queued before the worker answers 503",
    "kv_cache_mb": "memory for the KV pool all running rows share (allocated at start)",
    "max_prefill_tokens": "prompt tokens prefilled per step while rows decode: lower keeps running streams "
                          "smoother, higher gives long prompts their first token sooner",
    "max_prefill_tokens_idle": "prompt tokens prefilled per step while no row decodes",
    "adapter_slots_mb": "device memory for adapter slots; as many slots as fit (overrides --adapter-slots)",
    "stall_timeout_s": "seconds without an engine step before health reports the worker not live",
    "lora_dtype": "adapter slots' dtype: auto (bfloat16 on a GPU and where the CPU kernel is built, else float32), "
                  "float32, bfloat16, or int8 (CPU with the native kernel: a quarter of float32's bytes, lossy)",
    "kv_cache_dtype": "KV cache dtype: auto (the model's: float32 on a CPU, bfloat16 on a GPU) or bfloat16 "
                      "(on a CPU: twice the positions in kv_cache_mb, half the bytes a long row's step reads)",
    "lora_int8_max_error": "int8 slots: refuse an adapter whose weights would lose more than this fraction "
                           "to rounding (relative root mean square of its worst layer)",
}
LoraDtype = Literal["auto", "float32", "bfloat16", "int8"]
LORA_DTYPES: tuple[LoraDtype, ...] = get_args(LoraDtype)
KvCacheDtype = Literal["auto", "float32", "bfloat16"]
KV_CACHE_DTYPES: tuple[KvCacheDtype, ...] = get_args(KvCacheDtype)


@dataclass(frozen=True)
class WorkerConfig:
    model_path: Path
    model_name: str
    blob_url: str  # a directory, file://, or s3://bucket/prefix?endpoint=... (see adapters.blobstore)
    host: str = "127.0.0.1"
    port: int = 8100
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 1  # one thread per worker was 10x faster than torch's default under load on 2 cores
    max_batch_size: int = 16
    max_waiting: int = 256
    adapter_slots: int = 8  # device-resident adapters usable in one batch
    # Device memory for the adapter slots: when set, as many slots as fit it (each holds max_lora_rank
    # on every adapted layer), instead of adapter_slots. Sized explicitly, like the KV pool.
    adapter_slots_mb: int | None = None
    host_adapter_cache_mb: int = 2048  # parsed adapters kept in host memory behind the slots, by size
    max_lora_rank: int = 32
    # Adapter weights in the slots. bfloat16 halves their memory and what a step reads (on the CPU, a
    # batch of 16 rows on 16 adapters: 312 -> 156 MB a step on the embedded model), at the price of
    # rounding float32 adapter files to 8 bits of mantissa; arithmetic stays float32 on the CPU.
    # auto: bfloat16 on a GPU and on a CPU where the native kernel is built, float32 on torch's CPU
    # matmuls, which would widen bfloat16 slots every step (`worker.runtime.lora_slot_dtype`).
    lora_dtype: LoraDtype = "auto"
    # int8 slots: an adapter whose weights would lose more than this to the rounding (root mean square,
    # relative, its worst layer; `worker.cpu_lora.rounding_error`) is refused with a 422. Trained
    # adapters lose ~0.6-0.7%; rows with a few weights far above the rest lose more, and the answers
    # part from float32's (bench/slot_quality.py: Student's t weights with 3 degrees of freedom lost
    # 4.9% and kept 10 of 16 greedy answers, with 2 lost 7.1% and kept none).
    lora_int8_max_error: float = 0.03
    max_context: int | None = None  # defaults to the model's own limit
    # Memory for the KV pool all running rows share. Sized explicitly, never from total system RAM.
    kv_cache_mb: int = 2048
    # What the KV pool stores. auto: the model's dtype (float32 on a CPU, bfloat16 on a GPU). bfloat16 on a
    # CPU: each key and value rounded once as it is written, attended in float32 (`worker.kvcache.KVPool`):
    # twice the positions in kv_cache_mb, and half the bytes a decode step reads, which long rows are
    # bound by. float32 is the CPU's auto, and is refused on a GPU, whose attention computes in bfloat16.
    kv_cache_dtype: KvCacheDtype = "auto"
    # Prompt tokens prefilled per step, in chunks beside the decoding rows. A chunk makes the step
    # every running stream waits on longer: on 2 CPU cores beside 8 decoding rows a step took 189 ms,
    # 306 ms with a 64-token chunk, 450 with 128, 1,400 with 512. On a GPU larger chunks are cheap.
    max_prefill_tokens: int = 64
    max_prefill_tokens_idle: int = 2048  # per step while no row is decoding: only the prompts wait
    # No engine step for this long: health says not live (the gateway or Kubernetes replaces the worker).
    stall_timeout_s: float = 60.0
    keepalive_s: float = 2.0  # a blank line on each open stream this often while the engine is live

    def __post_init__(self) -> None:
        for field in ("torch_threads", "max_batch_size", "max_waiting", "adapter_slots", "max_lora_rank",
                      "kv_cache_mb", "host_adapter_cache_mb", "max_prefill_tokens", "max_prefill_tokens_idle"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {', '.join(LORA_DTYPES)}, not {self.lora_dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {self.kv_cache_dtype!r}")
        if self.adapter_slots_mb is not None and self.adapter_slots_mb < 1:
            raise ValueError("adapter_slots_mb must be at least 1")
        if not 0 < self.lora_int8_max_error <= 1:  # NaN fails too
            raise ValueError(f"lora_int8_max_error must be in (0, 1], not {self.lora_int8_max_error}")
        if not 0 < self.keepalive_s < self.stall_timeout_s:
            raise ValueError("keepalive_s must be positive and below stall_timeout_s")

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        values = json.loads(text)
        return cls(**{**values, "model_path": Path(values["model_path"])})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (`--max-batch-size`), and `--config-json` for the whole object."""
        parser.add_argument("--config-json", help="the whole configuration as JSON (what the gateway passes)")
        for field in dataclasses.fields(cls):
            flags = [f"--{field.name.replace('_', '-')}", *_FLAG_ALIASES.get(field.name, [])]
            kind = {"int": int, "float": float, "int | None": int}.get(str(field.type), str)
            parser.add_argument(*flags, dest=field.name, type=kind, default=None, help=_HELP.get(field.name))

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> WorkerConfig:
        if args.config_json:
            return cls.from_json(args.config_json)
        given: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                                 if getattr(args, f.name) is not None}
        missing = [f"--{n.replace('_', '-')}" for n in ("model_path", "model_name", "blob_url") if n not in given]
        if missing:
            raise SystemExit(f"loraplex worker: {', '.join(missing)} required (or --config-json)")
        return cls(**{**given, "model_path": Path(given["model_path"])})
