"""The base model's 4-bit layers on the CPU, served through a native kernel.

bitsandbytes computes a CPU `Linear4bit` one of two ways. Without AVX512-BF16 each call dequantizes
the whole weight to float32 in torch and multiplies: a batch-16 decode step of the embedded model
rebuilds all 210 weights, ~5 ms a transformer layer on a 2-core AMD Zen 3. With AVX512-BF16 it repacks
the weight on its first call for a fused kernel that rounds the input and the block scales to
bfloat16 (a relative error of ~4e-3 on a layer's output) and was still slower than this kernel on a
2-core Sapphire Rapids Xeon. `worker/csrc/nf4_linear.c` decodes the weight as it multiplies it
with every token of the pass in float32 (passes of up to `MAX_TOKENS` tokens: decode steps): from a copy
laid out in panels of rows side by side where a layer's rows are whole blocks (`Panels`; the embedded
model's are), else from bitsandbytes' bytes a few rows at a time. A larger pass (a prompt chunk), where
one dequantization serves many tokens, gets the whole weight decoded natively and torch's matrix product:
bitsandbytes' portable arithmetic, bit for bit, with a faster dequantization. Training
(gradients) keeps bitsandbytes' layer.

Compiled when a worker first needs it (`worker.native`), used only if it computes what the format
defines on a probe (`reference_weight`, bitsandbytes' portable dequantization); otherwise the layers
keep bitsandbytes' path (logged). Serving only: the worker installs it (`install`) on the model it
serves, before the model's first forward.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker import native

SOURCE = native.CSRC / "nf4_linear.c"
MAX_TOKENS = 96  # a pass of more tokens (a large prompt chunk) decodes the whole weight and multiplies, as bitsandbytes
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# bitsandbytes' `Linear4bit` flag: repack the weight for its fused bfloat16 kernel on a call without gradients
_FUSED = "support_avx512bf16_for_cpu"


@dataclass(frozen=True)
class Panels:
    """A weight laid out for the kernel's panel path: `lanes` rows side by side (the host's vector width), so
    one vector of bytes decodes into those rows' weights for one input each (nf4_linear.c). A copy: the
    4-bit weight's bytes and scales twice in host memory while the kernel serves the layer."""

    bytes: torch.Tensor  # uint8 [panels, in / 2, lanes]: byte k of each of the panel's rows (rows past out: 0)
    scales: torch.Tensor  # float32 [panels, in / blocksize, lanes]: each row's absmax a block


@dataclass(frozen=True)
class PackedWeight:
    """A 4-bit layer's weight as the kernel reads it: bitsandbytes' own packed bytes (two values a byte,
    row-major over [out, in]), float32 absmax a `blocksize` run of the flattened weight (nested
    statistics dequantized once), the 16 values of its code, the float32 bias if any, and the weight in
    panels where the kernel has laid it out (`Nf4Linear.prepare`)."""

    packed: torch.Tensor  # uint8, out * in / 2
    absmax: torch.Tensor  # float32 [out * in / blocksize, rounded up]
    code: torch.Tensor  # float32 [16]
    blocksize: int
    in_features: int
    out_features: int
    bias: torch.Tensor | None
    panels: Panels | None = None

    @staticmethod
    def quantized(packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None,
                  absmax: torch.Tensor | None = None) -> PackedWeight:
        """A weight as bitsandbytes' `quantize_4bit` left it: its packed bytes and quant state (`absmax`: the
        state's own unless given, as for nested statistics, dequantized)."""
        out_features, in_features = (int(size) for size in state.shape)
        return PackedWeight(packed.view(torch.uint8).reshape(-1).contiguous(),
                            (state.absmax if absmax is None else absmax).float().contiguous(),
                            state.code.float().contiguous(), int(state.blocksize), in_features, out_features, bias)

    @staticmethod
    def of(module: nn.Module) -> PackedWeight | None:
        """The weight of a bitsandbytes `Linear4bit` on the CPU that computes in float32, in bitsandbytes'
        own layout; None for any other layer, and for one that bitsandbytes' fused kernel has repacked."""
        import bitsandbytes as bnb

        if not isinstance(module, bnb.nn.Linear4bit):
            return None
        state = getattr(module.weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False) or module.weight.device.type != "cpu":
            return None
        out_features, in_features = (int(size) for size in state.shape)
        if (state.quant_type not in ("nf4", "fp4") or module.compute_dtype not in (None, torch.float32)
                or in_features % 2 or in_features < 2 or state.blocksize % 2 or state.blocksize < 2
                or state.code.numel() != 16):
            return None
        absmax = state.absmax
        if state.nested:
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        weight = PackedWeight.quantized(module.weight.data, state, bias, absmax)
        values = out_features * in_features
        if 2 * weight.packed.numel() < values or weight.absmax.numel() < -(-values // state.blocksize) or (
                bias is not None and bias.numel() != out_features):  # the kernel would read past them
            return None
        return weight


