"""A tenant's own API keys: list them, issue a new one, revoke one (rotation is the last two)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from adapters.models import ApiKey
from app.deps import ServicesDep, TenantDep
from app.json_body import StrictJsonRoute
from app.schemas import UtcDatetime

router = APIRouter(prefix="/keys", tags=["keys"], route_class=StrictJsonRoute)


class KeyPublic(BaseModel):
    key_id: int
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None = Field(description="to the minute")


class KeyCreated(KeyPublic):
    api_key: str = Field(description="shown once; only its hash is stored")


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic(key_id=row.id, prefix=row.prefix, created_at=row.created_at, last_used_at=row.last_used_at)


@router.get("", response_model=list[KeyPublic])
def list_keys(tenant: TenantDep, services: ServicesDep) -> list[KeyPublic]:
    return [key_public(k) for k in services.tenants.keys(tenant.id)]


@router.post("", response_model=KeyCreated, status_code=201)
def issue_key(tenant: TenantDep, services: ServicesDep) -> KeyCreated:
    row, key = services.tenants.issue_key(tenant.id)
    return KeyCreated(**key_public(row).model_dump(), api_key=key)


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: int, tenant: TenantDep, services: ServicesDep) -> Response:
    """Revoke one of the tenant's keys (another tenant's is not found). The last key stays: issue
    a new one first, so a tenant cannot lock itself out."""
    services.tenants.revoke_key(key_id, tenant_id=tenant.id)
    return Response(status_code=204)
