"""Attention of the decode rows on the CPU: one native call per layer for all of them.

torch has no attention kernel for one query token on the CPU: `scaled_dot_product_attention`
per row took ~40 µs a call before any work and ~200 µs a row at 1,100 positions (general
matrix-multiply code sized for bigger problems), 480 calls a step at batch 16 on the embedded
model. `worker/csrc/decode_attention.c` does every decode row of a layer in one call, reading each
key and value once, its rows spread over torch's threads.

The C file is compiled when a worker first needs it (`worker.native`). It is used only if it
computes what torch's attention computes on a probe; without a C compiler, or if the probe
disagrees, the engine keeps torch's attention (logged).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker import native

SOURCE = native.CSRC / "decode_attention.c"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
KV_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel's pools may hold


@dataclass(frozen=True)
class DecodeRows:
    """The decode rows of one pass (one new token each), as the kernel reads them."""

    tokens: torch.Tensor  # [rows] int64: index of the row's token in the pass
    regions: torch.Tensor  # [rows] int64: start of the row's KV region in the pool
    lengths: torch.Tensor  # [rows] int64: positions to attend over, the new one included

    @staticmethod
    def of(tokens: list[int], regions: list[int], lengths: list[int]) -> DecodeRows:
        return DecodeRows(*(torch.tensor(values, dtype=torch.int64) for values in (tokens, regions, lengths)))


class DecodeAttention:
    """The compiled kernel: `attend` writes the rows' attention outputs into `out`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._kernel = library.decode_attention
        self._kernel.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64,
                                 ctypes.c_float, _PTR, ctypes.c_int, ctypes.c_int]
        self._kernel.restype = ctypes.c_int

    def attend(
        self,
        query: torch.Tensor,  # [heads, tokens, head_dim] float32, the pass's queries (any strides, last dim dense)
        keys: torch.Tensor,  # [kv_heads, positions, head_dim] float32 or bfloat16, contiguous: one layer of the pool
        values: torch.Tensor,
        rows: DecodeRows,
        scale: float,
        out: torch.Tensor,  # [tokens, heads, head_dim] float32, contiguous
    ) -> None:
        if query.stride(-1) != 1:
            query = query.contiguous()
        if keys.dtype not in KV_DTYPES or values.dtype != keys.dtype:
            raise TypeError(f"decode attention reads float32 or bfloat16 keys and values, not {keys.dtype}")
        heads, _, dim = query.shape
        failed = self._kernel(
            query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(), keys.shape[1],
            rows.tokens.data_ptr(), rows.regions.data_ptr(), rows.lengths.data_ptr(), len(rows.tokens),
            heads, keys.shape[0], dim, scale, out.data_ptr(), torch.get_num_threads(), keys.dtype == torch.bfloat16,
        )  # fmt: skip
        if failed:
            raise MemoryError("decode attention: no memory for the rows' scores")


@functools.cache
def decode_attention_kernel() -> DecodeAttention | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong."""
    return native.load(SOURCE, DecodeAttention, probe_error, "decode attention", "torch's attention")


def probe_error(kernel: DecodeAttention) -> float:
    """Largest difference from torch's attention over rows of several lengths in a shared pool, float32
    and bfloat16 (against torch's attention over the same bfloat16 values in float32)."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, positions = 6, 2, 64, 64
    keys, values = (torch.randn(kv_heads, positions, dim, generator=generator) for _ in range(2))
    query = torch.randn(3, heads, dim, generator=generator).transpose(0, 1)  # [heads, tokens, dim], token-major
    rows = DecodeRows.of([0, 1, 2], [0, 1, 20], [1, 19, 44])
    error = 0.0
    for dtype in KV_DTYPES:
        pool_keys, pool_values = keys.to(dtype), values.to(dtype)
        out = torch.empty(3, heads, dim)
        kernel.attend(query, pool_keys, pool_values, rows, dim**-0.5, out)
        if not out.isfinite().all():
            return float("inf")
        for row, (region, length) in enumerate(zip(rows.regions.tolist(), rows.lengths.tolist(), strict=True)):
            k, v = (cache[:, region : region + length].unsqueeze(0).float() for cache in (pool_keys, pool_values))
            expected = F.scaled_dot_product_attention(query[:, row : row + 1].unsqueeze(0), k, v, enable_gqa=True)
            error = max(error, float((out[row] - expected[0, :, 0]).abs().max()))
    return error