class Nf4Linear:
    """The compiled kernel: `forward` computes a layer's output for a few tokens."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._kernel = library.nf4_linear
        self._kernel.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int]
        self._kernel.restype = ctypes.c_int
        self._dequantize = library.nf4_dequantize
        self._dequantize.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, ctypes.c_int]
        self._dequantize.restype = None
        # a build without the vector lookup (no AVX2, or not GCC 12) has no panels
        self._panels: Any = getattr(library, "nf4_linear_panels", None)
        self.lanes = int(library.nf4_panel_lanes()) if self._panels is not None else 0
        if self._panels is not None:
            self._panels.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64,
                                     ctypes.c_int]
            self._panels.restype = None
            # run(table.address, x, tokens, y, threads): a layer's panels and sizes in its `table`, x and y dense
            self.run: Callable[[int, int, int, int, int], None] = library.nf4_panels_layer
            library.nf4_panels_layer.argtypes = [_PTR, _PTR, _I64, _PTR, ctypes.c_int]
            library.nf4_panels_layer.restype = None

    def prepare(self, weight: PackedWeight) -> PackedWeight:
        """The weight with its panels (`Panels`) where this build has them and its rows are whole blocks (the
        panel path reads one scale a block a row); else the weight as it is, for the row path."""
        if not self.lanes or weight.in_features % weight.blocksize or weight.blocksize % 2:
            return weight  # (an odd block would split a byte between two scales)
        out, pairs, blocks = weight.out_features, weight.in_features // 2, weight.in_features // weight.blocksize
        panels = Panels(native.side_by_side(weight.packed[: out * pairs].view(out, pairs), self.lanes),
                        native.side_by_side(weight.absmax[: out * blocks].view(out, blocks), self.lanes))
        return dataclasses.replace(weight, panels=panels)

    def table(self, weight: PackedWeight) -> native.ArgTable | None:
        """`run`'s arguments for a weight laid out in panels ([bytes, scales, code, blocksize, in, out, bias or
        0]); None for one that is not. The weight must outlive the table."""
        if weight.panels is None or self._panels is None:
            return None
        bias = 0 if weight.bias is None else weight.bias.data_ptr()
        return native.arg_table(weight.panels.bytes.data_ptr(), weight.panels.scales.data_ptr(),
                                weight.code.data_ptr(), weight.blocksize, weight.in_features, weight.out_features, bias)

    def forward(self, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        """x [..., in] float32 on the CPU -> [..., out]: x times the weight transposed, plus the bias."""
        if x.shape[-1] != weight.in_features or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError(f"the kernel takes float32 CPU inputs of {weight.in_features} features, not "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        flat = x.reshape(-1, weight.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = torch.empty(flat.shape[0], weight.out_features)
        bias = None if weight.bias is None else weight.bias.data_ptr()
        if weight.panels is not None and self._panels is not None:
            self._panels(flat.data_ptr(), flat.stride(0), flat.shape[0], weight.panels.bytes.data_ptr(),
                         weight.panels.scales.data_ptr(), weight.code.data_ptr(), weight.blocksize,
                         weight.in_features, weight.out_features, bias, out.data_ptr(), out.stride(0),
                         torch.get_num_threads())
            return out.view(*x.shape[:-1], weight.out_features)
        failed = self._kernel(
            flat.data_ptr(), flat.stride(0), flat.shape[0], weight.packed.data_ptr(), weight.absmax.data_ptr(),
            weight.code.data_ptr(), weight.blocksize, weight.in_features, weight.out_features, bias,
            out.data_ptr(), out.stride(0),
            torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("4-bit linear: no memory for a decoded weight row")
        return out.view(*x.shape[:-1], weight.out_features)

    def dequantize(self, weight: PackedWeight) -> torch.Tensor:
        """The weight [out, in] in float32: `reference_weight`'s values, each of them."""
        dense = torch.empty(weight.out_features, weight.in_features)
        self._dequantize(weight.packed.data_ptr(), weight.absmax.data_ptr(), weight.code.data_ptr(), weight.blocksize,
                         weight.in_features, weight.out_features, dense.data_ptr(), torch.get_num_threads())
        return dense

    def forward_dense(self, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        """What bitsandbytes' layer computes for many tokens, bit for bit: its dequantized weight (here decoded
        natively, faster than its own dequantization) in torch's matrix product."""
        return torch.nn.functional.linear(x, self.dequantize(weight), weight.bias)


def install(model: nn.Module) -> int:
    """Route the model's eligible 4-bit layers (`PackedWeight.of`) through the kernel without gradients
    (`KernelForward`); how many layers it took (0 where none is eligible, or the kernel cannot be had: it
    is compiled only for a model that has such layers). A layer bitsandbytes would repack for its fused
    kernel keeps its weight as it is: an input the kernel hands back to bitsandbytes' layer (gradients, an
    odd shape) takes its portable float32 path."""
    eligible = [(module, weight) for module in model.modules() if (weight := PackedWeight.of(module)) is not None]
    kernel = nf4_linear_kernel() if eligible else None
    if kernel is None:
        return 0
    for module, weight in eligible:
        fused = bool(getattr(module, _FUSED, False))
        _attach(module, KernelForward(kernel, kernel.prepare(weight), module.forward, fused))
    return len(eligible)


def _attach(module: nn.Module, forward: KernelForward) -> None:
    module.forward = forward
    if forward.fused:
        setattr(module, _FUSED, False)


def taken(model: nn.Module) -> list[KernelForward]:
    """The forwards `install` gave the model's layers."""
    forwards = (module.__dict__.get("forward") for module in model.modules())
    return [forward for forward in forwards if isinstance(forward, KernelForward)]


def uninstall(model: nn.Module, fused: bool = True) -> list[tuple[nn.Module, KernelForward]]:
    """Put every layer `install` took back on bitsandbytes' own forward (benchmarks and tests compare the
    two), and say which it took (`reinstall`). `fused`: bitsandbytes may again repack a layer for its fused
    kernel where it would have (AVX512-BF16); otherwise every layer computes in its portable float32 path."""
    removed = []
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, KernelForward):
            del module.forward
            if forward.fused and fused:
                setattr(module, _FUSED, True)
            removed.append((module, forward))
    return removed


