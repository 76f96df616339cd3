"""The output projection alone (the head: the embedded model's 49152 x 576): the worker's heads side by
side, each the median of `--rounds` interleaved rounds, the caches flushed before each call (a decode step
reads every other layer between two heads), in milliseconds at 1 to 64 tokens:
- float32, torch's dense product;
- float32 packed for oneDNN (`worker.model.PackedHead`: a head in neither narrow form);
- int8 values and scales (`worker.cpu_head.Q8Head`): the embedded model's own head, which is in that form;
- bfloat16 values (`worker.cpu_head.Bf16Head`): the same head rounded to bfloat16, as the head of a
  bfloat16 checkpoint loaded in float32 is (the same shape and arithmetic, other values).
Ratios against the packed float32 head. Where the native kernel cannot be built this prints why and stops.

    python -m bench.head_bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from bench.common import Row, print_table
from worker.cpu_head import Bf16Head, Q8Head, bf16_form, head_kernel, q8_form
from worker.model import PackedHead, prepare_embedded_model

TOKEN_COUNTS = (1, 4, 16, 64)
FLUSH_MB = 128  # written before each call: more than any host's last-level cache we run on


def embedded_head(models_dir: Path) -> torch.Tensor:
    """The embedded model's head: its token embedding (tied), float32 as the worker loads it."""
    checkpoint = prepare_embedded_model(models_dir).path / "model.safetensors"
    with safe_open(str(checkpoint), "pt") as tensors:
        return tensors.get_tensor("model.embed_tokens.weight").float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="rounds per line; each line's value is their median")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("LORAPLEX_DATA_DIR", "data")) / "models")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    kernel = head_kernel()
    if kernel is None:
        print("The head kernel could not be built on this host (see the log): heads stay on oneDNN's packed one.")
        return
    weight = embedded_head(args.models_dir)
    q8, bf16 = q8_form(weight), bf16_form(weight.bfloat16().float())
    if q8 is None or bf16 is None:
        print("The embedded model's head is not in the int8 form: this bench measures that head.")
        return
    heads: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
        "float32, dense": (lambda x: torch.nn.functional.linear(x, weight), 4 * weight.numel()),
        "float32, packed for oneDNN": (PackedHead(weight), 4 * weight.numel()),
        "int8 values and scales": (Q8Head(kernel, *q8), q8[0].numel() + 4 * q8[1].numel()),
        "bfloat16 values": (Bf16Head(kernel, bf16), 2 * bf16.numel()),
    }
    flush = torch.empty(FLUSH_MB * 2**20, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):  # the first a warm-up, not timed
            for tokens in TOKEN_COUNTS:
                x = torch.randn(tokens, weight.shape[1], generator=generator)
                for name, (head, _) in heads.items():
                    flush.fill_(round_)
                    started = time.perf_counter()
                    head(x)
                    if round_:
                        times.setdefault((tokens, name), []).append((time.perf_counter() - started) * 1000)
    rows = []
    for tokens in TOKEN_COUNTS:
        packed = statistics.median(times[tokens, "float32, packed for oneDNN"])
        for name, (_, size) in heads.items():
            value = statistics.median(times[tokens, name])
            rows.append(Row("head", f"{name} ({size / 2**20:.0f} MB)", tokens, value, "ms",
                            f"{packed / value:.2f}x packed float32"))
    print(f"\nThe output projection, {weight.shape[0]} x {weight.shape[1]} ({args.threads} threads, kernel lanes "
          f"{kernel.lanes}, median of {args.rounds} interleaved rounds, caches flushed before each call)\n")
    print_table(rows)


if __name__ == "__main__":
    main()
