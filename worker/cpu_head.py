"""The output projection on the CPU from a narrower exact form of its float32 weight.

A batch-1 decode step's largest read is the float32 head: 49152 x 576 values, 113 MB on the embedded
model, against ~60 MB for its 4-bit layers. Two forms give every float32 value back exactly, checked
value for value at start:
- `q8_form`: an int8 times one float32 scale every 32 values of a row. The embedded model's head (tied
  to the token embedding, converted from a GGUF that stores it as Q8_0) is; ~32 MB.
- `bf16_form`: bfloat16 values. The head of a bfloat16 checkpoint loaded in float32 (most published
  models) is; half the bytes.
`worker/csrc/head.c` reads the form, decodes it to the same float32 weights and multiplies, each (token,
output) sum over the inputs in order. Another head (neither form, not float32, with a bias) keeps oneDNN's
packed head (`worker.model.pack_output_head`).

Compiled when a worker first needs it (`worker.native`), used only if it gives torch's product on a
probe. Serving only: nothing trains the head.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from worker import native

SOURCE = native.CSRC / "head.c"
BLOCK = 32  # int8 values a scale
ROWS_AT_ONCE = 4096  # rows a form's check takes at a time
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def q8_form(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values int8 [out, in], scales float32 [out, in / 32]) whose products are `weight`'s float32 values,
    each of them; None where a row's width is not whole runs or any run is not an int8 times its scale (the
    scale: the run's largest magnitude / 127)."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or not weight.numel():
        return None
    out, width = weight.shape
    values = torch.empty(out, width, dtype=torch.int8)
    scales = torch.empty(out, width // BLOCK)
    for first in range(0, out, ROWS_AT_ONCE):  # bounded temporaries; most heads fail on the first rows
        runs = weight[first : first + ROWS_AT_ONCE].detach().reshape(-1, width // BLOCK, BLOCK)
        scale = runs.abs().amax(2, keepdim=True) / 127
        if not scale.isfinite().all():
            return None
        steps = torch.where(scale > 0, runs / torch.where(scale > 0, scale, 1.0), 0.0).round()
        if steps.abs().max() > 127 or not torch.equal(steps * scale, runs):
            return None
        values[first : first + ROWS_AT_ONCE] = steps.reshape(-1, width).to(torch.int8)
        scales[first : first + ROWS_AT_ONCE] = scale.reshape(-1, width // BLOCK)
    return values, scales


def bf16_form(weight: torch.Tensor) -> torch.Tensor | None:
    """bfloat16 values [out, in] equal to `weight`'s float32 values, each of them; None where one is not
    (more than bfloat16's 8 bits of mantissa, or not finite)."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or not weight.numel():
        return None
    values = torch.empty(weight.shape, dtype=torch.bfloat16)
    for first in range(0, weight.shape[0], ROWS_AT_ONCE):
        rows = weight[first : first + ROWS_AT_ONCE].detach()
        narrow = rows.to(torch.bfloat16)
        if not rows.isfinite().all() or not torch.equal(narrow.float(), rows):
            return None
        values[first : first + ROWS_AT_ONCE] = narrow
    return values


class HeadKernel:
    """The compiled kernel: `q8` and `bf16` multiply tokens by a head in that form laid out in panels (`lay_out`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._q8, self._bf16 = library.q8_head, library.bf16_head
        self._q8.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int]
        self._bf16.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int]
        self._q8.restype = self._bf16.restype = None
        self.lanes = int(library.head_lanes())

    def lay_out(self, matrix: torch.Tensor) -> torch.Tensor:
        """A form's values [out, in] (or int8 scales [out, in / 32]) in panels of `lanes` rows side by side
        (rows past the last padded with zeros): [panels, in, lanes]."""
        return native.side_by_side(matrix, self.lanes)

    def q8(self, x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
        """x [..., in] float32 on the CPU -> [..., out]: x times the int8 form's weight transposed."""
        flat, y = self._operands(x, values.shape[1], out_features)
        self._q8(flat.data_ptr(), flat.stride(0), flat.shape[0], values.data_ptr(), scales.data_ptr(),
                 values.shape[1], out_features, y.data_ptr(), y.stride(0), torch.get_num_threads())
        return y.view(*x.shape[:-1], out_features)

    def bf16(self, x: torch.Tensor, values: torch.Tensor, out_features: int) -> torch.Tensor:
        """x [..., in] float32 on the CPU -> [..., out]: x times the bfloat16 form's weight transposed."""
        flat, y = self._operands(x, values.shape[1], out_features)
        self._bf16(flat.data_ptr(), flat.stride(0), flat.shape[0], values.data_ptr(), values.shape[1],
                   out_features, y.data_ptr(), y.stride(0), torch.get_num_threads())
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def _operands(x: torch.Tensor, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x as rows with unit stride, and the output to write."""
        if x.shape[-1] != in_features or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError(f"the head kernel takes float32 CPU inputs of {in_features} features, not "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        flat = x.reshape(-1, in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        return flat, torch.empty(flat.shape[0], out_features)


class PanelHead(nn.Module):
    """The output projection from a narrower exact form of its weight, laid out for the kernel; no float32
    copy of its own. An input the kernel does not take (not float32, gradients) gets the weight decoded."""

    form = ""  # what the log line calls it

    def __init__(self, kernel: HeadKernel, out_features: int, in_features: int) -> None:
        super().__init__()
        self.kernel, self.out_features, self.in_features = kernel, out_features, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_cpu or torch.is_grad_enabled() or x.shape[-1] != self.in_features:
            return torch.nn.functional.linear(x, self.weight().to(x))
        return self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        """The float32 weight [out, in] the form stands for."""
        raise NotImplementedError

    def _rows(self, panels: torch.Tensor) -> torch.Tensor:
        """Panels [panels, k, lanes] back as the rows [out, k] they hold."""
        return panels.transpose(1, 2).reshape(-1, panels.shape[1])[: self.out_features]


class Q8Head(PanelHead):
    """The head from its int8 values and scales (`q8_form`)."""

    form = "int8 values and scales"

    def __init__(self, kernel: HeadKernel, values: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__(kernel, *values.shape)
        self.values, self.scales = kernel.lay_out(values), kernel.lay_out(scales)  # not Parameters

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.q8(x, self.values, self.scales, self.out_features)

    def weight(self) -> torch.Tensor:
        values, scales = self._rows(self.values).float(), self._rows(self.scales)
        return (values.view(self.out_features, -1, BLOCK) * scales[..., None]).view(self.out_features, -1)


class Bf16Head(PanelHead):
    """The head from its bfloat16 values (`bf16_form`)."""

    form = "bfloat16 values"

    def __init__(self, kernel: HeadKernel, values: torch.Tensor) -> None:
        super().__init__(kernel, *values.shape)
        self.values = kernel.lay_out(values)  # not a Parameter

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.bf16(x, self.values, self.out_features)

    def weight(self) -> torch.Tensor:
        return self._rows(self.values).float()


def panel_form(weight: torch.Tensor) -> Callable[[HeadKernel], PanelHead] | None:
    """What makes the head from `weight`'s narrowest exact form (`q8_form`, then `bf16_form`); None where
    it is in neither."""
    if (q8 := q8_form(weight)) is not None:
        return lambda kernel: Q8Head(kernel, *q8)
    if (bf16 := bf16_form(weight)) is not None:
        return lambda kernel: Bf16Head(kernel, bf16)
    return None


def install_panel_head(model: Any) -> PanelHead | None:
    """Replace a float32 CPU output projection without bias whose weight is in one of the forms
    (`panel_form`) by that form's head, where the kernel builds and passes its probe; the new head, or None."""
    head = model.get_output_embeddings()
    if (not isinstance(head, nn.Linear) or head.bias is not None or head.weight.device.type != "cpu"
            or (make := panel_form(head.weight)) is None or (kernel := head_kernel()) is None):
        return None
    panel_head = make(kernel)
    model.set_output_embeddings(panel_head)
    return panel_head


@functools.cache
def head_kernel() -> HeadKernel | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong."""
    return native.load(SOURCE, HeadKernel, probe_error, "the output projection's narrow forms",
                       "oneDNN's packed float32 head")


def probe_error(kernel: HeadKernel) -> float:
    """Largest difference from torch's product with the float32 weight, over weights in each form (a zero
    run among the int8 ones; a width of no whole runs among the bfloat16 ones) of one panel and part of one
    and of several, at token counts around the tiles."""
    generator = torch.Generator().manual_seed(0)
    error = 0.0
    for out_features, in_features in ((7, 32), (40, 96), (70, 64)):
        steps = torch.randint(-127, 128, (out_features, in_features // BLOCK, BLOCK), generator=generator)
        steps[..., 5] = -127  # each run's largest magnitude, as Q8_0 scales it
        # float16 scales, as a Q8_0 tensor stores them: a run's largest magnitude / 127 gives them back exactly
        scales = (torch.rand(out_features, in_features // BLOCK, 1, generator=generator) / 127).half().float()
        scales[0, 0] = 0.0
        q8_weight = (steps.float() * scales).reshape(out_features, in_features)
        bf16_weight = torch.randn(out_features, in_features + 13, generator=generator).bfloat16().float()
        q8, bf16 = q8_form(q8_weight), bf16_form(bf16_weight)
        if q8 is None or bf16 is None:
            return float("inf")
        q8_head = Q8Head(kernel, *q8)
        bf16_head = Bf16Head(kernel, bf16)
        for tokens in (1, 3, 12, 13, 25):
            for head, weight in ((q8_head, q8_weight), (bf16_head, bf16_weight)):
                x = torch.randn(tokens, weight.shape[1], generator=generator)
                got = head.product(x)
                if not got.isfinite().all():
                    return float("inf")
                error = max(error, float((got - torch.nn.functional.linear(x, weight)).abs().max()))
    return error
