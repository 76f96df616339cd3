"""What a quantization job runs: its parameters, checked before anything runs.

Plain data shared by the gateway (which checks a job when it is submitted) and the
quantization child process (which runs it); it imports neither torch nor the database.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("gptq", "awq")
BITS = {"gptq": (2, 3, 4, 8), "awq": (4,)}  # what GPTQModel 7.6 packs for each method
MAX_CALIBRATION_CHARS = 4 * 2**20


class InvalidJob(ValueError):
    """A job that cannot run as asked; the message names the field."""


@dataclass(frozen=True)
class QuantizeSpec:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    calibration_samples: int = 16
    calibration_seq_len: int = 256
    calibration_text: str | None = None  # None: the corpus that ships with loraplex

    def check(self, input_sizes: set[int]) -> None:
        """Refuse what the library or the model cannot do, before anything runs."""
        if self.method not in METHODS:
            raise InvalidJob(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.bits not in BITS[self.method]:
            raise InvalidJob(f"bits={self.bits} is not available for {self.method} (allowed: {BITS[self.method]})")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise InvalidJob(f"group_size must be a power of two >= 16, or -1 (per channel); got {self.group_size}")
        bad = sorted(d for d in input_sizes if self.group_size != -1 and d % self.group_size)
        if bad:
            raise InvalidJob(f"group_size {self.group_size} does not divide the model's input dimensions {bad}")
        if not 1 <= self.calibration_samples <= 1024:
            raise InvalidJob("calibration_samples must be 1-1024")
        if not 16 <= self.calibration_seq_len <= 4096:
            raise InvalidJob("calibration_seq_len must be 16-4096")
        if self.calibration_text is not None and not self.calibration_text.strip():
            raise InvalidJob("calibration_text is empty (leave it out to use the built-in corpus)")
        if self.calibration_text is not None and len(self.calibration_text) > MAX_CALIBRATION_CHARS:
            raise InvalidJob(f"calibration_text is over {MAX_CALIBRATION_CHARS} characters (max_calibration_chars)")
