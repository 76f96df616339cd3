"""The native LoRA kernel's probe (`worker.cpu_lora`): what it computes and how it fills slots, against
torch, on small cases that cover its edges. A kernel that differs is not used (`worker.native.load`).
"""

from __future__ import annotations

import itertools

import torch

from worker.cpu_lora import FILE_DTYPES, INT8, SLOT_DTYPES, WEIGHT_DTYPES, LoraDelta, Scales, quantize_rows


def reference(x: torch.Tensor, slots: torch.Tensor, skip: int, a: torch.Tensor, rank: int, member: int,
              b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What `LoraDelta.add` computes, with torch: y + B[slot] . (A[slot] . x) per routed token."""
    out = y.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot != skip:
            out[t] += (a[slot, :rank, member].float() @ x[t]) @ b[slot, :rank].float()
    return out


def probe_error(kernel: LoraDelta) -> float:
    """Largest difference from torch over the members of a shared input, ranks and widths that are not
    multiples of the kernel's blocks, tokens on one slot (more than a tile's), several and none, for
    float32, bfloat16 and int8 stacks (int8 against torch's sums of the weights times their scales)."""
    generator = torch.Generator().manual_seed(0)
    slot_count, max_rank, members, in_features, out_features, rank = 4, 8, 3, 40, 70, 7
    x = torch.randn(10, in_features, generator=generator)
    slots = torch.tensor([2, slot_count, 0, 2, 3, 1, 2, 2, 2, 2])  # slot 2: more tokens than one tile
    h = torch.empty(len(slots), members, rank)
    error = 0.0
    for dtype in SLOT_DTYPES:
        a = torch.randn(slot_count + 1, max_rank, members, in_features, generator=generator)
        b = torch.randn(slot_count + 1, max_rank, out_features, generator=generator)
        scales, a_values, b_values = None, a.to(dtype), b.to(dtype)
        if dtype == INT8:
            a_q, a_scale = quantize_rows(a.flatten(0, 2))
            b_q, b_scale = quantize_rows(b.flatten(0, 1))
            a_scale, b_scale = a_scale.view(slot_count + 1, max_rank, members), b_scale.view(slot_count + 1, max_rank)
            a, b = a_q.view(a.shape), b_q.view(b.shape)
            a_values, b_values = a.float() * a_scale[..., None], b.float() * b_scale[..., None]
        for member in range(members):
            y = torch.randn(len(slots), out_features, generator=generator)
            expected = reference(x, slots, slot_count, a_values, rank, member, b_values, y)
            if dtype == INT8:
                scales = Scales(a_scale[:, :, member], b_scale)
            kernel.add(x, kernel.tiles(slots.tolist(), slot_count), a.to(dtype), rank, h, member == 0, member,
                       kernel.blocked(b.to(dtype)), y, scales=scales)
            error = max(error, float(((y - expected) / expected.abs().clamp(min=1.0)).abs().max()))
            if not y.isfinite().all():
                return float("inf")
    return error if fill_matches_torch(kernel, generator) else float("inf")


def file_weights(generator: torch.Generator, rank: int, in_features: int, out_features: int,
                 file_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter file's A [rank, in] (rows of magnitudes 1e-9 to 1e3, float16 subnormals in row 0) and
    B [out, rank] in `file_dtype`, for the fill checks to put what is not finite into."""
    a = (torch.randn(rank, in_features, generator=generator) * 10.0 ** torch.randint(-9, 4, (rank, 1),
         generator=generator)).to(file_dtype)
    b = torch.randn(out_features, rank, generator=generator).to(file_dtype)
    a[0, :3] = torch.tensor([6e-8, -1e-7, 0.0]).to(file_dtype)  # float16 subnormals
    return a, b


def fill_matches_torch(kernel: LoraDelta, generator: torch.Generator) -> bool:
    """Whether `LoraDelta.fill` writes what torch's copies write, bit for bit, and counts what is not finite,
    for every file and slot dtype: rounding to nearest even, float16 subnormals, Inf, NaN, a scale's overflow."""
    rank, in_features, out_features, members = 3, 37, kernel.chunk + 29, 2  # a full column block and a part
    for file_dtype, slot_dtype, scale in itertools.product(FILE_DTYPES, WEIGHT_DTYPES, (0.3, 7.0)):
        a, b = file_weights(generator, rank, in_features, out_features, file_dtype)
        b[1, 1], b[2, 2] = float("inf"), float("nan")
        b[3, 0] = torch.finfo(file_dtype).max  # x 7: over float32's reach (and so bfloat16's)
        want_a, want_b = a.to(slot_dtype), (b.T.float() * scale).to(slot_dtype)
        a_stack = torch.zeros(2, rank + 1, members, in_features, dtype=slot_dtype)[:, :, 1]  # rows apart (interleaved)
        b_stack = torch.zeros(2, kernel.blocks(out_features), rank + 1, kernel.chunk, dtype=slot_dtype)
        target = kernel.slot_target(a_stack, b_stack, out_features)
        bad = None if target is None else kernel.fill(target, 1, a, b, scale)
        if bad != int((~want_a.isfinite()).sum() + (~want_b.isfinite()).sum()) or a_stack[0].any() or b_stack[0].any():
            return False
        # the rank past the adapter's and the columns past `out` stay zero
        want_a = torch.cat([want_a, want_a.new_zeros(1, in_features)])
        want_b = kernel.blocked(torch.cat([want_b, want_b.new_zeros(1, out_features)]))
        if not (same_bits(a_stack[1], want_a) and same_bits(b_stack[1], want_b)):
            return False
    return all(int8_fill_matches_torch(kernel, generator, file_dtype) for file_dtype in FILE_DTYPES)


def int8_fill_matches_torch(kernel: LoraDelta, generator: torch.Generator, file_dtype: torch.dtype) -> bool:
    """`fill_matches_torch` for int8 stacks: values and scales as `quantize_rows` gives them bit for bit
    (rows of every magnitude, float16 subnormals, a zero row, a scale's overflow), padding zero, and what
    is not finite counted and left with a scale that is not finite (those rows are refused whatever they
    hold, so only the others' values are compared)."""
    rank, in_features, out_features, members, scale = 4, 37, kernel.chunk + 29, 2, 7.0
    a, b = file_weights(generator, rank, in_features, out_features, file_dtype)
    a[3] = 0.0  # a zero row: scale 0
    b[1, 1], b[2, 1] = float("inf"), float("nan")  # all in rank 1's row: the others are compared
    b[3, 1] = torch.finfo(file_dtype).max  # x 7: over float32's reach
    a_rows, b_rows = a.float(), b.T.float() * scale
    (want_a, want_sa), (want_b, want_sb) = quantize_rows(a_rows), quantize_rows(b_rows)
    a_stack = torch.zeros(2, rank + 1, members, in_features, dtype=INT8)
    b_stack = torch.zeros(2, kernel.blocks(out_features), rank + 1, kernel.chunk, dtype=INT8)
    a_scales, b_scales = torch.zeros(2, rank + 1, members), torch.zeros(2, rank + 1)
    target = kernel.slot_target(a_stack[:, :, 1], b_stack, out_features, Scales(a_scales[:, :, 1], b_scales))
    bad = None if target is None else kernel.fill(target, 1, a, b, scale)
    if bad != int((~a_rows.isfinite()).sum() + (~b_rows.isfinite()).sum()):
        return False
    if a_stack[0].any() or b_stack[0].any() or a_scales[0].any() or b_scales[0].any() or a_stack[:, :, 0].any():
        return False
    got_b = LoraDelta.unblocked(b_stack[1], out_features)
    if got_b[rank].any() or a_stack[1, rank].any() or b_stack[1, ..., out_features % kernel.chunk:][-1].any():
        return False
    ok_a, ok_b = a_rows.isfinite().all(dim=1), b_rows.isfinite().all(dim=1)
    if a_scales[1, :rank, 1][~ok_a].isfinite().any() or b_scales[1, :rank][~ok_b].isfinite().any():
        return False  # a row that is not finite must show in its scale, which is what the slot's check reads
    return (torch.equal(a_stack[1, :rank, 1][ok_a], want_a[ok_a]) and torch.equal(got_b[:rank][ok_b], want_b[ok_b])
            and same_bits(a_scales[1, :rank, 1][ok_a], want_sa[ok_a])
            and same_bits(b_scales[1, :rank][ok_b], want_sb[ok_b]))


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bit for bit, NaN apart (torch writes one of several NaNs, all refused alike)."""
    nan = want.isnan()
    as_int = torch.int16 if want.dtype == torch.bfloat16 else torch.int32
    return torch.equal(got.isnan(), nan) and torch.equal(got.view(as_int)[~nan], want.view(as_int)[~nan])
