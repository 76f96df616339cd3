"""The native decode attention: what torch's attention gives, for any row, head layout and length."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker import cpu_attention, native
from worker.cpu_attention import DecodeAttention, DecodeRows, decode_attention_kernel
from worker.kvcache import KVPool, PassPlan, Segment, rows_attention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the engine keeps torch's attention")


@pytest.fixture(scope="module")
def kernel() -> DecodeAttention:
    built = decode_attention_kernel()
    assert built is not None, "a host with a C compiler builds the kernel"
    return built


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: DecodeRows,
              scale: float) -> torch.Tensor:
    """torch's attention, one row at a time: [rows, heads, dim]."""
    out = []
    for token, region, length in zip(rows.tokens.tolist(), rows.regions.tolist(), rows.lengths.tolist(), strict=True):
        k, v = (cache[:, region : region + length].unsqueeze(0) for cache in (keys, values))
        q = query[:, token : token + 1].unsqueeze(0)
        out.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 2), (6, 1)])
@pytest.mark.parametrize("dim", [64, 128, 80, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_gives_torchs_attention(kernel: DecodeAttention, heads: int, kv_heads: int, dim: int,
                                           threads: int) -> None:
    generator = torch.Generator().manual_seed(heads * dim)
    lengths = [1, 2, 15, 16, 17, 300]
    regions = [0, 5, 30, 50, 70, 400]  # rows' regions in one pool, some overlapping others' tails
    keys, values = (torch.randn(kv_heads, 800, dim, generator=generator) for _ in range(2))
    query = torch.randn(len(lengths) + 2, heads, dim, generator=generator).transpose(0, 1)  # token-major, as the model
    rows = DecodeRows.of([7, 0, 3, 1, 6, 2], regions, lengths)  # tokens in any order; 4 and 5 are other rows'
    out = torch.full((len(lengths) + 2, heads, dim), float("nan"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel.attend(query, keys, values, rows, dim**-0.5, out)
    finally:
        torch.set_num_threads(previous)
    expected = reference(query, keys, values, rows, dim**-0.5)
    torch.testing.assert_close(out[rows.tokens], expected, rtol=1e-4, atol=1e-5)
    assert out[[4, 5]].isnan().all(), "positions of tokens that are not decode rows are left alone"


def test_a_head_major_query_and_large_scores(kernel: DecodeAttention) -> None:
    """Scores in the thousands (softmax must subtract the maximum) and a query laid out head by head."""
    generator = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(2, 600, 64, generator=generator) * 30 for _ in range(2))
    query = torch.randn(4, 3, 64, generator=generator) * 30  # [heads, tokens, dim], contiguous
    rows = DecodeRows.of([0, 1, 2], [0, 100, 1], [600, 500, 7])
    out = torch.empty(3, 4, 64)
    kernel.attend(query, keys, values, rows, 0.125, out)
    assert out.isfinite().all()
    torch.testing.assert_close(out, reference(query, keys, values, rows, 0.125), rtol=1e-4, atol=1e-3)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: DecodeAttention) -> None:
    generator = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(3, 2000, 64, generator=generator) for _ in range(2))
    query = torch.randn(16, 9, 64, generator=generator).transpose(0, 1)
    batch = DecodeRows.of(list(range(16)), [i * 120 for i in range(16)], [100 + 7 * i for i in range(16)])
    together = torch.empty(16, 9, 64)
    kernel.attend(query, keys, values, batch, 0.125, together)
    alone = torch.empty(16, 9, 64)
    kernel.attend(query, keys, values, DecodeRows.of([5], [5 * 120], [135]), 0.125, alone)
    assert torch.equal(alone[5], together[5])


class Layer(torch.nn.Module):
    layer_idx = 0


def mixed_pass(seed: int) -> tuple[Any, list[Segment], torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A pass of decode rows, a whole prompt and a later prompt chunk, as the engine plans one: the model's
    config, the segments, the pass's query, new keys and values, and the pool's keys and values before it."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    generator = torch.Generator().manual_seed(seed)
    segments = [Segment(0, 1, 0, 40), Segment(1, 12, 100, 0), Segment(13, 1, 200, 0), Segment(14, 5, 300, 9)]
    tokens = 19
    query = torch.randn(1, 4, tokens, 32, generator=generator)
    key, value = (torch.randn(1, 2, tokens, 32, generator=generator) for _ in range(2))
    history = [torch.randn(2, 400, 32, generator=generator) for _ in range(2)]
    return config, segments, query, key, value, history


def test_rows_attention_with_the_kernel_equals_it_without(kernel: DecodeAttention) -> None:
    """A pass of decode rows, a whole prompt and a later prompt chunk, as the engine plans one."""
    config, segments, query, key, value, history = mixed_pass(3)
    outs = []
    for with_kernel in (kernel, None):
        pool = KVPool(config, 400, torch.float32, torch.device("cpu"), with_kernel)
        for cache, past in zip((pool.keys[0], pool.values[0]), history, strict=True):
            cache.copy_(past)
        plan = PassPlan.build(pool, segments, torch.device("cpu"))
        assert (plan.decode is not None) == (with_kernel is not None)
        outs.append(rows_attention(Layer(), query, key, value, None, kv_plan=plan)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_without_a_working_compiler_or_with_a_wrong_kernel_the_engine_keeps_torchs_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decode_attention_kernel.cache_clear()
    try:
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
        assert decode_attention_kernel() is None
        monkeypatch.undo()
        decode_attention_kernel.cache_clear()
        monkeypatch.setattr(cpu_attention, "probe_error", lambda kernel: 0.5)
        assert decode_attention_kernel() is None
        monkeypatch.undo()
        decode_attention_kernel.cache_clear()

        def hung(*args: object, **kwargs: object) -> None:
            raise subprocess.TimeoutExpired("cc", 120)

        monkeypatch.setattr(native.subprocess, "run", hung)
        assert decode_attention_kernel() is None
        monkeypatch.undo()
        decode_attention_kernel.cache_clear()
        monkeypatch.setattr(cpu_attention, "SOURCE", cpu_attention.SOURCE.with_name("missing.c"))
        assert decode_attention_kernel() is None
    finally:
        monkeypatch.undo()
        decode_attention_kernel.cache_clear()
    assert decode_attention_kernel() is not None


def test_the_kernel_reads_float32_and_bfloat16_pools_under_a_float32_model_only(kernel: DecodeAttention) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1)
    cpu = torch.device("cpu")
    for dtype, compute in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        pool = KVPool(config, 16, dtype, cpu, kernel, compute)
        assert pool.decode_kernel is None
        assert PassPlan.build(pool, [Segment(0, 1, 0, 3)], cpu).decode is None
    for dtype in (torch.float32, torch.bfloat16):
        pool = KVPool(config, 16, dtype, cpu, kernel, torch.float32)
        assert pool.decode_kernel is kernel
        assert PassPlan.build(pool, [Segment(0, 1, 0, 3)], cpu).decode is not None
    with pytest.raises(TypeError, match="float32 or bfloat16 keys"):
        half = torch.zeros(1, 4, 64, dtype=torch.float16)
        kernel.attend(torch.zeros(2, 1, 64), half, half, DecodeRows.of([0], [0], [1]), 0.125, torch.empty(1, 2, 64))


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (6, 1)])
@pytest.mark.parametrize("dim", [64, 128, 40])
def test_bfloat16_pools_give_torchs_attention_over_the_same_rounded_values(kernel: DecodeAttention, heads: int,
                                                                           kv_heads: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(heads + dim)
    lengths, regions = [1, 15, 17, 300], [0, 30, 50, 400]
    keys, values = (torch.randn(kv_heads, 800, dim, generator=generator).to(torch.bfloat16) for _ in range(2))
    query = torch.randn(len(lengths), heads, dim, generator=generator).transpose(0, 1)
    rows = DecodeRows.of([2, 0, 3, 1], regions, lengths)
    out = torch.empty(len(lengths), heads, dim)
    kernel.attend(query, keys, values, rows, dim**-0.5, out)
    expected = reference(query, keys.float(), values.float(), rows, dim**-0.5)  # the stored values, widened
    torch.testing.assert_close(out[rows.tokens], expected, rtol=1e-4, atol=1e-5)
    # and one row alone gives the very bits it gives beside the others
    alone = torch.empty(len(lengths), heads, dim)
    kernel.attend(query, keys, values, DecodeRows.of([1], [400], [300]), dim**-0.5, alone)  # token 1's row
    assert torch.equal(alone[1], out[1])


def test_a_bfloat16_pool_rounds_each_key_once_and_every_path_attends_the_stored_values(kernel: DecodeAttention) -> None:
    """A pass of decode rows, a whole prompt and a later prompt chunk over a bfloat16 pool under a float32
    model: the new keys and values are stored rounded, the kernel and torch's attention (which widens the
    rows' regions) agree, and both equal a float32 pool that holds the same rounded values."""
    config, segments, query, key, value, history = mixed_pass(4)
    history = [past.to(torch.bfloat16) for past in history]
    outs = []
    cpu = torch.device("cpu")
    for dtype, with_kernel, new in ((torch.bfloat16, kernel, (key, value)), (torch.bfloat16, None, (key, value)),
                                    (torch.float32, None, (key.bfloat16().float(), value.bfloat16().float()))):
        pool = KVPool(config, 400, dtype, cpu, with_kernel, torch.float32)
        for cache, past in zip((pool.keys[0], pool.values[0]), history, strict=True):
            cache.copy_(past)
        plan = PassPlan.build(pool, segments, cpu)
        out = rows_attention(Layer(), query, *new, None, kv_plan=plan)[0]
        assert out.dtype == torch.float32
        if dtype == torch.bfloat16:
            assert torch.equal(pool.keys[0][:, plan.slots], key[0].bfloat16())  # rounded once, as written
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[2], rtol=1e-4, atol=1e-5)
