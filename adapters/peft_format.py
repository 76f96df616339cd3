"""PEFT LoRA file format, read without torch.

Shared by the gateway (validation before anything is stored) and the worker (loading
into its own LoRA layers), so both agree on what a tensor name means.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from typing import Any

# PEFT saves `base_model.model.<module>.lora_A.weight`; older or hand-made files may
# keep the adapter name (`lora_A.default.weight`) or drop the `base_model.model.` prefix.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

SAFETENSORS_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
# What an adapter's bytes may live in: memory, or a file mapped read-only (a spooled upload).
Buffer = bytes | bytearray | memoryview | mmap.mmap

MAX_HEADER_BYTES = 16 * 1024 * 1024


class FormatError(ValueError):
    """The files are not a usable PEFT LoRA adapter; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset of the data, from the start of the file
    end: int


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: A is [rank, in_features], B is [out_features, rank]."""

    module: str
    rank: int
    in_features: int
    out_features: int
    a_key: str
    b_key: str


MAX_TENSORS = 16384  # lora_A and lora_B of 7 linears in 1170 layers; a header listing more is refused


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()  # linear: list.count made a 20k-key header take seconds, a 16 MiB one hours
    for key, _ in pairs:
        if key in seen:
            raise FormatError(f"adapter_model.safetensors names tensor {key!r} more than once")
        seen.add(key)
    return dict(pairs)


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError("expected a list of integers")
    return tuple(values)


def read_safetensors_header(data: Buffer) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check every tensor lies inside the file."""
    if len(data) < 8:
        raise FormatError("adapter_model.safetensors is truncated: no header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise FormatError("adapter_model.safetensors is not a safetensors file (bad header length)")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]), object_pairs_hook=_unique_keys)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # JSON errors, and integers too long to convert
        raise FormatError("adapter_model.safetensors is not a safetensors file (malformed header)") from exc
    if not isinstance(header, dict):
        raise FormatError("adapter_model.safetensors has a malformed header")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise FormatError(f"adapter_model.safetensors lists {len(header)} tensors; the limit is {MAX_TENSORS}")
    base = 8 + header_len
    tensors = {key: _tensor_info(key, info, base, len(data)) for key, info in header.items()}
    _check_contiguous(tensors, base, len(data))
    return tensors


def _check_contiguous(tensors: dict[str, TensorInfo], base: int, file_size: int) -> None:
    """Data ranges tile the rest of the file exactly, as the format requires: no overlap, no hidden bytes."""
    at = base
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != at:
            problem = "overlaps another tensor" if info.start < at else "leaves unused bytes before it"
            raise FormatError(f"adapter_model.safetensors: tensor {key!r} {problem}")
        at = info.end
    if at != file_size:
        raise FormatError(f"adapter_model.safetensors has {file_size - at} bytes after its last tensor")


def _tensor_info(key: str, info: Any, base: int, file_size: int) -> TensorInfo:
    try:
        start, end = _ints(info["data_offsets"])
        shape = _ints(info["shape"])
        dtype = str(info["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"tensor {key!r} has a malformed header entry") from exc
    if any(d < 0 for d in shape):
        raise FormatError(f"tensor {key!r} has a negative dimension in shape {list(shape)}")
    if not 0 <= start <= end or base + end > file_size:
        raise FormatError(f"adapter_model.safetensors is truncated: tensor {key!r} runs past the end")
    numel = math.prod(shape)
    if dtype in _DTYPE_BYTES and end - start != numel * _DTYPE_BYTES[dtype]:
        raise FormatError(f"tensor {key!r}: {end - start} data bytes do not match shape {list(shape)}")
    return TensorInfo(dtype, shape, base + start, base + end)


MAX_LORA_ALPHA = 65536.0  # lora_alpha and alpha_pattern values; real adapters use 1-1024
MAX_CONFIG_RANK = 65536  # r and rank_pattern values (the worker's max_lora_rank is the real limit)


def _refuse_constant(name: str) -> float:
    raise FormatError(f"adapter_config.json holds {name}: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise FormatError(f"adapter_config.json holds {text[:40]}, which is not a finite number")
    return value


def _strict_json(raw: Buffer, what: str) -> Any:
    """JSON with finite numbers only; any malformation (deep nesting, 5000-digit integers) is a FormatError."""
    try:
        return json.loads(bytes(raw), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # FormatError is one; int() refuses integers of thousands of digits
        raise FormatError(str(exc) if isinstance(exc, FormatError) else f"{what}: {exc}") from None


def _positive_number(config: dict[str, Any], field: str, limit: float, *, integer: bool = False) -> None:
    value = config.get(field)
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)  # 8.0 from a hand-written config is rank 8
    kind = int if integer else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool) or not 0 < value <= limit:
        noun = "integer" if integer else "number"
        raise FormatError(f"adapter_config.json {field} must be a positive {noun} of at most {limit:g}, "
                          f"got {str(value)[:40]}")


def _pattern_values(config: dict[str, Any], field: str, limit: float, *, integer: bool) -> None:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise FormatError(f"adapter_config.json {field} must be an object of module pattern -> value")
    for key, value in patterns.items():
        _positive_number({f"{field}[{key[:60]!r}]": value}, f"{field}[{key[:60]!r}]", limit, integer=integer)


def parse_config(raw: Buffer) -> dict[str, Any]:
    """Load adapter_config.json and check it describes a plain LoRA adapter with sane numbers."""
    config = _strict_json(raw, "adapter_config.json")
    if not isinstance(config, dict):
        raise FormatError("adapter_config.json must be a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise FormatError(
            f"adapter_config.json peft_type is {config.get('peft_type')!r}; only LORA adapters are served"
        )
    if config.get("use_dora"):
        raise FormatError("DoRA adapters (use_dora=true) are not supported")
    if config.get("modules_to_save"):
        raise FormatError("adapters with modules_to_save (full copies of base layers) are not supported")
    if config.get("bias", "none") != "none":
        raise FormatError("adapters that train biases (bias != 'none') are not supported")
    if config.get("fan_in_fan_out"):
        raise FormatError("fan_in_fan_out adapters (Conv1D bases) are not supported")
    _positive_number(config, "r", MAX_CONFIG_RANK, integer=True)
    _positive_number(config, "lora_alpha", MAX_LORA_ALPHA)
    _pattern_values(config, "rank_pattern", MAX_CONFIG_RANK, integer=True)
    _pattern_values(config, "alpha_pattern", MAX_LORA_ALPHA, integer=False)
    return config


def lora_modules(tensors: dict[str, TensorInfo]) -> list[LoraModule]:
    """Pair lora_A / lora_B tensors per module; refuse anything else in the file."""
    pairs: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for key, info in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise FormatError(f"unexpected tensor {key!r}: only lora_A / lora_B weights are accepted")
        if info.dtype not in SAFETENSORS_FLOAT_DTYPES:
            raise FormatError(f"tensor {key!r} has dtype {info.dtype}; LoRA weights must be floating point")
        if len(info.shape) != 2:
            raise FormatError(f"tensor {key!r} has shape {list(info.shape)}; LoRA weights are 2-D")
        slot = pairs.setdefault(match["module"], {})
        if match["ab"] in slot:
            raise FormatError(f"duplicate tensor for {match['module']} lora_{match['ab']}")
        slot[match["ab"]] = (key, info)
    if not pairs:
        raise FormatError("adapter_model.safetensors holds no LoRA tensors")
    modules = []
    for module, slot in sorted(pairs.items()):
        if set(slot) != {"A", "B"}:
            missing = ({"A", "B"} - set(slot)).pop()
            raise FormatError(f"module {module} is missing its lora_{missing} tensor")
        (a_key, a), (b_key, b) = slot["A"], slot["B"]
        rank, in_features = a.shape
        out_features, b_rank = b.shape
        if rank != b_rank or rank == 0:
            raise FormatError(f"module {module}: lora_A rank {rank} does not match lora_B rank {b_rank}")
        modules.append(LoraModule(module, rank, in_features, out_features, a_key, b_key))
    return modules


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """A pattern's value for `module`, matched as a plain name (the whole name or a dotted suffix).

    Never as a regular expression: uploads store patterns resolved to full module names
    (adapters.patterns), so a tenant's regex never runs here.
    """
    if module in patterns:
        return float(patterns[module])
    for key, value in patterns.items():
        if module.endswith("." + key):
            return float(value)
    return default


def module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies B·A·x by for this module."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, float(config["lora_alpha"]))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def target_modules(config: dict[str, Any], modules: list[LoraModule]) -> list[str]:
    """The short names of the layers the adapter adapts (q_proj, v_proj, ...)."""
    return sorted({m.module.rsplit(".", 1)[-1] for m in modules})
