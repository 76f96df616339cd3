"""The output projection on the CPU from int8 values, where its weight is exactly int8 times a scale a run.

A batch-1 decode step's largest read is the float32 head: 49152 x 576 values, 113 MB on the embedded
model, against ~60 MB for its 4-bit layers. That head (tied to the token embedding, converted from a
GGUF that stores it as Q8_0) is exactly an int8 times one float32 scale every 32 values of a row, which
`q8_form` checks value for value. `worker/csrc/q8_head.c` reads those int8 values and scales (~32 MB),
decodes them to the same float32 weights and multiplies, each (token, output) sum over the inputs in
order. Another head (not in that form, not float32, with a bias) keeps oneDNN's packed head
(`worker.model.pack_output_head`).

Compiled when a worker first needs it (`worker.native`), used only if it gives torch's product on a
probe. Serving only: nothing trains the head.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch
from torch import nn

from worker import native

SOURCE = native.CSRC / "q8_head.c"
BLOCK = 32  # values a scale
ROWS_AT_ONCE = 4096  # rows `q8_form` checks at a time
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


class Q8Kernel:
    """The compiled kernel: `forward` multiplies tokens by a head laid out in panels (`lay_out`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._kernel = library.q8_head
        self._kernel.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, ctypes.c_int]
        self._kernel.restype = None
        self.lanes = int(library.q8_head_lanes())

    def lay_out(self, values: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`q8_form`'s values and scales in panels of `lanes` rows side by side (rows past the last padded
        with zeros): [panels, in, lanes] and [panels, in / 32, lanes]."""
        return native.side_by_side(values, self.lanes), native.side_by_side(scales, self.lanes)

    def forward(self, x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
        """x [..., in] float32 on the CPU -> [..., out]: x times the weight transposed."""
        in_features = values.shape[1]
        if x.shape[-1] != in_features or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError(f"the head kernel takes float32 CPU inputs of {in_features} features, not "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        flat = x.reshape(-1, in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        y = torch.empty(flat.shape[0], out_features)
        self._kernel(flat.data_ptr(), flat.stride(0), flat.shape[0], values.data_ptr(), scales.data_ptr(),
                     in_features, out_features, y.data_ptr(), y.stride(0), torch.get_num_threads())
        return y.view(*x.shape[:-1], out_features)


class Q8Head(nn.Module):
    """The output projection from its int8 values and scales (`q8_form`), laid out for the kernel; no float32
    copy of its own. An input the kernel does not take (not float32, gradients) gets the weight decoded."""

    def __init__(self, kernel: Q8Kernel, values: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.kernel = kernel
        self.out_features, self.in_features = values.shape
        self.values, self.scales = kernel.lay_out(values, scales)  # not Parameters: nothing trains them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_cpu or torch.is_grad_enabled() or x.shape[-1] != self.in_features:
            return torch.nn.functional.linear(x, self.weight().to(x))
        return self.kernel.forward(x, self.values, self.scales, self.out_features)

    def weight(self) -> torch.Tensor:
        """The float32 weight [out, in] the values and scales stand for."""
        values = self.values.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features].float()
        scales = self.scales.transpose(1, 2).reshape(-1, self.in_features // BLOCK)[: self.out_features]
        return (values.view(self.out_features, -1, BLOCK) * scales[..., None]).view(self.out_features, -1)


def install_q8_head(model: Any) -> bool:
    """Replace a float32 CPU output projection without bias whose weight is in `q8_form` by a `Q8Head`, where
    the kernel builds and passes its probe; whether it did."""
    head = model.get_output_embeddings()
    if (not isinstance(head, nn.Linear) or head.bias is not None or head.weight.device.type != "cpu"
            or (form := q8_form(head.weight)) is None):
        return False
    kernel = q8_head_kernel()
    if kernel is None:
        return False
    model.set_output_embeddings(Q8Head(kernel, *form))
    return True


@functools.cache
def q8_head_kernel() -> Q8Kernel | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong."""
    return native.load(SOURCE, Q8Kernel, probe_error, "the int8 output projection", "oneDNN's packed float32 head")


def probe_error(kernel: Q8Kernel) -> float:
    """Largest difference from torch's product with the float32 weight, over weights in `q8_form` (a zero
    run among them) of one panel and part of one and of several, at token counts around the tiles."""
    generator = torch.Generator().manual_seed(0)
    error = 0.0
    for out_features, in_features in ((7, 32), (40, 96), (70, 64)):
        steps = torch.randint(-127, 128, (out_features, in_features // BLOCK, BLOCK), generator=generator)
        steps[..., 5] = -127  # each run's largest magnitude, as Q8_0 scales it
        # float16 scales, as a Q8_0 tensor stores them: a run's largest magnitude / 127 gives them back exactly
        scales = (torch.rand(out_features, in_features // BLOCK, 1, generator=generator) / 127).half().float()
        scales[0, 0] = 0.0
        weight = (steps.float() * scales).reshape(out_features, in_features)
        form = q8_form(weight)
        if form is None:
            return float("inf")
        values, panel_scales = kernel.lay_out(*form)
        for tokens in (1, 3, 12, 13, 25):
            x = torch.randn(tokens, in_features, generator=generator)
            got = kernel.forward(x, values, panel_scales, out_features)
            if not got.isfinite().all():
                return float("inf")
            error = max(error, float((got - torch.nn.functional.linear(x, weight)).abs().max()))
    return error
