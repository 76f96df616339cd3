"""Per-tenant limits: concurrent generation requests and tokens per minute.

`RequestQuotas` counts in this gateway process (one gateway: the embedded default).
`RedisQuotas` (app/redis_quotas.py, with LORAPLEX_REDIS_URL) counts in Redis, so that limits
hold across all gateway replicas together. Both answer to the same three calls.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, Field

from adapters.models import Tenant
from adapters.registry import StorageQuota
from app.errors import TooManyRequests
from app.settings import Settings

WINDOW_S = 60.0


class TenantLimits(BaseModel):
    """A tenant's limits; a missing value means the service-wide default."""

    max_concurrent_requests: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_adapters: int | None = Field(default=None, ge=0)
    max_adapter_bytes: int | None = Field(default=None, ge=0)


def effective_limits(tenant: Tenant, settings: Settings) -> TenantLimits:
    return TenantLimits(
        max_concurrent_requests=tenant.max_concurrent_requests or settings.tenant_max_concurrent_requests,
        tokens_per_minute=tenant.tokens_per_minute or settings.tenant_tokens_per_minute,
        max_adapters=tenant.max_adapters if tenant.max_adapters is not None else settings.tenant_max_adapters,
        max_adapter_bytes=tenant.max_adapter_bytes
        if tenant.max_adapter_bytes is not None
        else settings.tenant_max_adapter_bytes,
    )


def storage_quota(tenant: Tenant, settings: Settings) -> StorageQuota:
    limits = effective_limits(tenant, settings)
    assert limits.max_adapters is not None and limits.max_adapter_bytes is not None
    return StorageQuota(limits.max_adapters, limits.max_adapter_bytes)


@dataclass
class _Usage:
    in_flight: int = 0
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens) in the last minute


class Quotas(Protocol):
    def admit(self, tenant_id: int, limits: TenantLimits) -> Callable[[], None]:
        """Count one request in flight, or refuse with 429; returns the release (call once)."""
        ...

    def usage(self, tenant_id: int) -> tuple[int, int]:
        """(requests in flight, tokens charged in the last minute) for one tenant."""
        ...

    def charge(self, tenant_id: int, tokens: int) -> None: ...


class QuotaLease:
    """One request's hold on its tenant's concurrency, and the tokens it is charged. Settled once,
    however the request ends (finished, failed, or the client gone): the tokens generated so far
    are charged and the concurrency slot is freed."""

    def __init__(self, quotas: Quotas, tenant_id: int, limits: TenantLimits) -> None:
        self._quotas, self._tenant_id = quotas, tenant_id
        self._release = quotas.admit(tenant_id, limits)  # 429 here, before any response starts
        self.tokens = 0
        self._settled = False

    def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        if self.tokens:
            self._quotas.charge(self._tenant_id, self.tokens)
        self._release()


class RequestQuotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[int, _Usage] = {}

    def admit(self, tenant_id: int, limits: TenantLimits) -> Callable[[], None]:
        """Count one request in flight, or refuse with 429; returns the release (call once)."""
        with self._lock:
            usage = self._usage.setdefault(tenant_id, _Usage())
            now = self._clock()
            while usage.tokens and usage.tokens[0][0] <= now - WINDOW_S:
                usage.tokens.popleft()
            cap = limits.max_concurrent_requests
            if cap is not None and usage.in_flight >= cap:
                raise TooManyRequests(
                    f"{usage.in_flight} requests already in flight, the tenant's limit (max_concurrent_requests)",
                    retry_after=1,
                )
            tpm = limits.tokens_per_minute
            used = sum(n for _, n in usage.tokens)
            if tpm is not None and used >= tpm:
                wait = usage.tokens[0][0] + WINDOW_S - now
                raise TooManyRequests(
                    f"{used} tokens used in the last minute, at the tenant's limit of {tpm} (tokens_per_minute)",
                    retry_after=max(1, math.ceil(wait)),
                )
            usage.in_flight += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                usage.in_flight -= 1

        return release

    def usage(self, tenant_id: int) -> tuple[int, int]:
        """(requests in flight, tokens charged in the last minute) for one tenant."""
        with self._lock:
            usage = self._usage.get(tenant_id, _Usage())
            now = self._clock()
            return usage.in_flight, sum(n for when, n in usage.tokens if when > now - WINDOW_S)

    def charge(self, tenant_id: int, tokens: int) -> None:
        with self._lock:
            self._usage.setdefault(tenant_id, _Usage()).tokens.append((self._clock(), tokens))
