"""Build tests/fixtures/hostile: uploads that must be refused, each with the answer expected.

    python scripts/make_hostile_corpus.py [target-dir]

Made for the unit tests' tiny base model (tests/factory.TINY_BASE) and their limits
(max_lora_rank 8, max_adapter_bytes 200000). Every case is a directory of the files sent
as one upload, named in manifest.json with the status and a fragment of the message.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import TINY_BASE, adapter_files  # noqa: E402

QV = {k: v for k, v in TINY_BASE.items() if k.endswith(("q_proj", "v_proj"))}
CONFIG, WEIGHTS = adapter_files(QV)


def _config(**changes: object) -> bytes:
    return json.dumps({**json.loads(CONFIG), **changes}).encode()


def _tensors(**overrides: np.ndarray) -> bytes:
    from safetensors.numpy import load

    tensors = dict(load(WEIGHTS))
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    for name, value in overrides.items():
        tensors[key if name == "first_a" else name] = value
    return save(tensors)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _duplicate_header_keys() -> bytes:
    body = WEIGHTS[8 + struct.unpack("<Q", WEIGHTS[:8])[0]:]
    header = json.loads(WEIGHTS[8 : 8 + struct.unpack("<Q", WEIGHTS[:8])[0]])
    key = next(k for k in header if k != "__metadata__")
    entries = [f'"{k}": {json.dumps(v)}' for k, v in header.items()] + [f'"{key}": {json.dumps(header[key])}']
    raw = ("{" + ", ".join(entries) + "}").encode()
    return struct.pack("<Q", len(raw)) + raw + body


def cases() -> dict[str, tuple[int, str, dict[str, bytes], str]]:
    """name -> (status, message fragment, files, adapter name)."""
    pickled = pickle.dumps({"lora_A": [1.0]})
    char_device = tarfile.TarInfo("adapter_model.safetensors")
    char_device.type = tarfile.CHRTYPE
    a_key = next(k for k in sorted(json.loads(WEIGHTS[8 : 8 + struct.unpack("<Q", WEIGHTS[:8])[0]])) if "lora_A" in k)
    b_key = a_key.replace("lora_A", "lora_B")
    ok = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
    return {
        "pickle-bin": (422, "pickle", {"adapter_config.json": CONFIG, "adapter_model.bin": pickled}, "evil"),
        "pickle-pt": (422, "pickle", {"adapter_config.json": CONFIG, "adapter_model.pt": pickled}, "evil"),
        "pickle-pkl": (422, "pickle", {"adapter_config.json": CONFIG, "weights.pkl": pickled}, "evil"),
        "pickle-named-safetensors": (422, "safetensors", {"adapter_config.json": CONFIG,
                                                          "adapter_model.safetensors": pickled}, "evil"),
        "zip-bomb": (422, "unpacks to more than", {"bomb.zip": _zip({"adapter_config.json": CONFIG,
                                                                      "adapter_model.safetensors": bytes(50 << 20)})},
                     "bomb"),
        "zip-dotdot": (422, "outside", {"a.zip": _zip({"../adapter_config.json": CONFIG,
                                                       "adapter_model.safetensors": WEIGHTS})}, "escape"),
        "zip-absolute": (422, "outside", {"a.zip": _zip({"/etc/adapter_config.json": CONFIG,
                                                         "adapter_model.safetensors": WEIGHTS})}, "escape"),
        "tar-symlink": (422, "not a regular file", {"a.tar.gz": _tar(
            [tarfile.TarInfo("adapter_config.json"),
             _link("adapter_model.safetensors", "/etc/passwd", tarfile.SYMTYPE)],
            {"adapter_config.json": CONFIG})}, "link"),
        "tar-device": (422, "not a regular file", {"a.tar.gz": _tar(
            [tarfile.TarInfo("adapter_config.json"), char_device], {"adapter_config.json": CONFIG})}, "device"),
        "not-lora": (422, "only LORA", {**ok, "adapter_config.json": _config(peft_type="PREFIX_TUNING")}, "prefix"),
        "dora": (422, "DoRA", {**ok, "adapter_config.json": _config(use_dora=True)}, "dora"),
        "modules-to-save": (422, "modules_to_save", {**ok, "adapter_config.json": _config(modules_to_save=["lm_head"])},
                            "full-copy"),
        "absent-module": (422, "does not exist", {**ok, "adapter_model.safetensors": adapter_files(
            {"model.layers.0.self_attn.x_proj": [16, 16]})[1]}, "absent"),
        "wrong-shape": (422, "do not fit", {**ok, "adapter_model.safetensors": adapter_files(
            {"model.layers.0.self_attn.q_proj": [12, 16]})[1]}, "misfit"),
        "rank-over-limit": (422, "above the limit", dict(zip(ok, adapter_files(QV, rank=16), strict=True)), "wide"),
        "nan": (422, "NaN or Inf", {**ok, "adapter_model.safetensors": _tensors(
            first_a=np.full((4, 16), np.nan, dtype=np.float32))}, "nan"),
        "inf": (422, "NaN or Inf", {**ok, "adapter_model.safetensors": _tensors(
            first_a=np.full((4, 16), np.inf, dtype=np.float32))}, "inf"),
        "int-weights": (422, "floating point", {**ok, "adapter_model.safetensors": _tensors(
            first_a=np.ones((4, 16), dtype=np.int32))}, "ints"),
        "truncated": (422, "truncated", {**ok, "adapter_model.safetensors": WEIGHTS[: len(WEIGHTS) - 100]}, "cut"),
        "missing-lora-b": (422, "lora_B", {**ok, "adapter_model.safetensors": _without(b_key)}, "half"),
        "duplicate-tensor": (422, "more than once", {**ok, "adapter_model.safetensors": _duplicate_header_keys()},
                             "twice"),
        "too-large": (413, "max_adapter_bytes", {**ok, "adapter_model.safetensors": WEIGHTS + bytes(300_000)}, "big"),
        "tar-countless-empty-members": (422, "members", {"a.tar.gz": _tar(
            [tarfile.TarInfo(f"empty-{i}") for i in range(5000)], {})}, "headers"),
        "tar-pax-header-bomb": (422, "unpacks to more than", {"a.tar.gz": _pax_bomb()}, "pax"),
        "zip-countless-members": (422, "members; the limit", {"a.zip": _zip(
            {**ok, **{f"empty-{i}": b"" for i in range(1001)}})}, "many"),
        "zip-encrypted-member": (422, "encrypted", {"a.zip": _patched_zip(flag=0x1, method=0)}, "locked"),
        "zip-unknown-compression": (422, "compression method 9", {"a.zip": _patched_zip(flag=0, method=9)},
                                    "deflate64"),
        "zip-one-name-twice": (422, "appears more than once", {"a.zip": _zip(
            {**ok, "other/adapter_model.safetensors": _tensors(first_a=np.zeros((4, 16), dtype=np.float32))})},
                               "twice"),
        "config-nan-alpha": (422, "must be finite", {**ok, "adapter_config.json": CONFIG.replace(
            b'"lora_alpha": 8', b'"lora_alpha": NaN')}, "nan-alpha"),
        "config-huge-integer": (422, "adapter_config.json", {**ok, "adapter_config.json": CONFIG.replace(
            b'"r": 4', b'"r": ' + b"9" * 5000)}, "digits"),
        "config-deep-nesting": (422, "nested too deeply", {**ok, "adapter_config.json": CONFIG[:-1] + b', "x": '
                                + b"[" * 20_000 + b"]" * 20_000 + b"}"}, "deep"),
        "name-with-slash": (400, "adapter name", ok, "../etc"),
        "name-with-control": (400, "adapter name", ok, "bad\x07name"),
        "name-too-long": (400, "adapter name", ok, "x" * 65),
    }


def _pax_bomb() -> bytes:
    """One pax record of megabytes: a few KiB of gzip that unpack past the limit before any member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("adapter_config.json")
        info.pax_headers = {"comment": "x" * 3_000_000}
        tf.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def _patched_zip(flag: int, method: int) -> bytes:
    """A zip whose weights member claims encryption or a compression method zipfile cannot read."""
    data = bytearray(_zip({"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}))
    at = data.rfind(b"PK\x01\x02")  # the last member's central directory entry
    data[at + 8 : at + 10] = flag.to_bytes(2, "little")
    data[at + 10 : at + 12] = method.to_bytes(2, "little")
    return bytes(data)


def _without(key: str) -> bytes:
    from safetensors.numpy import load

    tensors = dict(load(WEIGHTS))
    del tensors[key]
    return save(tensors)


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "hostile"
    manifest = {}
    for case, (status, fragment, files, name) in cases().items():
        (target / case).mkdir(parents=True, exist_ok=True)
        for filename, data in files.items():
            safe = filename.replace("/", "%2F")  # stored flat; the upload sends the original name
            (target / case / safe).write_bytes(data)
        manifest[case] = {"status": status, "message": fragment, "name": name, "files": list(files)}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest)} cases in {target}")


if __name__ == "__main__":
    main()
