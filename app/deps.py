"""The gateway's services and the typed dependencies routes declare."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from adapters.bases import BaseCheckpoints
from adapters.finetuning import FineTuningJobs, TrainingFiles
from adapters.jobs import JobStore
from adapters.models import Tenant
from adapters.registry import AdapterRegistry
from app.auth import TenantService, is_admin_key
from app.errors import Forbidden, Unauthorized
from app.gate import Principal, Refusal
from app.metrics import TenantLabels
from app.quotas import Quotas
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
    quotas: Quotas
    tenant_labels: TenantLabels
    jobs: JobStore
    base_models: BaseCheckpoints
    training_files: TrainingFiles
    finetune_jobs: FineTuningJobs


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _principal(request: Request) -> Principal:
    # Set by the request gate, which refuses a missing or invalid key before the body is read.
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return principal


def require_tenant(request: Request) -> Tenant:
    principal = _principal(request)
    if principal.tenant is None:
        raise Forbidden("the admin key cannot act as a tenant; create a tenant and use its key")
    return principal.tenant


def require_admin(request: Request) -> None:
    if not _principal(request).admin:
        raise Forbidden("this route needs the admin key")


def principal_for(services: Services) -> Callable[[str], Awaitable[Principal]]:
    """The request gate's authenticator: the admin key, or an active tenant's unrevoked key."""

    async def authenticate(key: str) -> Principal:
        if is_admin_key(key, services.admin_key):
            return Principal(admin=True)
        tenant = await run_in_threadpool(services.tenants.authenticate, key)
        if tenant is None:
            raise Refusal(401, "unauthorized", "invalid or revoked API key")
        if tenant.suspended_at is not None:
            raise Refusal(403, "forbidden", "the tenant is suspended; ask the service's operators")
        return Principal(admin=False, tenant=tenant)

    return authenticate


TenantDep = Annotated[Tenant, Depends(require_tenant)]
AdminDep = Depends(require_admin)
