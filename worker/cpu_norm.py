"""The base model's RMS normalization layers on the CPU, one native call a layer.

transformers' Llama-style RMSNorm is five or six tensor operations (a square, a mean, an add, a
reciprocal square root, two products), ~18 us a call at one token on a 2-core AMD Zen 4 before
any arithmetic to speak of. The embedded model has 61 (two a decoder layer and the last), so a
batch-1 decode step spent ~1.1 ms of its ~18 there. `worker/csrc/rms_norm.c` computes each row as
`weight * (x * (1 / sqrt(mean(x * x) + eps)))` in float32, the same operations, its sum of squares
in a fixed order of its own: a row's result depends only on that row.

Which layers: every module whose class names itself an RMSNorm, with a float32 weight of the input's
width and a float epsilon (`variance_epsilon` or `eps`), provided the class's own forward gives the
kernel's result on a probe. Variants with other arithmetic (Gemma's `1 + weight`, say) fail it and keep
their forward, as does any call with gradients, another dtype or device, or a strided input.

Compiled when a worker first needs it (`worker.native`), used only if it passes that probe; otherwise
the layers keep transformers' forward (logged). Serving only: the worker installs it (`install`) on the
model it serves, before the model's first forward.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from worker import native

SOURCE = native.CSRC / "rms_norm.c"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_EPSILONS = ("variance_epsilon", "eps")  # where a layer keeps its epsilon
log = logging.getLogger(__name__)


class RmsNorm:
    """The compiled kernel: `forward` normalizes the rows of x."""

    def __init__(self, library: ctypes.CDLL) -> None:
        # run(x, x_stride, tokens, n, weight, eps, y, y_stride, threads)
        self.run: Callable[[int, int, int, int, int, float, int, int, int], None] = library.rms_norm
        library.rms_norm.argtypes = [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_float, _PTR, _I64, ctypes.c_int]
        library.rms_norm.restype = None
        # run_layer(table.address, x, tokens, y, threads): a layer's weight, width and epsilon in its `table`
        self.run_layer: Callable[[int, int, int, int, int], None] = library.rms_norm_layer
        library.rms_norm_layer.argtypes = [_PTR, _PTR, _I64, _PTR, ctypes.c_int]
        library.rms_norm_layer.restype = None

    @staticmethod
    def table(weight: torch.Tensor, eps: float) -> native.ArgTable:
        """`run_layer`'s arguments: [weight's address, its width, eps as a float32's bits]. The weight must
        outlive the table."""
        bits = int(torch.tensor([eps], dtype=torch.float32).view(torch.int32))
        return native.arg_table(weight.data_ptr(), weight.numel(), bits)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., n] float32 on the CPU, last dimension dense; weight [n] float32, contiguous."""
        n = weight.numel()
        if (x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != n or x.stride(-1) != 1
                or weight.dtype != torch.float32 or weight.dim() != 1 or not weight.is_contiguous()):
            raise ValueError(f"the kernel takes float32 CPU rows of {n} values, not {x.dtype} {tuple(x.shape)}")
        flat = x.reshape(-1, n)
        y = torch.empty(flat.shape)
        self.run(flat.data_ptr(), flat.stride(0), flat.shape[0], n, weight.data_ptr(), eps, y.data_ptr(), n,
                 torch.get_num_threads())
        return y.view(x.shape)


class NormForward:
    """An RMSNorm layer's forward without gradients on a dense float32 CPU input: the kernel; anything
    else: the layer's own forward."""

    def __init__(self, kernel: RmsNorm, weight: torch.Tensor, eps: float,
                 original: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.kernel, self.weight, self.original = kernel, weight, original  # the weight outlives the table
        self.n = weight.numel()
        self.table = kernel.table(weight, eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n
        if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() or not x.numel()
                or x.shape[-1] != n or not x.is_contiguous()):
            return self.original(x)
        y = torch.empty_like(x)
        self.kernel.run_layer(self.table.address, x.data_ptr(), x.numel() // n, y.data_ptr(), torch.get_num_threads())
        return y


def _norm_weight(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, epsilon) of a module shaped like an RMSNorm the kernel could compute; else None."""
    if "rmsnorm" not in type(module).__name__.lower():
        return None
    weight = getattr(module, "weight", None)
    eps = next((value for name in _EPSILONS if isinstance(value := getattr(module, name, None), float)), None)
    if (not isinstance(weight, torch.Tensor) or eps is None or weight.dtype != torch.float32 or weight.dim() != 1
            or weight.device.type != "cpu" or not weight.is_contiguous() or not weight.numel()
            or getattr(module, "bias", None) is not None):
        return None
    return weight, eps


def agrees(kernel: RmsNorm, module: nn.Module, weight: torch.Tensor, eps: float) -> bool:
    """Whether the kernel gives what `module`'s class computes, on rows of several magnitudes (one of
    zeros) with the module's own weight and epsilon."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, weight.numel(), generator=generator) * torch.tensor([[0.0], [1e-3], [1.0], [3.0], [50.0],
                                                                             [1.0], [0.2]])
    with torch.no_grad():
        expected = type(module).forward(module, x)
        got = kernel.forward(x, weight.detach(), eps)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or expected.dtype != torch.float32:
        return False
    scale = float(expected.abs().max()) + 1.0
    return bool((got - expected).abs().max() <= native.PROBE_TOLERANCE * scale)


def install(model: nn.Module) -> int:
    """Route the model's RMSNorm layers that the kernel computes as their class does (`agrees`, once a class)
    through it without gradients (`NormForward`); how many it took (0 where none could be, or the kernel
    cannot be had: it is compiled only for a model that has candidates)."""
    candidates = [(module, found) for module in model.modules() if (found := _norm_weight(module)) is not None]
    kernel = rms_norm_kernel() if candidates else None
    if kernel is None:
        return 0
    verdicts: dict[type, bool] = {}
    taken = 0
    for module, (weight, eps) in candidates:
        cls = type(module)
        if cls not in verdicts:
            verdicts[cls] = agrees(kernel, module, weight, eps)
            if not verdicts[cls]:
                log.info("%s computes otherwise than the RMS norm kernel: it keeps its forward", cls.__name__)
        if verdicts[cls]:
            module.forward = NormForward(kernel, weight.detach(), eps, module.forward)
            taken += 1
    return taken


def taken(model: nn.Module) -> list[NormForward]:
    """The forwards `install` gave the model's layers."""
    forwards = (module.__dict__.get("forward") for module in model.modules())
    return [forward for forward in forwards if isinstance(forward, NormForward)]


def probe_error(kernel: RmsNorm) -> float:
    """The kernel against the formula in torch on rows of odd and lane-multiple widths."""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for n in (1, 13, 64, 577):
        x = torch.randn(5, n, generator=generator) * 4
        weight = torch.randn(n, generator=generator)
        expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        worst = max(worst, float((kernel.forward(x, weight, 1e-5) - expected).abs().max()))
    return worst


@functools.cache
def rms_norm_kernel() -> RmsNorm | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong."""
    return native.load(SOURCE, RmsNorm, probe_error, "RMS norm layers", "transformers' RMSNorm")
