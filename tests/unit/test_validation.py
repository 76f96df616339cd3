"""Upload validation: what is accepted, and every refusal names its problem."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save

from adapters.uploads import MAX_ARCHIVE_MEMBERS, MAX_CONFIG_BYTES, collect_files
from adapters.validation import InvalidAdapter, validate_adapter
from tests.factory import TINY_BASE, adapter_files, tar_gz_of, zip_of

QV = {k: v for k, v in TINY_BASE.items() if k.endswith(("q_proj", "v_proj"))}
LIMIT = 1_000_000


def check(config: bytes, weights: bytes, max_rank: int = 8):  # type: ignore[no-untyped-def]
    files = collect_files([("adapter_config.json", config), ("adapter_model.safetensors", weights)], LIMIT)
    return validate_adapter(files, TINY_BASE, max_rank)


def refused(config: bytes, weights: bytes, match: str, max_rank: int = 8) -> None:
    with pytest.raises(InvalidAdapter, match=match):
        check(config, weights, max_rank)


def test_valid_adapter_reports_rank_alpha_targets_and_declared_base() -> None:
    result = check(*adapter_files(QV, rank=4))
    assert result.rank == 4
    assert result.lora_alpha == 8
    assert result.target_modules == ["q_proj", "v_proj"]
    assert result.declared_base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_other_float_dtypes_are_accepted(dtype: str) -> None:
    assert check(*adapter_files(QV, dtype=dtype)).rank == 4


def test_declared_base_model_is_recorded_not_enforced() -> None:
    config, weights = adapter_files(QV, config={"base_model_name_or_path": "/home/alice/ckpt/smol"})
    assert check(config, weights).declared_base_model == "/home/alice/ckpt/smol"


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.pt", "weights.pkl"])
def test_pickle_files_are_refused(name: str) -> None:
    config, _ = adapter_files(QV)
    with pytest.raises(InvalidAdapter, match="pickle"):
        collect_files([("adapter_config.json", config), (name, pickle.dumps({"a": 1}))], LIMIT)


def test_pickle_body_under_a_safetensors_name_is_refused() -> None:
    config, _ = adapter_files(QV)
    refused(config, pickle.dumps({"x": list(range(100))}), "not a safetensors file")


def test_non_lora_config_is_refused() -> None:
    config, weights = adapter_files(QV, config={"peft_type": "PREFIX_TUNING"})
    refused(config, weights, "only LORA")


def test_target_module_absent_from_base_is_refused() -> None:
    config, weights = adapter_files({"model.layers.0.self_attn.k_proj": [16, 8]})
    refused(config, weights, "does not exist in the base model")


def test_wrong_shapes_are_refused_naming_both_shapes() -> None:
    config, weights = adapter_files({"model.layers.0.self_attn.q_proj": [32, 16]})
    refused(config, weights, r"in=32, out=16.*in=16, out=16")


def test_rank_above_limit_is_refused_naming_the_limit() -> None:
    refused(*adapter_files(QV, rank=16), match="rank 16 is above the limit of 8", max_rank=8)


def test_nan_weights_are_refused() -> None:
    config, _ = adapter_files(QV)
    a = np.ones((4, 16), dtype=np.float32)
    a[0, 0] = np.nan
    weights = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((16, 4), np.float32)})
    refused(config, weights, "NaN or Inf")


def test_integer_weights_are_refused() -> None:
    config, _ = adapter_files(QV)
    weights = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 16), np.int32),
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((16, 4), np.int32)})
    refused(config, weights, "floating point")


def test_truncated_safetensors_is_refused() -> None:
    config, weights = adapter_files(QV)
    refused(config, weights[: len(weights) - 10], "truncated")


def test_missing_lora_b_is_refused() -> None:
    config, _ = adapter_files(QV)
    weights = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 16), np.float32)})
    refused(config, weights, "missing its lora_B")


def test_missing_files_are_named() -> None:
    config, _ = adapter_files(QV)
    with pytest.raises(InvalidAdapter, match=r"missing adapter_model\.safetensors"):
        collect_files([("adapter_config.json", config)], LIMIT)


def test_zip_and_tar_gz_archives_are_unpacked() -> None:
    config, weights = adapter_files(QV)
    members = {"my-adapter/adapter_config.json": config, "my-adapter/adapter_model.safetensors": weights,
               "my-adapter/README.md": b"notes"}
    for archive in (("a.zip", zip_of(members)), ("a.tar.gz", tar_gz_of(members))):
        files = collect_files([archive], LIMIT)
        assert validate_adapter(files, TINY_BASE, 8).rank == 4


def test_archive_member_escaping_the_archive_is_refused() -> None:
    config, weights = adapter_files(QV)
    bad = zip_of({"../adapter_config.json": config, "adapter_model.safetensors": weights})
    with pytest.raises(InvalidAdapter, match="outside the archive"):
        collect_files([("a.zip", bad)], LIMIT)


def test_archive_unpacking_past_the_limit_is_refused() -> None:
    config, weights = adapter_files(QV)
    bomb = zip_of({"adapter_config.json": config, "adapter_model.safetensors": weights + b"\0" * 2_000_000})
    with pytest.raises(InvalidAdapter, match="limit"):
        collect_files([("a.zip", bomb)], LIMIT)


def test_dora_is_refused() -> None:
    config, weights = adapter_files(QV, config={"use_dora": True})
    refused(config, weights, "DoRA")


def test_config_that_is_not_json_is_refused() -> None:
    _, weights = adapter_files(QV)
    refused(b"{not json", weights, "not valid JSON")
    refused(json.dumps([1, 2]).encode(), weights, "JSON object")


def _tar_gz_of_empty_members(count: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        for i in range(count):
            tf.addfile(tarfile.TarInfo(f"empty-{i}"), io.BytesIO(b""))
    return raw.getvalue()


def test_an_archive_of_countless_empty_members_is_refused_while_reading() -> None:
    """Empty members unpack to zero bytes; only a member cap stops 200k of them (84 MiB, 9.6 s before)."""
    bomb = _tar_gz_of_empty_members(200_000)
    started = time.monotonic()
    with pytest.raises(InvalidAdapter, match=f"more than {MAX_ARCHIVE_MEMBERS} members"):
        collect_files([("a.tar.gz", bomb)], LIMIT)
    assert time.monotonic() - started < 2.0  # stops at the cap, not after reading every header
    many = zipfile.ZipFile(raw := io.BytesIO(), "w")
    for i in range(MAX_ARCHIVE_MEMBERS + 1):
        many.writestr(f"empty-{i}", b"")
    many.close()
    with pytest.raises(InvalidAdapter, match="members; the limit"):
        collect_files([("a.zip", raw.getvalue())], LIMIT)


def test_a_gzip_bomb_in_tar_headers_is_refused_at_the_limit() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("adapter_config.json")
        info.pax_headers = {"comment": "x" * 3_000_000}  # one pax record, megabytes when unpacked
        tf.addfile(info, io.BytesIO(b""))
    assert len(raw.getvalue()) < 50_000
    with pytest.raises(InvalidAdapter, match="unpacks to more than"):
        collect_files([("a.tar.gz", raw.getvalue())], LIMIT)


def test_encrypted_and_unsupported_zip_members_are_422_not_500() -> None:
    config, weights = adapter_files(QV)
    for flag, method, problem in ((0x1, zipfile.ZIP_STORED, "encrypted"), (0, 9, "compression method 9")):
        raw = io.BytesIO()
        with zipfile.ZipFile(raw, "w") as zf:
            zf.writestr("adapter_config.json", config)
            info = zipfile.ZipInfo("adapter_model.safetensors")
            zf.writestr(info, weights)
        data = bytearray(raw.getvalue())
        # Patch the member's central directory entry: general purpose flags and method.
        at = data.rfind(b"PK\x01\x02")
        data[at + 8 : at + 10] = flag.to_bytes(2, "little")
        data[at + 10 : at + 12] = method.to_bytes(2, "little")
        with pytest.raises(InvalidAdapter, match=problem):
            collect_files([("a.zip", bytes(data))], LIMIT)


def test_two_archive_members_with_one_file_name_are_refused() -> None:
    config, weights = adapter_files(QV)
    _, other = adapter_files(QV, seed=9)
    members = {"a/adapter_config.json": config, "a/adapter_model.safetensors": weights,
               "b/adapter_model.safetensors": other}
    for archive in (("a.zip", zip_of(members)), ("a.tar.gz", tar_gz_of(members))):
        with pytest.raises(InvalidAdapter, match=r"adapter_model\.safetensors appears more than once"):
            collect_files([archive], LIMIT)


def test_an_oversized_adapter_config_is_refused() -> None:
    _, weights = adapter_files(QV)
    with pytest.raises(InvalidAdapter, match=r"adapter_config\.json is larger than"):
        collect_files([("adapter_config.json", b" " * (MAX_CONFIG_BYTES + 1)),
                       ("adapter_model.safetensors", weights)], 10 * MAX_CONFIG_BYTES)
