"""Check an uploaded adapter against the base model before anything is stored."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.patterns import MAX_PATTERNS, PatternError, resolve_module_pattern, targeted
from adapters.peft_format import (
    Buffer,
    FormatError,
    LoraModule,
    TensorInfo,
    lora_modules,
    module_scaling,
    parse_config,
    read_safetensors_header,
    target_modules,
)


class InvalidAdapter(ValueError):
    """The upload is not an adapter we can serve; the message names the problem."""


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: Buffer

    @property
    def weights_size(self) -> int:
        return len(self.weights)

    @functools.cached_property
    def weights_sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()


@dataclass(frozen=True)
class ValidatedAdapter:
    config: dict[str, Any]
    modules: list[LoraModule]
    rank: int
    lora_alpha: float
    target_modules: list[str]
    declared_base_model: str | None
    stored_config: bytes  # adapter_config.json as stored: its module patterns resolved to full names


DEFAULT_MAX_DELTA = 1000.0


def validate_adapter(
    files: AdapterFiles, linear_modules: dict[str, list[int]], max_rank: int, max_delta: float = DEFAULT_MAX_DELTA
) -> ValidatedAdapter:
    """Check config, tensors, shapes and values against the base model's linear layers.

    `max_delta` bounds the largest entry of scale · B · A any module may add to its base weight.
    """
    try:
        config = parse_config(files.config)
        tensors = read_safetensors_header(files.weights)
        modules = lora_modules(tensors)
        for m in modules:
            _check_module_fits(m, linear_modules, max_rank)
        config = config_agreeing_with_tensors(config, modules)
    except (FormatError, PatternError) as exc:
        raise InvalidAdapter(str(exc)) from exc
    check_weights(files.weights, tensors, modules, config, max_delta)
    declared = config.get("base_model_name_or_path")
    return ValidatedAdapter(
        config=config,
        modules=modules,
        rank=max(m.rank for m in modules),
        lora_alpha=float(config["lora_alpha"]),
        target_modules=target_modules(config, modules),
        declared_base_model=str(declared) if declared else None,
        stored_config=json.dumps(config, sort_keys=True).encode(),
    )


def _check_module_fits(m: LoraModule, linear_modules: dict[str, list[int]], max_rank: int) -> None:
    if m.module not in linear_modules:
        short = m.module.rsplit(".", 1)[-1]
        raise InvalidAdapter(
            f"target module {m.module!r} does not exist in the base model "
            f"(or is not a linear layer); cannot apply {short}"
        )
    in_features, out_features = linear_modules[m.module]
    if (m.in_features, m.out_features) != (in_features, out_features):
        raise InvalidAdapter(
            f"module {m.module}: adapter shapes (in={m.in_features}, out={m.out_features}) do not fit "
            f"the base layer (in={in_features}, out={out_features}); was it trained on another model?"
        )
    if m.rank > max_rank:
        raise InvalidAdapter(f"module {m.module}: rank {m.rank} is above the limit of {max_rank} (max_lora_rank)")


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_BFLOAT16_MAX = 3.3895313892515355e38  # GPU workers compute in bfloat16: float32's range, rounded


def _as_float32(dtype: str, raw: Buffer) -> np.ndarray:
    """The values as the worker computes with them (float32; bfloat16 on GPUs has the same range)."""
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen it.
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    values = np.frombuffer(raw, dtype=np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder("<"))
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
        return values.astype(np.float32)


def check_weights(
    weights: Buffer, tensors: dict[str, TensorInfo], modules: list[LoraModule], config: dict[str, Any],
    max_delta: float,
) -> None:
    """Every value finite in float32, and every module's update bounded.

    The bound is on the largest entry of scale · B · A, taken through Cauchy-Schwarz as
    scale · max row norm of B · max column norm of A: linear in the adapter's size, and never
    below the true largest entry. Real adapters sit near 0.1; an adapter past the limit can only
    push activations towards overflow.
    """
    for m in modules:
        a = _as_float32(tensors[m.a_key].dtype, weights[tensors[m.a_key].start : tensors[m.a_key].end])
        b = _as_float32(tensors[m.b_key].dtype, weights[tensors[m.b_key].start : tensors[m.b_key].end])
        scale = abs(module_scaling(config, m.module, m.rank))
        for key, values, factor in ((m.a_key, a, 1.0), (m.b_key, b, scale)):  # workers store B scaled
            if not np.isfinite(values).all():
                raise InvalidAdapter(f"tensor {key!r} holds NaN or Inf values (in float32, as the worker computes)")
            if values.size and float(np.abs(values).max()) * factor > _BFLOAT16_MAX:
                raise InvalidAdapter(f"tensor {key!r} (times the adapter's scale {factor:g}) overflows the "
                                     "float32 / bfloat16 range workers compute in")
        a64 = a.astype(np.float64).reshape(m.rank, m.in_features)
        b64 = b.astype(np.float64).reshape(m.out_features, m.rank)
        bound = scale * float(np.sqrt((b64 * b64).sum(axis=1).max())) * float(np.sqrt((a64 * a64).sum(axis=0).max()))
        if not bound <= max_delta:
            raise InvalidAdapter(
                f"module {m.module}: its update scale * B * A may reach {bound:.3g}, above the limit of "
                f"{max_delta:g} (max_adapter_delta); real adapters stay far below 1"
            )


def config_agreeing_with_tensors(config: dict[str, Any], modules: list[LoraModule]) -> dict[str, Any]:
    """Check the config describes these tensors as PEFT needs to load them; resolve its patterns.

    Returns the config to store: `alpha_pattern` / `rank_pattern` keyed by full module name.
    """
    names = [m.module for m in modules]
    if len(config.get("alpha_pattern") or {}) + len(config.get("rank_pattern") or {}) > MAX_PATTERNS:
        raise InvalidAdapter(f"adapter_config.json has more than {MAX_PATTERNS} alpha_pattern/rank_pattern entries")
    ranks = resolve_module_pattern("rank_pattern", config.get("rank_pattern") or {}, names)
    alphas = resolve_module_pattern("alpha_pattern", config.get("alpha_pattern") or {}, names)
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    for m in modules:
        declared = ranks.get(m.module, config["r"])
        if declared != m.rank:
            source = "rank_pattern" if m.module in ranks else "r"
            raise InvalidAdapter(f"module {m.module}: adapter_config.json declares rank {declared} ({source}) "
                                 f"but its tensors have rank {m.rank}")
        if not targeted(config.get("target_modules"), m.module):
            raise InvalidAdapter(f"module {m.module} has LoRA tensors but is not in adapter_config.json "
                                 "target_modules")
        if isinstance(layers, list) and _layer_index(m.module) not in layers:
            raise InvalidAdapter(f"module {m.module} has LoRA tensors but its layer is not in "
                                 "adapter_config.json layers_to_transform")
    return {**config, "alpha_pattern": alphas, "rank_pattern": ranks}


def _layer_index(module: str) -> int | None:
    parts = module.split(".")
    for before, part in itertools.pairwise(parts):
        if before in ("layers", "h", "blocks", "layer") and part.isdigit():
            return int(part)
    return None
