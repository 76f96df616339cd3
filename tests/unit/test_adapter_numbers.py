"""Adapters are numerically safe before they are stored, and their patterns never reach a worker as regexes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors.numpy import save

from adapters.peft_format import module_scaling, parse_config
from adapters.uploads import collect_files
from adapters.validation import InvalidAdapter, validate_adapter
from tests.factory import TINY_BASE, adapter_files

QV = {k: v for k, v in TINY_BASE.items() if k.endswith(("q_proj", "v_proj"))}


def check(config: bytes, weights: bytes, max_delta: float = 1000.0):  # type: ignore[no-untyped-def]
    files = collect_files([("adapter_config.json", config), ("adapter_model.safetensors", weights)], 10**6)
    return validate_adapter(files, TINY_BASE, max_rank=8, max_delta=max_delta)


def with_config(raw_config: str) -> tuple[bytes, bytes]:
    _, weights = adapter_files(QV, rank=4)
    return raw_config.encode(), weights


BASE_CONFIG = '"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]'


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        ("1e999", "not a finite number"),  # JSON parses it as infinity
        ("NaN", "NaN: numbers must be finite"),
        ("Infinity", "numbers must be finite"),
        ("-8", "lora_alpha must be a positive number"),
        ("1e6", "at most 65536"),
        ("1" * 5000, "adapter_config.json"),  # an integer too long for Python to convert
        ('"8"', "lora_alpha must be a positive number"),
    ],
)
def test_lora_alpha_must_be_finite_and_bounded(alpha: str, message: str) -> None:
    with pytest.raises(InvalidAdapter, match=message):
        check(*with_config(f'{{{BASE_CONFIG}, "lora_alpha": {alpha}}}'))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('"alpha_pattern": {"q_proj": 1e999}', "not a finite number"),
        ('"alpha_pattern": {"q_proj": -1}', r"alpha_pattern\['q_proj'\] must be a positive number"),
        ('"rank_pattern": {"q_proj": 4.5}', "must be a positive integer"),
        ('"alpha_pattern": [1, 2]', "alpha_pattern must be an object"),
    ],
)
def test_pattern_values_must_be_finite_and_bounded(extra: str, message: str) -> None:
    with pytest.raises(InvalidAdapter, match=message):
        check(*with_config(f'{{{BASE_CONFIG}, "lora_alpha": 8, {extra}}}'))


def test_deeply_nested_config_is_refused_not_a_crash() -> None:
    nested = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InvalidAdapter, match=r"nested too deeply|not valid JSON"):
        check(*with_config(f'{{{BASE_CONFIG}, "lora_alpha": 8, "extra": {nested}}}'))


def weights_of(values: dict[str, np.ndarray]) -> bytes:
    return save(values)


def qv_tensors(a_value: float, b_value: float, dtype: str = "float32") -> dict[str, np.ndarray]:
    tensors = {}
    for name, (in_f, out_f) in QV.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.full((4, in_f), a_value, dtype=dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.full((out_f, 4), b_value, dtype=dtype)
    return tensors


def test_float64_weights_that_overflow_float32_are_refused() -> None:
    config, _ = adapter_files(QV, rank=4)
    with pytest.raises(InvalidAdapter, match=r"NaN or Inf values .*float32"):
        check(config, weights_of(qv_tensors(1e300, 1e-300, dtype="float64")))


def test_weights_that_overflow_once_scaled_or_in_bfloat16_are_refused() -> None:
    config = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 64}'  # scale 16
    with pytest.raises(InvalidAdapter, match=r"times the adapter's scale 16\) overflows"):
        check(config, weights_of(qv_tensors(1e-37, 1e38)))  # B fits float32, B * 16 does not
    with pytest.raises(InvalidAdapter, match="overflows the float32 / bfloat16 range"):
        check(config, weights_of(qv_tensors(3.4e38, 1e-38)))  # finite in float32, inf in bfloat16


def test_finite_weights_whose_product_can_only_overflow_are_refused() -> None:
    config, _ = adapter_files(QV, rank=4)
    with pytest.raises(InvalidAdapter, match=r"may reach .* above the limit of 1000 \(max_adapter_delta\)"):
        check(config, weights_of(qv_tensors(1e19, 1e19)))  # each value fits float32; B·A is ~1e39


def test_the_delta_bound_counts_the_scale_and_is_configurable() -> None:
    base = f'{{{BASE_CONFIG}, "lora_alpha": LORA_ALPHA}}'
    weights = weights_of(qv_tensors(1.0, 1.0))  # B·A entries are 4 (rank 4), as is the bound (2 x 2)
    assert check(base.replace("LORA_ALPHA", "4").encode(), weights).rank == 4  # scale 1: 4
    with pytest.raises(InvalidAdapter, match=r"may reach 1\.2e\+03, above the limit of 1000"):
        check(base.replace("LORA_ALPHA", "1200").encode(), weights)  # scale 300: 1200
    with pytest.raises(InvalidAdapter, match="above the limit of 3 "):
        check(base.replace("LORA_ALPHA", "4").encode(), weights, max_delta=3)


def test_real_adapter_sized_updates_pass_with_room_to_spare() -> None:
    config, weights = adapter_files(QV, rank=8)  # standard-normal A and B: far larger than trained ones
    assert check(config, weights).rank == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('"rank_pattern": {"q_proj": 2}', r"declares rank 2 \(rank_pattern\) but its tensors have rank 4"),
        ('"target_modules": ["q_proj"]', "self_attn.v_proj has LoRA tensors but is not in"),
        ('"target_modules": ".*q_proj"', "self_attn.v_proj has LoRA tensors but is not in"),
        ('"layers_to_transform": [0]', "its layer is not in adapter_config.json layers_to_transform"),
    ],
)
def test_config_must_agree_with_the_tensors_as_peft_would_require(extra: str, message: str) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config.update(json.loads(f"{{{extra}}}"))
    with pytest.raises(InvalidAdapter, match=message):
        check(*with_config(json.dumps(config)))


def test_declared_r_must_match_the_tensor_rank() -> None:
    with pytest.raises(InvalidAdapter, match=r"declares rank 8 \(r\) but its tensors have rank 4"):
        check(*with_config('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}'))


def test_patterns_are_resolved_at_upload_into_full_module_names() -> None:
    config = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": r".*\.(q|v)_proj",
        "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 32, "q_proj": 16},  # first match wins, as in PEFT
        "rank_pattern": {"v_p.*": 4},
    }
    checked = check(*with_config(json.dumps(config)))
    stored = json.loads(checked.stored_config)
    assert stored["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 32, "model.layers.1.self_attn.q_proj": 16}
    assert stored["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 4, "model.layers.1.self_attn.v_proj": 4}
    # The worker's reading: plain names only.
    worker_config = parse_config(checked.stored_config)
    assert module_scaling(worker_config, "model.layers.0.self_attn.q_proj", 4) == 8.0
    assert module_scaling(worker_config, "model.layers.1.self_attn.q_proj", 4) == 4.0
    assert module_scaling(worker_config, "model.layers.1.self_attn.v_proj", 4) == 2.0  # lora_alpha / r


def test_the_worker_never_evaluates_a_pattern_as_a_regex() -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"(.|.|.)*Z": 64, "q_.roj": 64}}
    assert module_scaling(config, "model.layers.0.self_attn.q_proj", 4) == 2.0  # lora_alpha / r, no regex match


@pytest.mark.parametrize("pattern", ["(.|.|.)*Z", "(a+)+$", "(x+x+)+y"])
def test_catastrophic_patterns_resolve_in_linear_time(pattern: str) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {pattern: 2}}
    started = time.monotonic()
    checked = check(*with_config(json.dumps(config)))
    assert time.monotonic() - started < 2.0
    assert json.loads(checked.stored_config)["alpha_pattern"] == {}


@pytest.mark.parametrize(("pattern", "message"), [(r"(q)\1", "not supported"), ("(?=q)q_proj", "not supported"),
                                                  ("x" * 600, "1-512 characters")])
def test_patterns_re2_cannot_run_are_refused_with_the_reason(pattern: str, message: str) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {pattern: 2}}
    with pytest.raises(InvalidAdapter, match=message):
        check(*with_config(json.dumps(config)))


def _raw_safetensors(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_safetensors_data_ranges_must_tile_the_file() -> None:
    from adapters.peft_format import FormatError, read_safetensors_header

    a = {"dtype": "F32", "shape": [1, 2]}
    ok = _raw_safetensors({"x": {**a, "data_offsets": [0, 8]}, "y": {**a, "data_offsets": [8, 16]}}, bytes(16))
    assert set(read_safetensors_header(ok)) == {"x", "y"}
    cases = {
        "overlaps another tensor": ({"x": {**a, "data_offsets": [0, 8]}, "y": {**a, "data_offsets": [4, 12]}}, 16),
        "bytes after its last tensor": ({"x": {**a, "data_offsets": [0, 8]}}, 64),
        "unused bytes before it": ({"x": {**a, "data_offsets": [8, 16]}}, 16),
    }
    for message, (header, size) in cases.items():
        with pytest.raises(FormatError, match=message):
            read_safetensors_header(_raw_safetensors(header, bytes(size)))
    with pytest.raises(FormatError, match="negative dimension"):
        read_safetensors_header(_raw_safetensors({"x": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},
                                                 bytes(8)))
    with pytest.raises(FormatError, match="malformed header entry"):
        read_safetensors_header(_raw_safetensors({"x": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
                                                 bytes(8)))


def test_a_header_of_many_keys_is_checked_in_linear_time() -> None:
    from adapters.peft_format import MAX_TENSORS, FormatError, read_safetensors_header

    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(60_000)}
    started = time.monotonic()
    with pytest.raises(FormatError, match=f"the limit is {MAX_TENSORS}"):
        read_safetensors_header(_raw_safetensors(many, b""))
    pairs = ", ".join(f'"t{i}": 1' for i in range(60_000))
    raw = ("{" + pairs + ', "t7": 1}').encode()
    with pytest.raises(FormatError, match="'t7' more than once"):
        read_safetensors_header(len(raw).to_bytes(8, "little") + raw)
    assert time.monotonic() - started < 5  # list.count took minutes at this size
