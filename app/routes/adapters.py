"""Tenant adapter API: upload (new immutable version), list, show, delete."""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from adapters.models import AdapterVersion
from adapters.peft_format import Buffer
from adapters.registry import AdapterView, parse_reference
from adapters.uploads import collect_files, map_file
from app.deps import ServicesDep, TenantDep
from app.errors import BadRequest, PayloadTooLarge
from app.json_body import StrictJsonRoute
from app.quotas import storage_quota
from app.schemas import UtcDatetime

router = APIRouter(prefix="/adapters", tags=["adapters"], route_class=StrictJsonRoute)

class AdapterVersionPublic(BaseModel):
    name: str
    version: int
    public: bool = Field(description="shared with every tenant (sharing is per version)")
    rank: int
    lora_alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    base_model: str | None
    created_at: UtcDatetime
    warnings: list[str] = []


class AdapterPublic(BaseModel):
    name: str
    public: bool = Field(description="at least one version is shared with every tenant")
    latest_version: int
    versions: list[AdapterVersionPublic]


def _version_public(name: str, v: AdapterVersion, active_base: str | None = None) -> AdapterVersionPublic:
    warnings = []
    if active_base and v.declared_base_model and v.declared_base_model != active_base:
        warnings.append(
            f"adapter_config.json names base model {v.declared_base_model!r}, this service runs "
            f"{active_base!r}; accepted because every tensor fits the base's layers"
        )
    return AdapterVersionPublic(
        name=name, version=v.version, public=v.public, rank=v.rank, lora_alpha=v.lora_alpha,
        target_modules=v.target_modules,
        size_bytes=v.size_bytes, sha256=v.weights_sha256, base_model=v.declared_base_model,
        created_at=v.created_at, warnings=warnings,
    )


def _adapter_public(a: AdapterView) -> AdapterPublic:
    versions = [_version_public(a.name, v) for v in a.versions]
    return AdapterPublic(name=a.name, public=a.public, latest_version=max(v.version for v in versions),
                         versions=versions)


def _mapped_uploads(files: list[UploadFile], limit: int, stack: ExitStack) -> list[tuple[str, Buffer]]:
    """Each part as the multipart parser spooled it to disk, mapped read-only: an upload is never
    held in the gateway's memory (validation reads the tensors one at a time)."""
    sizes = [os.fstat(upload.file.fileno()).st_size for upload in files]
    if sum(sizes) > limit:
        raise PayloadTooLarge(f"the upload is larger than the {limit}-byte limit (max_adapter_bytes)")
    parts: list[tuple[str, Buffer]] = []
    for upload, size in zip(files, sizes, strict=True):
        parts.append((upload.filename or "", map_file(upload.file.fileno(), size, stack)))
    return parts


@router.post("", response_model=AdapterVersionPublic, status_code=201)
def upload_adapter(
    tenant: TenantDep,
    services: ServicesDep,
    name: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File()],
) -> AdapterVersionPublic:
    if not files:
        raise BadRequest("no files uploaded: send adapter_config.json and adapter_model.safetensors")
    limit = services.settings.max_adapter_bytes
    quota = storage_quota(tenant, services.settings)
    with ExitStack() as stack:
        adapter_files = collect_files(_mapped_uploads(files, limit, stack), limit, stack)
        adapter, version = services.registry.create_version(tenant.id, name, adapter_files, quota)
    return _version_public(adapter.name, version, services.base_models.active().name)


@router.get("", response_model=list[AdapterPublic])
def list_adapters(tenant: TenantDep, services: ServicesDep) -> list[AdapterPublic]:
    return [_adapter_public(a) for a in services.registry.list_adapters(tenant.id) if a.versions]


@router.get("/{name}", response_model=AdapterPublic)
def get_adapter(name: str, tenant: TenantDep, services: ServicesDep) -> AdapterPublic:
    return _adapter_public(services.registry.get(tenant.id, name))


@router.delete("/{ref}", status_code=204)
async def delete_adapter(ref: str, tenant: TenantDep, services: ServicesDep) -> Response:
    """`name` deletes the adapter with all its versions; `name@N` deletes that version alone."""
    name, number = parse_reference(ref)
    if number is None:
        gone = await run_in_threadpool(services.registry.delete, tenant.id, name)
    else:
        gone = [await run_in_threadpool(services.registry.delete_version, tenant.id, name, number)]
    for version in gone:  # in-flight requests finish first; the worker frees the slot after
        await services.pool.evict_everywhere(version.cache_key)
    return Response(status_code=204)
