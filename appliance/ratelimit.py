"""Abuse limits in Redis (shared by every box of a fleet that shares the Redis).

Limits follow identity (docs/security.md "Limits after identity"): one client behind a shared proxy
must not be able to lock everyone else behind it out, so

- per token ``sub`` (after the JWT or session-token check): session creates (``CREATE``), signalling
  (``SIGNAL``), and a cap on concurrent sessions (:class:`SessionCap`);
- per client IP only where there is no identity: unauthenticated paths (``ANON``) and refused
  credentials (``AUTH_FAIL``: past it the answer is 429 instead of 401, so a token-guessing client is
  slowed down without touching anyone who authenticates).

``sub`` values are hashed into the Redis keys (a sub may be personal data; Redis needs no more than a
stable name for it).

Algorithm: GCRA (generic cell rate algorithm) in one small Lua script — one key per client and
bucket holding the "theoretical arrival time". It is exact (no fixed-window double bursts at window
edges, unlike INCR+EXPIRE), stores one integer per client instead of a sorted-set log, gives a precise
Retry-After, and runs atomically on Redis's clock so boxes with skewed clocks agree. Limits of N per
minute allow a burst of N, then one request every 60/N seconds.

IPv6 clients are limited per /64 (one host usually owns a whole /64; per-address limits would be
trivial to dodge). If Redis is unreachable the limiter fails *open* — the API keeps admitting calls —
counts ``va_ratelimit_redis_errors_total`` / ``va_ratelimit_fail_open_total`` and logs a warning (at
most every 10 s); after a failure it skips Redis for ``open_seconds`` so requests do not each wait for
a connection timeout.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from appliance.config import LimitsConfig

log = logging.getLogger(__name__)

REDIS_ERRORS = Counter(
    "va_ratelimit_redis_errors_total", "Rate-limit checks that failed open because Redis was unreachable"
)
FAIL_OPEN = Counter("va_ratelimit_fail_open_total", "Requests admitted without a rate-limit check")
REJECTIONS = Counter("va_ratelimit_rejections_total", "Requests refused with 429", ["bucket"])

CREATE = "create"  # per sub
SIGNAL = "signal"  # per sub
ANON = "anon"  # per IP: unauthenticated paths
AUTH_FAIL = "auth_fail"  # per IP: refused credentials
PER_IP = frozenset({ANON, AUTH_FAIL})

# KEYS[1] = bucket key; ARGV[1] = emission interval (ms), ARGV[2] = limit (burst size).
# Returns {allowed (0/1), retry_after_ms}.
_GCRA = """
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - limit * interval
if now < allow_at then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, 0}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0  # seconds

    @property
    def retry_after_header(self) -> str:
        """Retry-After in whole seconds (at least 1 when refused)."""
        return str(max(1, math.ceil(self.retry_after)))


