"""What every benchmark line shares: prompts, synthetic adapters, timing and the table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save

# Same prompts, in the same order, for every line; a batch of b takes the first b.
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What are the benefits of regular exercise?",
    "Describe how a bicycle works.",
    "Give three tips for learning a new language.",
    "What is the capital of France, and what is it known for?",
    "Summarize the plot of a detective story.",
    "How do plants make their food?",
    "Why do cats purr?",
    "List some uses of copper.",
    "What makes a good cup of coffee?",
    "Describe a busy market in the morning.",
    "How does a rainbow form?",
    "What should I pack for a hiking trip?",
    "Tell me about the history of the printing press.",
    "What is the difference between weather and climate?",
]

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(
    target: Path,
    linear_modules: dict[str, list[int]],
    rank: int,
    targets: tuple[str, ...],
    seed: int,
    dtype: str = "float32",
    draw: Callable[[np.random.Generator, tuple[int, int]], np.ndarray] = lambda rng, shape: rng.standard_normal(shape),
    b_size: float = 0.02,
) -> Path:
    """A PEFT LoRA directory with small random weights: it changes the output a little, as real ones do.
    A is `draw` / sqrt(in), B is `draw` * `b_size` (Gaussian, 0.02 unless given)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (in_f, out_f) in linear_modules.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (draw(rng, (rank, in_f)) / np.sqrt(in_f)).astype(dtype)
        tensors[f"{prefix}.lora_B.weight"] = (draw(rng, (out_f, rank)) * b_size).astype(dtype)
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    (target / "adapter_config.json").write_text(json.dumps(config))
    (target / "adapter_model.safetensors").write_bytes(save(tensors))
    return target


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def p50_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


@dataclass
class Row:
    line: str
    what: str
    batch: int | str
    value: float
    unit: str
    ratio: str = ""
    target: str = ""


def print_table(rows: list[Row]) -> None:
    header = ("line", "what", "batch", "value", "unit", "ratio", "target")
    cells = [header] + [
        (r.line, r.what, str(r.batch), f"{r.value:.1f}", r.unit, r.ratio, r.target) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, cell in enumerate(cells):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(cell, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
