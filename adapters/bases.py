"""The registered base checkpoints, and the one owner of "which base do the workers serve"."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from adapters.jobs import JobConflict, JobNotFound
from adapters.models import BaseCheckpoint
from worker.quantize_spec import InvalidJob

ACTIVE_TTL_S = 5.0  # another gateway's activation is seen within this; this one's at once


PACKED = ("gptq", "awq")  # what quantization jobs make; every other base is loaded in bitsandbytes NF4


class NoActiveBaseModel(RuntimeError):
    pass


@dataclass(frozen=True)
class ActiveBase:
    """The served base as a plain value: safe to keep and share across threads."""

    id: int
    name: str
    path: str
    linear_modules: dict[str, Any]
    max_context: int


class BaseCheckpoints:
    """The registered base models: listing, lineage, and which one the workers serve (cached)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._active: tuple[float, ActiveBase | None] | None = None

    def active(self) -> ActiveBase:
        base = self.active_or_none()
        if base is None:
            raise NoActiveBaseModel("no base model is registered; run `loraplex models prepare`")
        return base

    def active_or_none(self) -> ActiveBase | None:
        with self._lock:
            if self._active is not None and time.monotonic() - self._active[0] < ACTIVE_TTL_S:
                return self._active[1]
        with self.sessions() as session:
            row = session.scalar(select(BaseCheckpoint).where(BaseCheckpoint.active.is_(True)))
            base = None if row is None else ActiveBase(row.id, row.name, row.path, dict(row.linear_modules),
                                                       row.max_context)
        with self._lock:
            self._active = (time.monotonic(), base)
        return base

    def all(self) -> list[BaseCheckpoint]:
        with self.sessions() as session:
            return list(session.scalars(select(BaseCheckpoint).order_by(BaseCheckpoint.id)))

    def activation_target(self, model_id: int) -> BaseCheckpoint:
        """The model to activate, refused unless it shares a root with the active one.

        The registered adapters were validated against the active base's layers, and only
        a base of the same lineage is sure to have the same ones.
        """
        models = {m.id: m for m in self.all()}
        target = models.get(model_id)
        if target is None:
            raise JobNotFound(f"base model {model_id}")
        current = next((m for m in models.values() if m.active), None)
        if current is not None and _root(target, models) != _root(current, models):
            raise JobConflict(f"{target.name} is not derived from {current.name} (or the reverse): "
                              "the registered adapters were validated against the active base")
        return target

    def trainable(self, model_id: int) -> BaseCheckpoint:
        """The checkpoint fine-tuning runs on for base `model_id`: itself when bitsandbytes loads it in NF4
        (what the workers serve), else the base of its lineage that a GPTQ/AWQ job made it from.

        LoRA training needs a base whose 4-bit layers PEFT can train through; GPTQ/AWQ kernels on the CPU
        cannot, and an adapter trained on the lineage's NF4 base applies to every base of that lineage.
        """
        models = {m.id: m for m in self.all()}
        model = models.get(model_id)
        while model is not None and model.quantization in PACKED:
            model = models.get(model.parent_id) if model.parent_id is not None else None
        if model is None:
            raise InvalidJob(f"base model {model_id} is GPTQ/AWQ-quantized and its lineage has no base that "
                             "bitsandbytes loads in NF4 to train on")
        return model

    def set_active(self, model_id: int) -> None:
        with self.sessions.begin() as session:
            session.execute(update(BaseCheckpoint).values(active=False))
            session.execute(update(BaseCheckpoint).where(BaseCheckpoint.id == model_id).values(active=True))
        with self._lock:
            self._active = None


def _root(model: BaseCheckpoint, models: dict[int, BaseCheckpoint]) -> int:
    while model.parent_id is not None and model.parent_id in models:
        model = models[model.parent_id]
    return model.id