def client_key(ip: str) -> str:
    """The rate-limit identity of a client address: the address, or its /64 for IPv6."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:64] or "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False).network_address) + "/64"
    return str(addr)


def sub_key(sub: str) -> str:
    """The Redis name of a token subject: a short hash (stable, not the sub itself)."""
    return hashlib.sha256(sub.encode()).hexdigest()[:24]


class _FailOpen:
    """Shared fail-open bookkeeping: after a Redis error skip Redis for ``open_seconds``."""

    def __init__(self, open_seconds: float) -> None:
        self._open_seconds = open_seconds
        self._skip_until = 0.0
        self._last_warning = 0.0

    def skipping(self) -> bool:
        if time.monotonic() < self._skip_until:
            FAIL_OPEN.inc()
            return True  # Redis failed a moment ago: do not make every request wait a timeout
        return False

    def failed(self, what: str, exc: BaseException) -> None:
        REDIS_ERRORS.inc()
        FAIL_OPEN.inc()
        now = time.monotonic()
        self._skip_until = now + self._open_seconds
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning(f"{what}: Redis unreachable, failing open", extra={"error": str(exc)})


class RateLimiter:
    """GCRA limits: ``create``/``signal`` per sub, ``anon``/``auth_fail`` per client IP."""

    def __init__(self, client: aioredis.Redis, limits: LimitsConfig, prefix: str = "va:rl",
                 open_seconds: float = 2.0) -> None:
        self._redis = client
        self._open = _FailOpen(open_seconds)
        self._per_minute = {CREATE: limits.session_creates_per_minute, SIGNAL: limits.signalling_per_minute,
                            ANON: limits.unauthenticated_per_minute,
                            AUTH_FAIL: limits.auth_failures_per_minute}
        self._prefix = prefix
        self._script = client.register_script(_GCRA)

    @property
    def _skip_until(self) -> float:  # tests reset it instead of waiting open_seconds
        return self._open._skip_until

    @_skip_until.setter
    def _skip_until(self, value: float) -> None:
        self._open._skip_until = value

    async def check(self, bucket: str, who: str) -> Decision:
        """Count one request of ``bucket`` from ``who`` (a client IP for the per-IP buckets, else a
        ``sub``); refused requests do not consume quota."""
        limit = self._per_minute[bucket]
        interval_ms = max(1, 60_000 // limit)
        name = client_key(who) if bucket in PER_IP else sub_key(who)
        key = f"{self._prefix}:{bucket}:{name}"
        if self._open.skipping():
            return Decision(True)
        try:
            allowed, retry_ms = await self._script(keys=[key], args=[interval_ms, limit])
        except (RedisError, OSError) as exc:
            self._open.failed("rate limiter", exc)
            return Decision(True)
        if int(allowed):
            return Decision(True)
        REJECTIONS.labels(bucket).inc()
        return Decision(False, int(retry_ms) / 1000.0)


# KEYS[1] = the sub's lease set; ARGV[1] = member, ARGV[2] = lease (ms), ARGV[3] = cap (0 = none),
# ARGV[4] = member to replace (or ""). A member's score is its lease's expiry on Redis's clock, so a box
# that dies without releasing its sessions stops counting against the cap once their leases run out.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[1], ARGV[4]) end
if cap > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""

CAP_RETRY_AFTER_SECONDS = 30.0  # sessions end when callers hang up: no exact time to offer


class SessionCap:
    """At most ``limits.concurrent_sessions_per_sub`` live sessions per sub, fleet-wide.

    One Redis sorted set per sub of leases (member = session id, score = lease expiry). The API takes a
    *pending* lease before setup (so parallel creates cannot overshoot), turns it into the session's own
    lease on success (:meth:`confirm`) or drops it on failure; the session service renews leases of its
    live sessions (:meth:`renew`, every ``RENEW_SECONDS``) and releases them at teardown. Fails open.
    """

    LEASE_SECONDS = 120.0
    RENEW_SECONDS = 30.0

    def __init__(self, client: aioredis.Redis, limits: LimitsConfig, prefix: str = "va:cc",
                 open_seconds: float = 2.0) -> None:
        self.cap = limits.concurrent_sessions_per_sub
        self._redis = client
        self._prefix = prefix
        self._open = _FailOpen(open_seconds)
        self._script = client.register_script(_ACQUIRE)

    def _key(self, sub: str) -> str:
        return f"{self._prefix}:{sub_key(sub)}"

    async def _run(self, sub: str, member: str, lease: float, cap: int, replace: str = "") -> bool:
        if self._open.skipping():
            return True
        try:
            return bool(int(await self._script(keys=[self._key(sub)],
                                               args=[member, int(lease * 1000), cap, replace])))
        except (RedisError, OSError) as exc:
            self._open.failed("session cap", exc)
            return True

    async def acquire(self, sub: str, member: str, lease: float) -> Decision:
        """Take a lease for ``member`` unless ``sub`` already holds ``cap`` of them."""
        if self.cap <= 0:
            return Decision(True)
        if await self._run(sub, member, lease, self.cap):
            return Decision(True)
        REJECTIONS.labels("concurrent").inc()
        return Decision(False, CAP_RETRY_AFTER_SECONDS)

    async def confirm(self, sub: str, pending: str, session_id: str) -> None:
        """Replace the pending lease by the session's own (never refused: the slot was already held)."""
        if self.cap > 0:
            await self._run(sub, session_id, self.LEASE_SECONDS, 0, replace=pending)

    async def release(self, sub: str, member: str) -> None:
        if self.cap <= 0 or self._open.skipping():
            return
        try:
            await self._redis.zrem(self._key(sub), member)
        except (RedisError, OSError) as exc:
            self._open.failed("session cap", exc)

    async def renew(self, leases: list[tuple[str, str]]) -> None:
        """Extend the leases of live sessions (``(sub, session_id)`` pairs)."""
        if self.cap <= 0:
            return
        for sub, sid in leases:
            if not await self._run(sub, sid, self.LEASE_SECONDS, 0):
                return

    async def held(self, sub: str) -> int:
        """Live (unexpired) leases of ``sub`` (tests, diagnostics)."""
        now_s, now_us = await self._redis.time()
        return int(await self._redis.zcount(self._key(sub), now_s * 1000 + now_us // 1000, "+inf"))
