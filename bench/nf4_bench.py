"""The base model's 4-bit layers: the native kernel (`worker/csrc/nf4_linear.c`) against bitsandbytes'
own layer as it computes on this CPU: dequantize and multiply in float32, or, with AVX512-BF16, its fused
kernel on a repacked weight in bfloat16 (the table says which). Where the worker's layers do not take the
kernel (no C compiler) this prints why and stops.

Two parts, each the median of `--rounds` interleaved rounds:
- the engine: base rows at batch 1 and 16 (`--new-tokens` each, no adapter) with the worker's layers on
  the kernel and put back on bitsandbytes' forward (`cpu_nf4.uninstall`), tokens/s and their ratio;
- the layers alone: every 4-bit projection of the embedded model once (210 calls, each weight read from
  memory as a decode step reads it) at 1 to 128 tokens, in milliseconds: the kernel, the weight decoded
  natively then torch's matmul (bitsandbytes' arithmetic, what a worker runs above `cpu_nf4.MAX_TOKENS`
  tokens), and bitsandbytes' layer; the kernel both in panels (the embedded model's layers) and on
  bitsandbytes' rows (a layer whose rows are not whole blocks); "(served)" marks what a worker runs at that count.

    python -m bench.nf4_bench
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row, print_table
from bench.engine_bench import engine_run, start_worker
from worker import cpu_nf4
from worker.config import WorkerConfig
from worker.cpu_nf4 import KernelForward
from worker.model import prepare_embedded_model
from worker.runtime import WorkerRuntime

TOKEN_COUNTS = (1, 4, 16, 32, 64, 128, 512)


def engine_lines(model: torch.nn.Module, runtime: WorkerRuntime, new_tokens: int, rounds: int) -> list[Row]:
    assert runtime.loaded is not None
    rows: list[Row] = []
    for batch in (1, 16):
        speeds: dict[str, list[float]] = {"kernel": [], "bitsandbytes": []}
        for round_ in range(rounds + 1):  # the first a warm-up (bitsandbytes' fused kernel repacks the weights)
            for mode, values in speeds.items():
                # bitsandbytes' path as it runs on this CPU, for this run only
                removed = cpu_nf4.uninstall(model) if mode == "bitsandbytes" else []
                seconds = engine_run(runtime.loaded, [None] * batch, new_tokens if round_ else 4)
                cpu_nf4.reinstall(removed)
                if round_:
                    values.append(batch * new_tokens / seconds)
        ratio = statistics.median(k / b for k, b in zip(speeds["kernel"], speeds["bitsandbytes"], strict=True))
        for mode, values in speeds.items():
            rows.append(Row("engine", f"base rows, 4-bit layers on {mode}", batch, statistics.median(values), "tok/s",
                            f"{ratio:.2f}x bitsandbytes" if mode == "kernel" else ""))
    return rows


LAYER_MODES = ("kernel", "kernel, row tiles", "dequantize + matmul", "bitsandbytes")


def run_layer(layer: KernelForward, mode: str, x: torch.Tensor, rows_only: cpu_nf4.PackedWeight) -> None:
    if mode == "kernel":
        layer.kernel.forward(x, layer.weight)
    elif mode == "kernel, row tiles":
        layer.kernel.forward(x, rows_only)
    elif mode == "bitsandbytes":
        layer.original(x)
    else:
        layer.kernel.forward_dense(x, layer.weight)


def layer_lines(layers: list[KernelForward], rounds: int) -> list[Row]:
    """Milliseconds for all `layers` once at each token count: the kernel (in panels where the worker laid the
    weights out so), the kernel on bitsandbytes' rows (the path for rows that are not whole blocks), the weight
    decoded natively in torch's matmul (what a worker runs above `MAX_TOKENS`), and the layer's own forward
    (`original`: bitsandbytes' path on this CPU once the layers are uninstalled)."""
    generator = torch.Generator().manual_seed(0)
    times: dict[tuple[int, str], list[float]] = {}
    rows_only = [dataclasses.replace(layer.weight, panels=None) for layer in layers]
    with torch.inference_mode():
        for layer in layers:  # bitsandbytes' fused kernel repacks a weight on its first call: not timed
            layer.original(torch.zeros(1, layer.weight.in_features))
        for _ in range(rounds):
            for tokens in TOKEN_COUNTS:
                inputs = {width: torch.randn(tokens, width, generator=generator)
                          for width in {layer.weight.in_features for layer in layers}}
                for mode in LAYER_MODES:
                    started = time.perf_counter()
                    for layer, rows_weight in zip(layers, rows_only, strict=True):
                        run_layer(layer, mode, inputs[layer.weight.in_features], rows_weight)
                    times.setdefault((tokens, mode), []).append((time.perf_counter() - started) * 1000)
    rows = []
    for tokens in TOKEN_COUNTS:
        medians = {mode: statistics.median(times[tokens, mode]) for mode in LAYER_MODES}
        served = "kernel" if tokens <= cpu_nf4.MAX_TOKENS else "dequantize + matmul"
        for mode, value in medians.items():
            what = f"{len(layers)} projections, {mode}{' (served)' if mode == served else ''}"
            ratio = "" if mode == "bitsandbytes" else f"{medians['bitsandbytes'] / value:.2f}x faster"
            rows.append(Row("layers", what, tokens, value, "ms", ratio))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per line; each line's value is their median")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per row in the engine lines")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("LORAPLEX_DATA_DIR", "data")) / "models")
    args = parser.parse_args()
    if args.rounds < 1 or args.new_tokens < 1 or args.threads < 1:
        parser.error("--rounds, --new-tokens and --threads must be at least 1")
    prepared = prepare_embedded_model(args.models_dir)
    with tempfile.TemporaryDirectory() as work:
        # The engine first, on its own thread, before this thread runs any torch op (see start_worker).
        runtime = start_worker(WorkerConfig(model_path=prepared.path, model_name=prepared.name,
                                            blob_url=str(Path(work) / "blobs"), device="cpu",
                                            torch_threads=args.threads, max_batch_size=16))
        assert runtime.loaded is not None
        model = runtime.loaded.engine.runner.model
        layers = cpu_nf4.taken(model)
        if not layers:
            print("No 4-bit layer takes the native kernel on this host: it could not be built (see the worker's log).")
            runtime.stop()
            return
        rows = engine_lines(model, runtime, args.new_tokens, args.rounds)
        runtime.stop()  # its thread's OpenMP team goes with it: one team in the process, as in a worker
        torch.set_num_threads(args.threads)
        cpu_nf4.uninstall(model)
        rows += layer_lines(layers, args.rounds)
    path = ("its fused bfloat16 kernel (AVX512-BF16)" if any(layer.fused for layer in layers)
            else "dequantize and multiply in float32")
    print(f"\n4-bit layers, native kernel against bitsandbytes ({path}; {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds)\n")
    print_table(rows)


if __name__ == "__main__":
    main()
