"""KV_CACHE_DTYPE: which dtypes a worker's KV pool may store, and what the choice does to its size."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig

from app.settings import Settings
from worker.config import WorkerConfig
from worker.engine import kv_bytes_per_token
from worker.runtime import kv_cache_dtype


def test_auto_keeps_the_models_dtype_and_bfloat16_narrows_a_float32_model() -> None:
    assert kv_cache_dtype("auto", torch.float32) == torch.float32
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert kv_cache_dtype("bfloat16", torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype("float32", torch.float32) == torch.float32


def test_a_pool_wider_than_the_model_computes_in_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype float32 is wider than the bfloat16 this model's attention"):
        kv_cache_dtype("float32", torch.bfloat16)


def test_bfloat16_holds_twice_the_positions_in_the_same_memory() -> None:
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    budget = 2048 * 2**20
    f32, bf16 = (budget // kv_bytes_per_token(config, dtype) for dtype in (torch.float32, torch.bfloat16))
    assert kv_bytes_per_token(config, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    assert bf16 == 2 * f32


@pytest.mark.parametrize("value", ["float16", "int8", "fp8", "", "BFLOAT16"])
def test_only_the_dtypes_the_pool_serves_are_accepted(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b", kv_cache_dtype=value)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        Settings(data_dir=tmp_path, kv_cache_dtype=value)  # type: ignore[arg-type]


def test_the_choice_reaches_a_local_or_remote_worker(tmp_path: Path) -> None:
    assert WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b").kv_cache_dtype == "auto"
    local = Settings(data_dir=tmp_path, kv_cache_dtype="bfloat16").worker_config(0, "m", "m", "cpu")
    assert local.kv_cache_dtype == "bfloat16" and WorkerConfig.from_json(local.to_json()) == local
    parser = argparse.ArgumentParser()
    WorkerConfig.add_arguments(parser)
    flags = parser.parse_args(["--model-path", "m", "--model-name", "m", "--blob-url", "b",
                               "--kv-cache-dtype", "bfloat16"])
    assert WorkerConfig.from_arguments(flags).kv_cache_dtype == "bfloat16"
