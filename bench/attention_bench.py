"""The decode rows' attention alone: the native kernel (`worker/csrc/decode_attention.c`) against torch's
attention one row at a time (what a worker runs without it), on the KV pool's two dtypes.

One pass is the attention of `--rows` decode rows over ~`--context` positions each in every layer of the
embedded model (its heads and head size), each layer its own pool: read from memory, as a long row's
step reads it. "from cache" reads one layer's pool every time instead: the same arithmetic without the
memory traffic, so the two lines together say which bounds the kernel on this host. The lines run
interleaved, the median of `--rounds` rounds each.

    python -m bench.attention_bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from bench.common import Row, print_table
from worker.cpu_attention import KV_DTYPES, DecodeAttention, DecodeRows, decode_attention_kernel
from worker.model import prepare_embedded_model

Pools = list[tuple[torch.Tensor, torch.Tensor]]  # each layer's keys and values, [kv_heads, positions, dim]


def torch_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: DecodeRows, scale: float,
               out: torch.Tensor) -> None:
    """What the engine does without the kernel: torch's attention a row at a time over its region, widened
    to the query's dtype."""
    for row, (token, region, length) in enumerate(zip(rows.tokens.tolist(), rows.regions.tolist(),
                                                      rows.lengths.tolist(), strict=True)):
        k, v = (pool[:, region : region + length].unsqueeze(0).to(query.dtype) for pool in (keys, values))
        q = query[:, token : token + 1].unsqueeze(0)  # [1, heads, 1, dim]
        out[row] = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)[0, :, 0]


def random_pools(layers: int, shape: tuple[int, int, int], dtype: torch.dtype, generator: torch.Generator) -> Pools:
    pools = []
    for _ in range(layers):
        keys, values = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
        pools.append((keys, values))
    return pools


def one_pass(attend: Callable[..., None], query: torch.Tensor, pools: Pools, rows: DecodeRows, scale: float,
             cached: bool) -> float:
    """Milliseconds for every layer once (`cached`: the first layer's pool every time)."""
    out = torch.empty(query.shape[1], query.shape[0], query.shape[2])
    started = time.perf_counter()
    for layer in range(len(pools)):
        keys, values = pools[0 if cached else layer]
        attend(query, keys, values, rows, scale, out)
    return (time.perf_counter() - started) * 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--context", type=int, default=1000, help="positions a row attends over (about)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("LORAPLEX_MODELS_DIR", "data/models")))
    args = parser.parse_args()
    if args.rows < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--rows, --rounds and --threads must be at least 1")
    if args.context <= args.rows:
        parser.error("--context must be more than --rows (rows attend over context - rows + 1 to context positions)")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    kernel: DecodeAttention | None = decode_attention_kernel()
    if kernel is None:
        raise SystemExit("the native decode attention kernel is not available here (no C compiler?): nothing to time")
    config = AutoConfig.from_pretrained(prepare_embedded_model(args.models_dir).path)
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    region = args.context + args.rows  # each row's region, rows a few positions apart in length
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(args.rows, heads, dim, generator=generator).transpose(0, 1)  # [heads, tokens, dim]
    rows = DecodeRows.of(list(range(args.rows)), [r * region for r in range(args.rows)],
                         [args.context - args.rows + r for r in range(args.rows)])
    scale = dim**-0.5
    pools = {dtype: random_pools(config.num_hidden_layers, (kv_heads, args.rows * region, dim), dtype, generator)
             for dtype in KV_DTYPES}
    memory, cache, rowwise = "kernel, from memory", "kernel, from cache", "torch, a row at a time"
    lines: dict[tuple[torch.dtype, str], Callable[[], float]] = {}
    for dtype, layers in pools.items():
        lines[(dtype, memory)] = partial(one_pass, kernel.attend, query, layers, rows, scale, False)
        lines[(dtype, cache)] = partial(one_pass, kernel.attend, query, layers, rows, scale, True)
        lines[(dtype, rowwise)] = partial(one_pass, torch_rows, query, layers, rows, scale, False)
    for line in lines.values():  # warm-up: pages touched, code loaded
        line()
    times: dict[tuple[torch.dtype, str], list[float]] = {key: [] for key in lines}
    for _ in range(args.rounds):
        for key, line in lines.items():
            times[key].append(line())
    ms = {key: statistics.median(values) for key, values in times.items()}
    table = []
    for dtype, layers in pools.items():
        name = str(dtype).removeprefix("torch.")
        torch_ms = ms[(dtype, rowwise)]
        mb = sum(t.numel() * t.element_size() for pair in layers for t in pair) * args.context / region / 2**20
        table += [
            Row("A", f"{name}: torch's attention, a row at a time", args.rows, torch_ms, "ms", "1.00"),
            Row("A", f"{name}: kernel, from memory ({mb:.0f} MB a pass)", args.rows, ms[(dtype, memory)], "ms",
                f"{torch_ms / ms[(dtype, memory)]:.2f}x"),
            Row("A", f"{name}: kernel, one layer's pool from cache", args.rows, ms[(dtype, cache)], "ms",
                f"{torch_ms / ms[(dtype, cache)]:.2f}x"),
        ]
    speed = ms[(torch.float32, memory)] / ms[(torch.bfloat16, memory)]
    table.append(Row("A", "bfloat16 pool / float32 pool, kernel from memory (speed)", args.rows, speed, "x",
                     f"{speed:.2f}x"))
    print(f"\nDecode attention of one pass: {config.num_hidden_layers} layers, {heads} heads ({kv_heads} KV) of {dim}, "
          f"{args.rows} rows at ~{args.context} positions, {args.threads} threads; ratio: torch / kernel")
    print_table(table)


if __name__ == "__main__":
    main()
