"""Per-tenant limits counted in Redis, so that they hold across every gateway replica together.

Each tenant has two sorted sets: its requests in flight (member: a lease id, score: when the
lease expires) and the tokens charged in the last minute (member: `id:tokens`, score: when).
Admission is one Lua script: it drops expired leases and old charges, checks both limits and
adds the lease, atomically, on Redis's own clock (the gateways' clocks never meet). A gateway
renews the leases of its requests every third of their lifetime; if it dies mid-request its
leases expire and the tenant gets its slots back within `lease_s`.

If Redis cannot be reached, nothing is admitted (503): a limit that cannot be checked is not
silently lifted for every gateway at once.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable

import redis

from app.errors import QuotaStoreUnavailable, TooManyRequests
from app.quotas import WINDOW_S, TenantLimits

log = logging.getLogger(__name__)

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
_TOKENS_USED = """
local used, oldest = 0, -1
local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  used = used + tonumber(string.match(entries[i], ':(%d+)$'))
  if oldest < 0 then oldest = tonumber(entries[i + 1]) end
end
"""
# KEYS: in-flight set, tokens set. ARGV: cap (-1: none), tokens per minute (-1: none), lease id,
# lease ms, window ms. Returns {0, in flight} admitted, {1, in flight} or {2, used, ms to wait}.
_ADMIT = _NOW + """
local cap, tpm, lease, lease_ms, window = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]),
  tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local inflight = redis.call('ZCARD', KEYS[1])
if cap >= 0 and inflight >= cap then return {1, inflight} end
if tpm >= 0 then
""" + _TOKENS_USED + """
  if used >= tpm then return {2, used, oldest + window - now} end
end
redis.call('ZADD', KEYS[1], now + lease_ms, lease)
redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
return {0, inflight + 1}
"""
# KEYS: one tenant's in-flight set. ARGV[1]: lease ms, ARGV[2..]: its leases; only those still held are renewed.
_RENEW = _NOW + """
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 0
"""
# KEYS: tokens set. ARGV: member (id:tokens), window ms.
_CHARGE = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 0
"""
# KEYS: in-flight set, tokens set. ARGV: window ms. Returns {in flight, tokens in the window}.
_USAGE = _NOW + """
local window = tonumber(ARGV[1])
local inflight = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
""" + _TOKENS_USED + """
return {inflight, used}
"""


class RedisQuotas:
    def __init__(self, url: str, *, lease_s: float = 30.0, prefix: str = "loraplex:quota:") -> None:
        # Short timeouts: admission runs on the request path, and a Redis that does not answer is a 503.
        self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._lease_ms = int(lease_s * 1000)
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._renew = self._redis.register_script(_RENEW)
        self._charge = self._redis.register_script(_CHARGE)
        self._usage = self._redis.register_script(_USAGE)
        self._held: dict[str, str] = {}  # lease id -> its in-flight key, renewed while held
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="quota-leases", daemon=True)
        self._renewer.start()

    def _keys(self, tenant_id: int) -> tuple[str, str]:
        base = f"{self._prefix}{{tenant:{tenant_id}}}:"  # one hash slot per tenant: scripts work on a Redis Cluster
        return base + "inflight", base + "tokens"

    def admit(self, tenant_id: int, limits: TenantLimits) -> Callable[[], None]:
        """Count one request in flight across all gateways, or refuse with 429; returns the release."""
        inflight_key, tokens_key = self._keys(tenant_id)
        lease = uuid.uuid4().hex
        cap = limits.max_concurrent_requests if limits.max_concurrent_requests is not None else -1
        tpm = limits.tokens_per_minute if limits.tokens_per_minute is not None else -1
        try:
            answer = self._admit(keys=[inflight_key, tokens_key],
                                 args=[cap, tpm, lease, self._lease_ms, int(WINDOW_S * 1000)])
        except redis.RedisError as exc:
            raise QuotaStoreUnavailable(f"the quota store (Redis) cannot be reached: {exc}") from None
        outcome = [int(x) for x in answer]
        if outcome[0] == 1:
            raise TooManyRequests(
                f"{outcome[1]} requests already in flight, the tenant's limit (max_concurrent_requests)", retry_after=1)
        if outcome[0] == 2:
            raise TooManyRequests(
                f"{outcome[1]} tokens used in the last minute, at the tenant's limit of {tpm} (tokens_per_minute)",
                retry_after=max(1, math.ceil(outcome[2] / 1000)))
        with self._lock:
            self._held[lease] = inflight_key
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._held.pop(lease, None)
            try:
                self._redis.zrem(inflight_key, lease)
            except redis.RedisError:  # the lease expires by itself within lease_s
                log.warning("could not release a quota lease in Redis; it expires on its own")

        return release

    def usage(self, tenant_id: int) -> tuple[int, int]:
        inflight, used = self._usage(keys=list(self._keys(tenant_id)), args=[int(WINDOW_S * 1000)])
        return int(inflight), int(used)

    def charge(self, tenant_id: int, tokens: int) -> None:
        try:
            self._charge(keys=[self._keys(tenant_id)[1]], args=[f"{uuid.uuid4().hex}:{tokens}",
                                                                 int(WINDOW_S * 1000)])
        except redis.RedisError:  # after the answer: the request is not failed for it
            log.warning("could not charge %d tokens to tenant %d in Redis", tokens, tenant_id)

    def renew(self) -> None:
        """Extend every lease this gateway holds (the renewer thread calls it every lease_s / 3)."""
        by_key: dict[str, list[str]] = {}
        with self._lock:
            for lease, key in self._held.items():
                by_key.setdefault(key, []).append(lease)
        if not by_key:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, leases in by_key.items():
            self._renew(keys=[key], args=[self._lease_ms, *leases], client=pipe)
        pipe.execute()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._lease_ms / 3000):
            try:
                self.renew()
            except redis.RedisError:
                log.warning("could not renew quota leases in Redis; retrying")

    def close(self) -> None:
        """Stop renewing (the leases still held expire on their own) and close the connection."""
        self._stop.set()
        self._renewer.join(5)  # a renewal in flight finishes before its connection closes under it
        self._redis.close()
