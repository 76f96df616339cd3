"""Tenant adapter API: upload (new immutable version), list, show, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from adapters.models import Adapter, AdapterVersion
from adapters.registry import parse_reference
from adapters.validation import collect_files
from app.deps import ServicesDep, TenantDep
from app.errors import BadRequest, PayloadTooLarge
from app.quotas import storage_quota
from app.schemas import UtcDatetime

router = APIRouter(prefix="/adapters", tags=["adapters"])

_READ_CHUNK = 1024 * 1024


class AdapterVersionPublic(BaseModel):
    name: str
    version: int
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
    public: bool
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
        name=name, version=v.version, rank=v.rank, lora_alpha=v.lora_alpha, target_modules=v.target_modules,
        size_bytes=v.size_bytes, sha256=v.weights_sha256, base_model=v.declared_base_model,
        created_at=v.created_at, warnings=warnings,
    )


def _adapter_public(a: Adapter) -> AdapterPublic:
    versions = [_version_public(a.name, v) for v in a.versions]
    return AdapterPublic(name=a.name, public=a.public, latest_version=max(v.version for v in versions),
                         versions=versions)


def _read_uploads(files: list[UploadFile], limit: int) -> list[tuple[str, bytes]]:
    """Read the parts in chunks, refusing as soon as their total passes the limit."""
    out, total = [], 0
    for upload in files:
        chunks = []
        while chunk := upload.file.read(_READ_CHUNK):
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"the upload is larger than the {limit}-byte limit (max_adapter_bytes)")
            chunks.append(chunk)
        out.append((upload.filename or "", b"".join(chunks)))
    return out


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
    adapter_files = collect_files(_read_uploads(files, limit), max_unpacked_bytes=limit)
    quota = storage_quota(tenant, services.settings)
    adapter, version = services.registry.create_version(tenant.id, name, adapter_files, quota)
    with services.sessions() as session:
        base = services.registry.active_base_model(session)
    return _version_public(adapter.name, version, base.name)


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