def reinstall(removed: list[tuple[nn.Module, KernelForward]]) -> None:
    """Give the layers `uninstall` took back their kernel forwards: their weights as the kernel first read
    them, even where bitsandbytes has repacked a layer since."""
    for module, forward in removed:
        _attach(module, forward)


class KernelForward:
    """A 4-bit layer's forward without gradients: the kernel for a few tokens, its dequantized weight in
    torch's matrix product for more (bitsandbytes' result, bit for bit); with gradients, the layer's own."""

    def __init__(self, kernel: Nf4Linear, weight: PackedWeight, original: Callable[[torch.Tensor], torch.Tensor],
                 fused: bool = False) -> None:
        self.kernel, self.weight, self.original = kernel, weight, original
        self.fused = fused  # bitsandbytes would compute the layer in its fused kernel (AVX512-BF16)
        # A dense input of a layer in panels goes straight to the kernel (`Nf4Linear.run`): `forward`'s checks
        # and 13 ctypes arguments took ~5 us a call more, 210 calls a step. On a 2-core AMD Zen 4 the 210
        # layers at 1 / 4 / 16 tokens took 0.85x / 0.93x / 1.01x the time, and the engine's base rows ran
        # 1.04x / 1.06x / 0.99x the tokens/s at batch 1 / 4 / 16 (5 interleaved rounds).
        self.table = kernel.table(weight)
        self.out_features = weight.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        in_features = self.weight.in_features
        if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() or not x.numel()
                or x.shape[-1] != in_features):  # the last: bitsandbytes' own error
            return self.original(x)
        tokens = x.numel() // in_features
        if tokens > MAX_TOKENS:
            return self.kernel.forward_dense(x, self.weight)
        if self.table is None or not x.is_contiguous():
            return self.kernel.forward(x, self.weight)
        y = x.new_empty((*x.shape[:-1], self.out_features))
        self.kernel.run(self.table.address, x.data_ptr(), tokens, y.data_ptr(), torch.get_num_threads())
        return y


