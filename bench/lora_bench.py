"""The LoRA part of one decode step alone: the native kernel against torch's matmuls.

Every adapted layer of the embedded model (its real shapes, rank-16 adapters in 16 slots), with
the base layers replaced by zeros, so that only the LoRA arithmetic and its per-layer overhead
are timed. Each line is one decode pass of the embedded model's 210 layers: torch's matmuls, the
native kernel on float32 slots, on bfloat16 slots (half the bytes to read) and on int8 slots (a
quarter, with a float32 scale a rank's row), run interleaved,
the best of `--rounds` medians each. The engine lines (`bench/engine_bench.py`)
show what it comes to in a whole step, where the base layers dominate on some hosts.

    python -m bench.lora_bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import Row, print_table
from worker.cpu_lora import LoraDelta, lora_delta_kernel
from worker.lora import MultiLoraLinear
from worker.lora_model import install_lora_layers
from worker.lora_routing import LoraRouting
from worker.model import prepare_embedded_model

SLOTS, RANK = 16, 16
CASES = {
    "16 rows, one adapter": [0] * 16,
    "16 rows, 16 distinct adapters": list(range(16)),
    "16 rows, 8 adapters x 2": [i % 8 for i in range(16)],
    "8 rows on one adapter, 8 base rows": [0] * 8 + [SLOTS] * 8,
    "1 row": [0],
}


class Zero(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out)


def build(linear_modules: dict[str, list[int]], dtype: torch.dtype,
          kernel: LoraDelta | None) -> tuple[LoraRouting, dict[str, MultiLoraLinear]]:
    model = nn.Module()
    for name, (_, out) in linear_modules.items():
        parent = model
        *path, child = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(child, Zero(out))
    routing = LoraRouting(kernel=kernel)  # before the layers: they lay their B stacks out for it
    layers = install_lora_layers(model, linear_modules, SLOTS, RANK, routing, torch.device("cpu"), dtype)
    generator = torch.Generator().manual_seed(0)
    for layer in layers.values():
        in_features, out = layer.lora_a.shape[-1], layer.out_features
        for slot in range(SLOTS):
            layer.load_slot(slot, torch.randn(RANK, in_features, generator=generator) * in_features**-0.5,
                            torch.randn(out, RANK, generator=generator) * 0.01, 2.0)
    return routing, dict(layers)


def step(layers: dict[str, MultiLoraLinear], inputs: dict[int, torch.Tensor]) -> None:
    """Each layer once, siblings that share an input called with the same tensor, in model order."""
    for name, layer in layers.items():
        layer(inputs[layer.lora_a.shape[-1]] if not name.endswith("o_proj") else inputs[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="passes timed per round and path")
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("LORAPLEX_MODELS_DIR", "data/models")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    kernel = lora_delta_kernel()
    if kernel is None:
        raise SystemExit("the native LoRA kernel is not available here (no C compiler?): nothing to compare")
    linear_modules = prepare_embedded_model(args.models_dir).linear_modules
    paths = {"torch's matmuls": build(linear_modules, torch.float32, None),
             "native kernel": build(linear_modules, torch.float32, kernel),
             "native kernel, bfloat16 slots": build(linear_modules, torch.bfloat16, kernel),
             "native kernel, int8 slots": build(linear_modules, torch.int8, kernel)}
    layers = paths["torch's matmuls"][1]
    rows = []
    for what, slots in CASES.items():
        tokens = len(slots)
        widths = {layer.lora_a.shape[-1] for layer in layers.values()}
        # o_proj reads another tensor than q/k/v: key -1
        inputs = {w: torch.randn(1, tokens, w) for w in widths} | {-1: torch.randn(1, tokens, min(widths))}
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for label, (routing, path_layers) in paths.items():
                routing.route(slots, SLOTS, lambda slot: RANK, torch.device("cpu"))
                step(path_layers, inputs)
                times = []
                for _ in range(args.steps):
                    started = time.perf_counter()
                    step(path_layers, inputs)
                    times.append(time.perf_counter() - started)
                best[label] = min(best.get(label, float("inf")), statistics.median(times))
        torch_time = best["torch's matmuls"]
        for label, took in best.items():
            ratio = f"{torch_time / took:.2f}x" if paths[label][0].kernel is not None else ""
            rows.append(Row("L", f"{what}: {label}", tokens, took * 1000, "ms", ratio))
    print(f"\nLoRA of one decode pass, {len(layers)} layers, rank {RANK}, {args.threads} threads; ratio torch / kernel")
    print_table(rows)


if __name__ == "__main__":
    main()
