"""Admin API: tenants, their keys, and the workers' state."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from adapters.models import Tenant
from app.deps import AdminDep, Services, ServicesDep
from app.json_body import StrictJsonRoute
from app.quotas import TenantLimits, effective_limits
from app.routes.keys import KeyCreated, KeyPublic, key_public
from app.schemas import UtcDatetime

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=StrictJsonRoute)


class TenantCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")
    limits: TenantLimits | None = None


class TenantPublic(BaseModel):
    id: int
    name: str
    created_at: UtcDatetime
    suspended: bool = Field(description="every key of a suspended tenant is refused with 403")
    limits: TenantLimits = Field(description="effective limits: the tenant's own, or the service defaults")


class AdapterVisibility(BaseModel):
    public: bool
    version: int | None = Field(default=None, ge=1, description="default: the latest version when sharing, "
                                "every version when unsharing")


class SharedVersions(BaseModel):
    name: str
    public_versions: list[int] = Field(description="the versions every tenant may use")


class TenantCreated(BaseModel):
    id: int
    name: str
    key_id: int
    api_key: str = Field(description="shown once; only its hash is stored")


class WorkerPublic(BaseModel):
    name: str
    url: str = Field(description="the worker's internal API; its own /metrics is there too")
    model: str | None = Field(description="the base model it serves")
    ready: bool
    local: bool
    pid: int | None
    restarts: int
    running: int
    waiting: int
    in_flight: int
    adapters_resident: list[str]
    memory_bytes: int | None
    error: str | None


@router.post("/tenants", response_model=TenantCreated, status_code=201)
def create_tenant(body: TenantCreate, services: ServicesDep) -> TenantCreated:
    limits = body.limits.model_dump(exclude_unset=True) if body.limits else None
    tenant, row, key = services.tenants.create(body.name, limits)
    return TenantCreated(id=tenant.id, name=tenant.name, key_id=row.id, api_key=key)


@router.get("/tenants", response_model=list[TenantPublic])
def list_tenants(services: ServicesDep) -> list[TenantPublic]:
    return [_tenant_public(t, services) for t in services.tenants.all()]


@router.get("/tenants/{tenant_id}", response_model=TenantPublic)
def get_tenant(tenant_id: int, services: ServicesDep) -> TenantPublic:
    return _tenant_public(services.tenants.get(tenant_id), services)


def _tenant_public(t: Tenant, services: Services) -> TenantPublic:
    return TenantPublic(id=t.id, name=t.name, created_at=t.created_at, suspended=t.suspended_at is not None,
                        limits=effective_limits(t, services.settings))


@router.post("/tenants/{tenant_id}/suspend", response_model=TenantPublic)
def suspend_tenant(tenant_id: int, services: ServicesDep) -> TenantPublic:
    """Refuse every key of the tenant (403) from its next request; its adapters and keys are kept."""
    return _tenant_public(services.tenants.set_suspended(tenant_id, True), services)


@router.post("/tenants/{tenant_id}/resume", response_model=TenantPublic)
def resume_tenant(tenant_id: int, services: ServicesDep) -> TenantPublic:
    return _tenant_public(services.tenants.set_suspended(tenant_id, False), services)


@router.delete("/tenants/{tenant_id}", status_code=204)
async def delete_tenant(tenant_id: int, services: ServicesDep) -> Response:
    """The tenant with its keys, adapters and versions, at once; workers drop its adapters."""
    gone = await run_in_threadpool(services.tenants.delete, tenant_id)
    for version in gone:
        await services.pool.evict_everywhere(version.cache_key)
    return Response(status_code=204)


@router.put("/tenants/{tenant_id}/limits", response_model=TenantPublic)
def set_limits(tenant_id: int, body: TenantLimits, services: ServicesDep) -> TenantPublic:
    """Set the given limits (null: back to the service default); limits not sent are left alone."""
    return _tenant_public(services.tenants.set_limits(tenant_id, body.model_dump(exclude_unset=True)), services)


@router.put("/tenants/{tenant_id}/adapters/{name}/visibility", response_model=SharedVersions)
def set_visibility(tenant_id: int, name: str, body: AdapterVisibility, services: ServicesDep) -> SharedVersions:
    """Share one version of an adapter with every tenant, or stop sharing. Sharing is per version:
    versions uploaded later stay private until they are shared in turn."""
    return SharedVersions(name=name, public_versions=services.registry.set_public(tenant_id, name, body.public,
                                                                                  body.version))


@router.get("/tenants/{tenant_id}/keys", response_model=list[KeyPublic])
def list_keys(tenant_id: int, services: ServicesDep) -> list[KeyPublic]:
    return [key_public(k) for k in services.tenants.keys(tenant_id)]


@router.post("/tenants/{tenant_id}/keys", response_model=KeyCreated, status_code=201)
def issue_key(tenant_id: int, services: ServicesDep) -> KeyCreated:
    row, key = services.tenants.issue_key(tenant_id)
    return KeyCreated(**key_public(row).model_dump(), api_key=key)


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: int, services: ServicesDep) -> Response:
    services.tenants.revoke_key(key_id)
    return Response(status_code=204)


@router.get("/workers", response_model=list[WorkerPublic])
async def workers(services: ServicesDep) -> list[WorkerPublic]:
    return [
        WorkerPublic(
            name=s.client.name,
            url=s.client.base_url,
            model=s.health.model,
            ready=s.health.ready,
            local=s.process is not None,
            pid=s.process.proc.pid if s.process and s.process.proc else None,
            restarts=s.process.restarts if s.process else 0,
            running=s.health.running,
            waiting=s.health.waiting,
            in_flight=s.in_flight,
            adapters_resident=s.health.adapters_resident,
            memory_bytes=s.health.memory_bytes,
            error=s.health.error,
        )
        for s in services.pool.slots
    ]
