"""Admin API: tenants, their keys, and the workers' state."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from app.deps import AdminDep, ServicesDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


class TenantCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


class TenantPublic(BaseModel):
    id: int
    name: str
    created_at: datetime


class TenantCreated(BaseModel):
    id: int
    name: str
    api_key: str = Field(description="shown once; only its hash is stored")


class KeyCreated(BaseModel):
    key_id: int
    api_key: str


class WorkerPublic(BaseModel):
    name: str
    ready: bool
    local: bool
    pid: int | None
    restarts: int
    running: int
    waiting: int
    in_flight: int
    adapters_resident: list[str]
    error: str | None


@router.post("/tenants", response_model=TenantCreated, status_code=201)
def create_tenant(body: TenantCreate, services: ServicesDep) -> TenantCreated:
    tenant, key = services.tenants.create(body.name)
    return TenantCreated(id=tenant.id, name=tenant.name, api_key=key)


@router.get("/tenants", response_model=list[TenantPublic])
def list_tenants(services: ServicesDep) -> list[TenantPublic]:
    return [TenantPublic(id=t.id, name=t.name, created_at=t.created_at) for t in services.tenants.list()]


@router.post("/tenants/{tenant_id}/keys", response_model=KeyCreated, status_code=201)
def issue_key(tenant_id: int, services: ServicesDep) -> KeyCreated:
    row, key = services.tenants.issue_key(tenant_id)
    return KeyCreated(key_id=row.id, api_key=key)


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: int, services: ServicesDep) -> Response:
    services.tenants.revoke_key(key_id)
    return Response(status_code=204)


@router.get("/workers", response_model=list[WorkerPublic])
async def workers(services: ServicesDep) -> list[WorkerPublic]:
    return [
        WorkerPublic(
            name=s.client.name,
            ready=s.health.ready,
            local=s.process is not None,
            pid=s.process.proc.pid if s.process and s.process.proc else None,
            restarts=s.process.restarts if s.process else 0,
            running=s.health.running,
            waiting=s.health.waiting,
            in_flight=s.in_flight,
            adapters_resident=s.health.adapters_resident,
            error=s.health.error,
        )
        for s in services.pool.slots
    ]
