"""The gateway's services and the typed dependencies routes declare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from adapters.jobs import BaseModels, JobStore
from adapters.models import Tenant
from adapters.registry import AdapterRegistry
from app.auth import TenantService, is_admin_key
from app.errors import Forbidden, Unauthorized
from app.metrics import TenantLabels
from app.quotas import RequestQuotas
from app.settings import Settings
from app.workers.pool import WorkerPool


@dataclass
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    registry: AdapterRegistry
    tenants: TenantService
    pool: WorkerPool
    admin_key: str
    quotas: RequestQuotas
    tenant_labels: TenantLabels
    jobs: JobStore
    base_models: BaseModels


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return token.strip()


def require_tenant(request: Request, services: ServicesDep) -> Tenant:
    key = _bearer(request)
    if is_admin_key(key, services.admin_key):
        raise Forbidden("the admin key cannot act as a tenant; create a tenant and use its key")
    tenant = services.tenants.authenticate(key)
    if tenant is None:
        raise Unauthorized("invalid or revoked API key")
    return tenant


def require_admin(request: Request, services: ServicesDep) -> None:
    key = _bearer(request)
    if is_admin_key(key, services.admin_key):
        return
    if services.tenants.authenticate(key) is not None:
        raise Forbidden("this route needs the admin key")
    raise Unauthorized("invalid API key")


TenantDep = Annotated[Tenant, Depends(require_tenant)]
AdminDep = Depends(require_admin)
