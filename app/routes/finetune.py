"""OpenAI's fine-tuning API for tenants: /v1/files and /v1/fine_tuning/jobs.

A JSONL file of chat examples is checked line by line when it is uploaded; a job trains a LoRA
adapter on the served 4-bit base (QLoRA) in the job runner, and its result is registered as one
of the tenant's adapters, `fine_tuned_model`, which `/generate` and `/v1/*` serve at once.
"""

from __future__ import annotations

import os
import random
import re
from contextlib import ExitStack
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from adapters.finetuning import FineTuneLimits, InvalidFineTuneRequest, JobRequest
from adapters.models import FineTuningEvent, FineTuningJob, Tenant, TrainingFile
from adapters.uploads import map_file
from app.deps import Services, ServicesDep, TenantDep
from app.errors import BadRequest, NotFound, PayloadTooLarge
from app.json_body import StrictJsonRoute
from app.quotas import storage_quota
from worker.finetune_spec import DEFAULT_RANK, FineTuneSpec, auto_batch_size, auto_epochs
from worker.training_data import read_examples

router = APIRouter(prefix="/v1", tags=["fine-tuning"], route_class=StrictJsonRoute)

ERROR_CODE = re.compile(r"^([a-z_]+): (.+)$", re.DOTALL)  # how the runner stores a failure: "<code>: <message>"
SUFFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_SUFFIX = 40


# -- files -----------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    examples: int = Field(description="loraplex: the conversations in the file, all checked")

    @classmethod
    def of(cls, f: TrainingFile) -> FileObject:
        return cls(id=f.id, bytes=f.bytes, created_at=_epoch(f.created_at), filename=f.filename, purpose=f.purpose,
                   examples=f.examples)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def _epoch(moment: Any) -> int:
    from datetime import UTC

    return int(moment.replace(tzinfo=UTC).timestamp())


@router.post("/files", response_model=FileObject)
def upload_file(
    tenant: TenantDep, services: ServicesDep, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
) -> FileObject:
    """A JSONL file of `{"messages": [...]}` lines; every line is checked now, and the first bad one named."""
    if purpose != "fine-tune":
        raise BadRequest(f"purpose must be 'fine-tune' (loraplex keeps files for fine-tuning only); "
                         f"got {purpose[:40]!r}")
    settings = services.settings
    size = os.fstat(file.file.fileno()).st_size
    if size > settings.max_training_file_bytes:
        raise PayloadTooLarge(f"the file is larger than the {settings.max_training_file_bytes}-byte limit "
                              "(max_training_file_bytes)")
    if size == 0:
        raise BadRequest("the file is empty")
    with ExitStack() as stack:
        data = map_file(file.file.fileno(), size, stack)
        examples = sum(1 for _ in read_examples(_lines(data), settings.max_training_examples))
        if examples == 0:
            raise BadRequest("the file has no examples (one JSON object per line)")
        row = services.training_files.create(tenant.id, file.filename or "file.jsonl", purpose, data, examples,
                                             settings.tenant_max_files, settings.tenant_max_file_bytes)
    return FileObject.of(row)


def _lines(data: Any) -> Any:
    view = memoryview(data)
    start = 0
    while start < len(view):
        end = data.find(b"\n", start)
        end = len(view) if end < 0 else end
        yield bytes(view[start:end])
        start = end + 1


@router.get("/files", response_model=FileList)
def list_files(tenant: TenantDep, services: ServicesDep, purpose: str | None = None) -> FileList:
    rows = services.training_files.all(tenant.id)
    return FileList(data=[FileObject.of(f) for f in rows if purpose is None or f.purpose == purpose])


