"""Build PEFT-format adapter files (numpy, no torch) for tests."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
from safetensors.numpy import save

# A tiny two-layer base, as `linear_modules` is stored for a base model.
TINY_BASE = {
    f"model.layers.{i}.{part}": shape
    for i in range(2)
    for part, shape in {
        "self_attn.q_proj": [16, 16],
        "self_attn.v_proj": [16, 8],
        "mlp.down_proj": [32, 16],
    }.items()
}


def adapter_files(
    modules: dict[str, list[int]],
    rank: int = 4,
    dtype: str = "float32",
    config: dict[str, object] | None = None,
    seed: int = 0,
) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) for a LoRA over `modules`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (in_f, out_f) in modules.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, in_f)).astype(dtype)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, rank)).astype(dtype)
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bias": "none",
        **(config or {}),
    }
    return json.dumps(cfg).encode(), save(tensors)


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