def reference_weight(weight: PackedWeight) -> torch.Tensor:
    """The weight [out, in] in float32 by the format's definition, in torch: each value its code entry
    times its block's absmax (bitsandbytes' portable dequantization; its AVX-512 build has its own
    code table and block indexing, so the probe and the tests do not lean on it)."""
    values = weight.out_features * weight.in_features
    pairs = weight.packed[: (values + 1) // 2].long()
    indices = torch.stack((pairs >> 4, pairs & 15), dim=1).reshape(-1)[:values]
    scales = weight.absmax.repeat_interleave(weight.blocksize)[:values]
    return (weight.code[indices] * scales).reshape(weight.out_features, weight.in_features)


@functools.cache
def nf4_linear_kernel() -> Nf4Linear | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong."""
    return native.load(SOURCE, Nf4Linear, probe_error, "4-bit linear layers", "bitsandbytes' dequantize and matmul")


def probe_error(kernel: Nf4Linear) -> float:
    """Largest difference from the weight by the format's definition (`reference_weight`) and from that
    weight times the input, over NF4 and FP4 weights packed by bitsandbytes whose blocks run across rows,
    with and without a bias, at token counts around the kernel's tiles; in panels too where the kernel
    lays a weight out so (rows of whole blocks, one panel and part of one, and more than one tile)."""
    import bitsandbytes.functional as F

    generator = torch.Generator().manual_seed(0)
    error = 0.0
    for quant_type, (out_features, in_features), blocksize, bias in (
        ("nf4", (24, 96), 64, False), ("fp4", (10, 130), 64, True), ("nf4", (7, 256), 128, True),
        ("fp4", (40, 128), 64, True),
    ):
        dense = torch.randn(out_features, in_features, generator=generator)
        packed, state = F.quantize_4bit(dense, blocksize=blocksize, quant_type=quant_type)
        weight = PackedWeight.quantized(packed, state, torch.randn(out_features, generator=generator) if bias else None)
        reference = reference_weight(weight)
        prepared = kernel.prepare(weight)  # in panels where it can be
        layouts = (weight,) if prepared is weight else (weight, prepared)
        error = max(error, float((kernel.dequantize(weight) - reference).abs().max()))
        for tokens in (1, 3, 4, 9, 13):
            x = torch.randn(tokens, in_features, generator=generator)
            expected = torch.nn.functional.linear(x, reference, weight.bias)
            for layout in layouts:
                got = kernel.forward(x, layout)
                if not got.isfinite().all():
                    return float("inf")
                error = max(error, float((got - expected).abs().max()))
    return error
