"""Admin API: quantization jobs, base models and moving the workers onto one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from adapters.jobs import QuantizeSpec
from adapters.models import BaseCheckpoint, QuantizationJob
from app.deps import AdminDep, ServicesDep
from app.json_body import StrictJsonRoute
from app.schemas import UtcDatetime

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=StrictJsonRoute)


class JobCreate(Schema):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="name of the base model the job will register")
    source_model: str = Field(description="name (or id) of the base model to quantize")
    method: str = Field(default="gptq", description="gptq or awq")
    bits: int = 4
    sym: bool = Field(default=True, description="symmetric; false stores zero points (asymmetric)")
    group_size: int = Field(default=64, description="must divide the model's layer widths; -1: per channel")
    calibration_samples: int = 16
    calibration_seq_len: int = 256
    calibration_text: str | None = Field(default=None, description="your own text; default: the built-in corpus")

    def spec(self) -> QuantizeSpec:
        return QuantizeSpec(method=self.method, bits=self.bits, group_size=self.group_size, sym=self.sym,
                            calibration_samples=self.calibration_samples,
                            calibration_seq_len=self.calibration_seq_len, calibration_text=self.calibration_text)


class JobPublic(Schema):
    id: int
    name: str
    source_model_id: int
    spec: dict[str, Any]
    state: str
    stage: str | None
    progress: dict[str, int]
    cancel_requested: bool
    runner: str | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    duration_seconds: float | None
    heartbeat_at: UtcDatetime | None
    error: str | None
    log_tail: str
    result_model_id: int | None

    @classmethod
    def of(cls, job: QuantizationJob) -> JobPublic:
        spec = {k: v for k, v in job.spec.items() if k != "calibration_text"}
        spec["calibration_text"] = "built-in" if job.spec.get("calibration_text") is None else "uploaded"
        end = job.finished_at
        duration = (end - job.started_at).total_seconds() if end is not None and job.started_at is not None else None
        return cls(id=job.id, name=job.name, source_model_id=job.source_id, spec=spec, state=job.state,
                   stage=job.stage, progress={"done": job.progress_done, "total": job.progress_total},
                   cancel_requested=job.cancel_requested, runner=job.runner, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, duration_seconds=duration,
                   heartbeat_at=job.heartbeat_at, error=job.error, log_tail=job.log_tail,
                   result_model_id=job.result_id)


class BaseModelPublic(Schema):
    id: int
    name: str
    quantization: str
    active: bool
    parent_id: int | None = Field(description="the base model it was quantized from: its adapters apply here")
    max_context: int
    created_at: UtcDatetime
    report: dict[str, Any] | None


class Activation(Schema):
    active: BaseModelPublic
    moved_workers: list[str]
    not_moved_workers: list[str] = Field(description="always empty: every worker moves, remote ones by reload")


@router.post("/quantization-jobs", response_model=JobPublic, status_code=201)
def submit_job(body: JobCreate, services: ServicesDep) -> JobPublic:
    return JobPublic.of(services.jobs.submit(body.name, body.source_model, body.spec()))


@router.get("/quantization-jobs", response_model=list[JobPublic])
def list_jobs(services: ServicesDep) -> list[JobPublic]:
    return [JobPublic.of(j) for j in services.jobs.all()]


@router.get("/quantization-jobs/{job_id}", response_model=JobPublic)
def show_job(job_id: int, services: ServicesDep) -> JobPublic:
    return JobPublic.of(services.jobs.get(job_id))


@router.delete("/quantization-jobs/{job_id}", response_model=JobPublic, status_code=202)
def cancel_job(job_id: int, services: ServicesDep) -> JobPublic:
    """Cancel: a queued job at once; a running one within a heartbeat (its output is removed)."""
    return JobPublic.of(services.jobs.cancel(job_id))


def _public(m: BaseCheckpoint) -> BaseModelPublic:
    return BaseModelPublic(id=m.id, name=m.name, quantization=m.quantization, active=m.active,
                           parent_id=m.parent_id, max_context=m.max_context, created_at=m.created_at,
                           report=m.report)


@router.get("/base-models", response_model=list[BaseModelPublic])
def base_models(services: ServicesDep) -> list[BaseModelPublic]:
    return [_public(m) for m in services.base_models.all()]


@router.post("/base-models/{model_id}/activate", response_model=Activation)
async def activate(model_id: int, services: ServicesDep) -> Activation:
    """Roll every worker, local and remote, onto this base model one at a time; the others keep serving.

    One activation at a time (409). If a worker cannot move, the ones already moved go back and the
    answer is a 503 that says so; the active base model is unchanged.
    """
    target = await run_in_threadpool(services.base_models.activation_target, model_id)
    current = await run_in_threadpool(services.base_models.active)
    settings = services.settings
    moved = await services.pool.roll_onto((target.path, target.name), (current.path, current.name),
                                          drain_timeout=settings.drain_timeout_s,
                                          start_timeout=settings.worker_start_timeout_s)
    await run_in_threadpool(services.base_models.set_active, model_id)
    return Activation(active=_public(target), moved_workers=moved, not_moved_workers=[])
