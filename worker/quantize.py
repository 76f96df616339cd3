"""Offline GPTQ/AWQ quantization of a base checkpoint with GPTQModel, and its quality report.

Run as a child process of the job runner (`python -m worker.quantize SPEC.json SOURCE OUT_DIR`),
so that cancelling a job is killing a process and a crash never takes the runner with it; the
runner sets its threads (`OMP_NUM_THREADS`, `GPTQMODEL_CPU_WORKERS`). It writes the quantized
checkpoint and `loraplex_report.json` into OUT_DIR; progress goes to stdout as
`PROGRESS <stage> <done> <total>` lines, which the runner records.
"""

from __future__ import annotations

import json
import math
import resource
import time
from importlib import resources
from pathlib import Path
from typing import Any

from worker.job_child import deliver, progress, run_and_exit
from worker.model import load_quantized
from worker.quantize_spec import InvalidJob, QuantizeSpec

PROBE_PROMPT = "Which ocean is the largest?"
PROBE_TOKENS = 32


def builtin_text(name: str) -> str:
    return resources.files("worker").joinpath("data", name).read_text(encoding="utf-8")


def calibration_windows(token_ids: list[int], samples: int, seq_len: int) -> list[list[int]]:
    """`samples` windows of `seq_len` tokens spread evenly over the text (overlapping if it is short)."""
    if len(token_ids) < seq_len:
        raise InvalidJob(f"the calibration text has {len(token_ids)} tokens; calibration_seq_len is {seq_len}")
    last = len(token_ids) - seq_len
    starts = [round(i * last / max(samples - 1, 1)) for i in range(samples)]
    return [token_ids[s:s + seq_len] for s in starts]


def quantize(spec: QuantizeSpec, source: Path, out: Path) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD
    from transformers import AutoTokenizer

    progress("calibrating", 0, 1)
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = spec.calibration_text or builtin_text("calibration.txt")
    windows = calibration_windows(tokenizer(text)["input_ids"], spec.calibration_samples, spec.calibration_seq_len)
    calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    if spec.method == "awq":
        config = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                                method=METHOD.AWQ, format=FORMAT.GEMM)
        backend = BACKEND.AWQ_TORCH  # the one AWQ kernel that runs without CUDA
    else:
        config = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
        backend = BACKEND.AUTO
    model = GPTQModel.load(str(source), config, device="cpu")
    progress("quantizing", 0, model.model.config.num_hidden_layers)
    model.quantize(calibration, batch_size=4, backend=backend)
    progress("saving", 0, 1)
    model.save(str(out))
    tokenizer.save_pretrained(str(out))


def perplexity(model: Any, tokenizer: Any, text: str, window: int = 512) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            nll += float(loss)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def probe(model: Any, tokenizer: Any) -> str:
    import torch

    messages = [{"role": "user", "content": PROBE_PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=PROBE_TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quality_report(source: Path, result: Path, started: float) -> dict[str, Any]:
    """Perplexity on the held-out text, sizes, probe answers: source against result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("evaluating", 0, 2)
    heldout = builtin_text("heldout.txt")
    tokenizer = AutoTokenizer.from_pretrained(source)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    before = {"perplexity": perplexity(original, tokenizer, heldout), "probe_answer": probe(original, tokenizer)}
    del original
    progress("evaluating", 1, 2)
    quantized = load_quantized(result).eval()
    after = {"perplexity": perplexity(quantized, tokenizer, heldout), "probe_answer": probe(quantized, tokenizer)}
    progress("evaluating", 2, 2)
    return {
        "heldout_text": "worker/data/heldout.txt",
        "probe_prompt": PROBE_PROMPT,
        "source": {**before, "size_bytes": dir_bytes(source)},
        "result": {**after, "size_bytes": dir_bytes(result)},
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "duration_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str]) -> int:
    spec_path, source, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    spec = QuantizeSpec(**json.loads(spec_path.read_text()))
    started = time.monotonic()
    quantize(spec, source, out)
    return deliver(quality_report(source, out, started), out / "loraplex_report.json")


if __name__ == "__main__":
    run_and_exit(main)