@router.get("/files/{file_id}", response_model=FileObject)
def show_file(file_id: str, tenant: TenantDep, services: ServicesDep) -> FileObject:
    return FileObject.of(services.training_files.get(tenant.id, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    row = services.training_files.get(tenant.id, file_id)
    return Response(bytes(services.registry.blobs.get(row.sha256)), media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, tenant: TenantDep, services: ServicesDep) -> FileDeleted:
    services.training_files.delete(tenant.id, file_id)
    return FileDeleted(id=file_id)


# -- jobs ------------------------------------------------------------------------------------
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    supervised: Supervised | None = None


class LoraOptions(BaseModel):
    """loraplex's own options, under the extra field `loraplex` (the openai client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = Field(default=None, max_length=64)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    loraplex: LoraOptions | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    status: str
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    user_provided_suffix: str | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    # loraplex's additions: where the job is, and its report once it has one.
    stage: str | None
    progress: dict[str, int]
    report: dict[str, Any] | None

    @classmethod
    def of(cls, job: FineTuningJob) -> JobObject:
        spec = job.spec
        hyper = {"n_epochs": spec["n_epochs"], "batch_size": spec["batch_size"],
                 "learning_rate_multiplier": spec["learning_rate_multiplier"]}
        error = None
        if job.error:
            coded = ERROR_CODE.match(job.error)
            error = (JobError(code=coded.group(1), message=coded.group(2)) if coded
                     else JobError(code="job_failed", message=job.error))
        return cls(
            id=job.public_id, model=job.model, created_at=_epoch(job.created_at),
            finished_at=_epoch(job.finished_at) if job.finished_at else None, fine_tuned_model=job.fine_tuned_model,
            organization_id=f"tenant-{job.tenant_id}", status=_status(job), validation_file=job.validation_file,
            training_file=job.training_file, hyperparameters=hyper,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
            trained_tokens=job.trained_tokens if job.state == "succeeded" else None, error=error,
            user_provided_suffix=job.suffix, seed=job.seed, metadata=spec.get("metadata"), stage=job.stage,
            progress={"done": job.progress_done, "total": job.progress_total}, report=job.report,
        )


def _status(job: FineTuningJob) -> str:
    """OpenAI's statuses: a running job reads its files first."""
    if job.state == "running":
        return "validating_files" if job.stage in (None, "starting", "validating_files") else "running"
    return job.state


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventObject(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str

    @classmethod
    def of(cls, e: FineTuningEvent) -> EventObject:
        return cls(id=f"ftevent-{e.id}", created_at=_epoch(e.created_at), level=e.level, message=e.message,
                   data=e.data, type=e.type)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


def _hyperparameters(body: JobCreate) -> Hyperparameters:
    method_hyper = None
    if body.method is not None:
        if body.method.type != "supervised":
            raise InvalidFineTuneRequest(f"method.type {body.method.type[:40]!r} is not supported; loraplex "
                                         "fine-tunes with 'supervised'", param="method.type")
        method_hyper = body.method.supervised.hyperparameters if body.method.supervised else None
    if method_hyper is not None and body.hyperparameters is not None and method_hyper != body.hyperparameters:
        raise InvalidFineTuneRequest("hyperparameters and method.supervised.hyperparameters differ; send one",
                                     param="hyperparameters")
    return method_hyper or body.hyperparameters or Hyperparameters()


def _check_suffix(suffix: str | None) -> None:
    if suffix is not None and not (0 < len(suffix) <= MAX_SUFFIX and set(suffix) <= SUFFIX_CHARS):
        raise InvalidFineTuneRequest(f"suffix must be 1-{MAX_SUFFIX} letters, digits, '.', '_' or '-'",
                                     param="suffix")


def build_request(body: JobCreate, tenant: Tenant, services: Services) -> JobRequest:
    """Resolve `model`, the files' sizes into 'auto' hyperparameters, and check every field."""
    _check_suffix(body.suffix)
    if body.integrations:
        raise InvalidFineTuneRequest("integrations are not supported", param="integrations")
    metadata = body.metadata or {}
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise InvalidFineTuneRequest("metadata holds at most 16 pairs, keys of at most 64 characters and values "
                                     "of at most 512", param="metadata")
    hyper = _hyperparameters(body)
    options = body.loraplex or LoraOptions()
    training = services.training_files.get(tenant.id, body.training_file)
    if body.validation_file is not None:
        services.training_files.get(tenant.id, body.validation_file)
    base = services.base_models.active()
    trained_on = services.base_models.trainable(base.id)
    continued: dict[str, Any] | None = None
    if body.model != base.name:
        continued = _continued_adapter(body.model, tenant, services, base.name)
        if any(v is not None for v in options.model_dump().values()):
            raise InvalidFineTuneRequest("loraplex.lora_* and target_modules cannot be set when continuing from "
                                         "an adapter: its rank, alpha and modules are kept", param="loraplex")
    names = {module.rsplit(".", 1)[-1] for module in base.linear_modules}
    rank = options.lora_rank if options.lora_rank is not None else DEFAULT_RANK
    alpha = options.lora_alpha if options.lora_alpha is not None else 2.0 * rank
    targets = tuple(sorted(names) if options.target_modules is None else options.target_modules)  # QLoRA: all
    if continued is not None:  # the adapter's own shape
        rank, alpha, targets = continued["rank"], continued["lora_alpha"], tuple(continued["target_modules"])
    spec = FineTuneSpec(
        n_epochs=auto_epochs(training.examples) if hyper.n_epochs == "auto" else hyper.n_epochs,
        batch_size=auto_batch_size(training.examples) if hyper.batch_size == "auto" else hyper.batch_size,
        learning_rate_multiplier=1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier,
        seed=body.seed if body.seed is not None else random.randrange(2**31),
        lora_dropout=options.lora_dropout if options.lora_dropout is not None else 0.0,
        continue_from=None if continued is None else continued["reference"],
        lora_rank=rank, lora_alpha=alpha, target_modules=targets,
    )
    spec.check(services.settings.max_lora_rank, names)
    return JobRequest(
        model=body.model, base_model_id=trained_on.id, training_file=body.training_file,
        validation_file=body.validation_file, suffix=body.suffix, seed=spec.seed,
        spec={**_spec_fields(spec), "continued": continued, "metadata": body.metadata, "served_base": base.name},
    )


def _spec_fields(spec: FineTuneSpec) -> dict[str, Any]:
    from dataclasses import asdict

    fields = asdict(spec)
    fields["target_modules"] = list(spec.target_modules)
    return fields


def _continued_adapter(model: str, tenant: Tenant, services: Services, base_name: str) -> dict[str, Any]:
    from adapters.registry import AdapterNotFound, parse_reference

    name, _ = parse_reference(model)
    try:
        view = services.registry.get(tenant.id, name)
        resolved = services.registry.resolve(tenant.id, model)
    except AdapterNotFound:
        view = None
    if view is None or view.owner_id != tenant.id:
        raise NotFound(f"model {model!r} not found: fine-tune the base model {base_name!r} or continue from one "
                       "of your own adapters")
    version = next(v for v in view.versions if v.version == resolved.version)
    return {"reference": f"{resolved.name}@{resolved.version}", "weights_sha256": resolved.weights_sha256,
            "config_sha256": resolved.config_sha256, "rank": version.rank, "lora_alpha": version.lora_alpha,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in version.target_modules})}


def _limits(tenant: Tenant, services: Services) -> FineTuneLimits:
    settings = services.settings
    return FineTuneLimits(max_active_jobs=settings.finetune_max_active_jobs,
                          tokens_per_day=settings.finetune_tokens_per_day)


@router.post("/fine_tuning/jobs", response_model=JobObject)
def create_job(body: JobCreate, tenant: TenantDep, services: ServicesDep) -> JobObject:
    request = build_request(body, tenant, services)
    job = services.finetune_jobs.submit(tenant.id, request, _limits(tenant, services),
                                        storage_quota(tenant, services.settings))
    return JobObject.of(job)


@router.get("/fine_tuning/jobs", response_model=JobList)
def list_jobs(tenant: TenantDep, services: ServicesDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    jobs, more = services.finetune_jobs.page(tenant.id, after, limit)
    return JobList(data=[JobObject.of(j) for j in jobs], has_more=more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=JobObject)
def show_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> JobObject:
    return JobObject.of(services.finetune_jobs.find(tenant.id, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject)
async def cancel_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> JobObject:
    """A queued job is cancelled at once; a running one within a heartbeat (nothing of it is kept)."""
    job = await run_in_threadpool(services.finetune_jobs.cancel_job, tenant.id, job_id)
    return JobObject.of(job)


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=EventList)
def job_events(job_id: str, tenant: TenantDep, services: ServicesDep, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> EventList:
    events, more = services.finetune_jobs.events(tenant.id, job_id, after, limit)
    return EventList(data=[EventObject.of(e) for e in events], has_more=more)
