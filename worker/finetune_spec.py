"""What a fine-tuning job runs: its hyperparameters and LoRA shape, checked before anything runs.

Plain data shared by the gateway (which resolves and checks a job when it is submitted) and the
training child process (which runs it); it imports neither torch nor the database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The learning rate `learning_rate_multiplier` scales: AdamW on LoRA weights, decayed linearly to a
# tenth over the run. On the embedded model 40 examples of one answer learn it in ~40 steps at this rate.
BASE_LEARNING_RATE = 2e-3
MAX_EPOCHS = 50
MAX_BATCH_SIZE = 64
DEFAULT_RANK = 8


FAILED_EXIT = 3  # the training process refused the job (its files, its limits); it printed why as FAILED {...}


class InvalidFineTune(ValueError):
    """A job that cannot run as asked; the message names the field."""


def auto_batch_size(examples: int) -> int:
    return max(1, min(8, examples // 4))


def auto_epochs(examples: int) -> int:
    """About 120 examples seen in all for a small file, 3 epochs at least: on the embedded model 40 examples
    of one answer reach a training loss near 0.001 within 3 epochs and answer unseen questions with it."""
    return max(3, min(25, math.ceil(120 / max(examples, 1))))


@dataclass(frozen=True)
class FineTuneSpec:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int
    lora_rank: int = DEFAULT_RANK
    lora_alpha: float = 2.0 * DEFAULT_RANK
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # names of the base's linear layers (the gateway fills in all of them)
    # Continuing from an adapter: its shape is the adapter's own (rank, alpha, modules are taken from it).
    continue_from: str | None = None

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def check(self, max_rank: int, module_names: set[str]) -> None:
        """Refuse what cannot train, naming the field; `module_names` are the base's linear layer names."""
        if not 1 <= self.n_epochs <= MAX_EPOCHS:
            raise InvalidFineTune(f"hyperparameters.n_epochs must be 1-{MAX_EPOCHS}; got {self.n_epochs}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InvalidFineTune(f"hyperparameters.batch_size must be 1-{MAX_BATCH_SIZE}; got {self.batch_size}")
        if not (math.isfinite(self.learning_rate_multiplier) and 0 < self.learning_rate_multiplier <= 10):
            raise InvalidFineTune("hyperparameters.learning_rate_multiplier must be above 0 and at most 10; "
                                  f"got {self.learning_rate_multiplier}")
        if not 0 <= self.seed < 2**31:
            raise InvalidFineTune(f"seed must be 0-{2**31 - 1}; got {self.seed}")
        if not 1 <= self.lora_rank <= max_rank:
            raise InvalidFineTune(f"loraplex.lora_rank must be 1-{max_rank} (max_lora_rank); got {self.lora_rank}")
        if not (math.isfinite(self.lora_alpha) and 0 < self.lora_alpha <= 4096):
            raise InvalidFineTune(f"loraplex.lora_alpha must be above 0 and at most 4096; got {self.lora_alpha}")
        if not (math.isfinite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise InvalidFineTune(f"loraplex.lora_dropout must be 0 or more and below 1; got {self.lora_dropout}")
        if not self.target_modules:
            raise InvalidFineTune("loraplex.target_modules is empty")
        unknown = sorted(set(self.target_modules) - module_names)
        if unknown:
            raise InvalidFineTune(f"loraplex.target_modules {unknown} are not linear layers of the base model "
                                  f"(it has {sorted(module_names)})")


@dataclass(frozen=True)
class TrainingPlan:
    """What the runner hands the child: the spec, where everything is, and the limits that apply."""

    spec: dict[str, Any]  # FineTuneSpec fields
    base_path: str
    base_name: str
    training_file: str
    validation_file: str | None
    init_adapter: str | None  # a directory with the adapter continued from
    max_example_tokens: int
    micro_batch_tokens: int  # padded tokens in one forward pass: what bounds the job's memory
    max_validation_tokens: int  # all of the validation file's: it is evaluated twice, on the runner's time
    max_examples: int
    token_budget: int | None  # tokens the tenant may still train today (None: no limit)
    device: str = "auto"
