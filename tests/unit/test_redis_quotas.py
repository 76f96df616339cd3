"""Tenant limits counted in a real Redis: they hold across gateways, and a dead gateway's slots come back."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from app.errors import QuotaStoreUnavailable, TooManyRequests
from app.quotas import TenantLimits
from app.redis_quotas import RedisQuotas
from tests.conftest import REDIS_URL, redis_answers

pytestmark = pytest.mark.skipif(not redis_answers(), reason="no Redis on 127.0.0.1:6379 (.ci/redis.sh starts one)")


@pytest.fixture
def gateways() -> Iterator[list[RedisQuotas]]:
    """Two gateways' counters on one Redis, under a prefix of their own (nothing left behind)."""
    prefix = f"loraplex-test:{uuid.uuid4().hex}:"
    pair = [RedisQuotas(REDIS_URL, prefix=prefix, lease_s=1.5) for _ in range(2)]
    yield pair
    for quotas in pair:
        quotas.close()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_a_concurrency_limit_holds_across_gateways_together(gateways: list[RedisQuotas]) -> None:
    a, b = gateways
    limits = TenantLimits(max_concurrent_requests=2)
    first = a.admit(1, limits)
    b.admit(1, limits)
    for gateway in (a, b):
        with pytest.raises(TooManyRequests, match=r"2 requests already in flight.*max_concurrent_requests"):
            gateway.admit(1, limits)
    b.admit(2, limits)  # another tenant is not affected
    first()
    first()  # releasing twice frees one place, not two
    b.admit(1, limits)
    with pytest.raises(TooManyRequests):
        a.admit(1, limits)
    assert a.usage(1) == (2, 0) == b.usage(1)


def test_racing_admissions_never_exceed_the_limit(gateways: list[RedisQuotas]) -> None:
    limits = TenantLimits(max_concurrent_requests=5)
    admitted, refused = [], []

    def attempt(i: int) -> None:
        try:
            admitted.append(gateways[i % 2].admit(7, limits))
        except TooManyRequests:
            refused.append(i)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(attempt, range(64)))
    assert len(admitted) == 5 and len(refused) == 59


def test_tokens_per_minute_are_shared_and_name_the_wait(gateways: list[RedisQuotas]) -> None:
    a, b = gateways
    limits = TenantLimits(tokens_per_minute=100)
    a.admit(1, limits)()
    a.charge(1, 60)
    b.admit(1, limits)()
    b.charge(1, 50)
    with pytest.raises(TooManyRequests, match=r"110 tokens used in the last minute.*tokens_per_minute") as refused:
        a.admit(1, limits)
    assert 55 <= (refused.value.retry_after or 0) <= 60  # the first charge leaves the window in about a minute
    assert b.usage(1) == (0, 110)


def test_a_dead_gateways_slots_come_back_and_a_live_ones_are_kept(gateways: list[RedisQuotas]) -> None:
    a, b = gateways
    limits = TenantLimits(max_concurrent_requests=2)
    a.admit(1, limits)  # a long request on a gateway that stays up: renewed every lease_s / 3
    b.admit(1, limits)
    b.close()  # the other gateway dies mid-request: no release, no renewal
    with pytest.raises(TooManyRequests):
        a.admit(1, limits)
    time.sleep(2.5)  # past lease_s (1.5 s) of the dead gateway's last renewal
    a.admit(1, limits)  # its slot came back; the live gateway's lease is still held
    with pytest.raises(TooManyRequests):
        a.admit(1, limits)


def test_an_unreachable_redis_admits_nothing_with_a_503() -> None:
    quotas = RedisQuotas("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        with pytest.raises(QuotaStoreUnavailable, match="quota store"):
            quotas.admit(1, TenantLimits(max_concurrent_requests=1))
    finally:
        quotas.close()


def test_a_release_racing_a_renewal_does_not_bring_the_lease_back(gateways: list[RedisQuotas]) -> None:
    a, _ = gateways
    limits = TenantLimits(max_concurrent_requests=1)
    stop = threading.Event()

    def renew_hard() -> None:
        while not stop.is_set():
            a.renew()

    renewer = threading.Thread(target=renew_hard)
    renewer.start()
    try:
        for _ in range(50):
            a.admit(3, limits)()  # admitted and released while renewals run
    finally:
        stop.set()
        renewer.join()
    assert a.usage(3) == (0, 0)
