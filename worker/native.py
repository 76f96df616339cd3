"""Native CPU kernels: C files under `worker/csrc/`, compiled when a worker first needs them.

Each is built for the host it runs on (`-march=native`) into a temporary directory and loaded
with ctypes; the caller checks it against torch on a probe before using it, and keeps torch's
own path (logged) where there is no C compiler, the build fails or hangs, or the probe disagrees.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
K = TypeVar("K")
PROBE_TOLERANCE = 1e-4  # largest difference from torch on a kernel's probe


@dataclass(frozen=True)
class ArgTable:
    """A kernel's fixed arguments for one layer (addresses, sizes, flags), int64s in memory the table owns,
    handed over as one pointer (`address`): ctypes converts each argument of a call, ~0.2-0.3 us apiece,
    and a decode step calls a kernel for each of the model's 210 layers. The caller keeps the tensors
    whose addresses it holds alive and in place as long as the table."""

    values: ctypes.Array[ctypes.c_int64]
    address: int


def arg_table(*values: int) -> ArgTable:
    array = (ctypes.c_int64 * len(values))(*values)
    return ArgTable(array, ctypes.addressof(array))

CSRC = Path(__file__).parent / "csrc"
# Finite-math and signed-zero freedom let the compiler vectorize max and select; sums keep their
# written order (no -ffast-math, no reassociation), so a row's result never depends on its batch.
# `-fopenmp-simd` honours `omp simd` loops (reordered sums, where the sum is a measure, not a result)
# in the build without OpenMP's threads too.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros",
         "-fopenmp-simd", "-std=c11", "-shared", "-fPIC"]


def side_by_side(rows: torch.Tensor, lanes: int) -> torch.Tensor:
    """A matrix [n, k] as panels of `lanes` rows side by side, [ceil(n / lanes), k, lanes] (the rows past n
    zeros): element (p, j, r) is row p * lanes + r's element j, so one vector load reads element j of a
    panel's rows. The layout of the kernels that run their lanes over output rows (4-bit layers, the head)."""
    import torch

    padded = torch.zeros(-(-rows.shape[0] // lanes) * lanes, rows.shape[1], dtype=rows.dtype)
    padded[: rows.shape[0]] = rows
    return padded.view(-1, lanes, rows.shape[1]).transpose(1, 2).contiguous()


class NoCompiler(OSError):
    """Neither `cc` nor `gcc` is on the PATH."""


def build(source: Path) -> tuple[ctypes.CDLL, bool]:
    """Compile and load `source`; the library and whether it has OpenMP, which spreads its work over
    torch's threads (the same runtime: torch has loaded libgomp first).

    Raises NoCompiler, OSError (a library that will not load) or subprocess.SubprocessError (a failed
    or hung compiler).
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NoCompiler("no C compiler (cc or gcc) on the PATH")
    with tempfile.TemporaryDirectory(prefix="loraplex-kernel-") as work:
        library = Path(work) / f"{source.stem}.so"
        for openmp in (True, False):
            built = subprocess.run(
                [compiler, *FLAGS, *(["-fopenmp"] if openmp else []), "-o", str(library), str(source)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if built.returncode == 0:
                return ctypes.CDLL(str(library)), openmp  # loaded: the file may go
    raise subprocess.SubprocessError(f"{compiler} could not compile {source.name}: {built.stderr.strip()}")


def load(source: Path, wrap: Callable[[ctypes.CDLL], K], probe: Callable[[K], float], what: str,
         fallback: str) -> K | None:
    """`wrap` of the built `source` if it gives what torch gives on `probe`; else None, logged, and the
    caller keeps `fallback` (torch's way of computing `what`)."""
    try:
        library, openmp = build(source)
        kernel = wrap(library)
    except NoCompiler:
        log.info("no C compiler: %s stays on %s", what, fallback)
        return None
    except (OSError, subprocess.SubprocessError, AttributeError) as failure:  # failed or hung compiler, bad library
        log.warning("%s kernel unavailable (%s): %s stays on %s", what, str(failure)[-500:], what, fallback)
        return None
    difference = probe(kernel)
    if difference > PROBE_TOLERANCE:
        log.warning("%s kernel differs from %s by %.2e on a probe: not used", what, fallback, difference)
        return None
    log.info("%s: native kernel (%s)", what, "OpenMP threads" if openmp else "one thread")
    return kernel
