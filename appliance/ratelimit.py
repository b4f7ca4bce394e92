"""Per-client-IP rate limits in Redis (shared by every box of a fleet that shares the Redis).

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

CREATE = "create"
SIGNAL = "signal"

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


class RateLimiter:
    """GCRA limits per client IP for the ``create`` and ``signal`` buckets."""

    def __init__(self, client: aioredis.Redis, limits: LimitsConfig, prefix: str = "va:rl",
                 open_seconds: float = 2.0) -> None:
        self._redis = client
        self._open_seconds = open_seconds
        self._skip_until = 0.0
        self._per_minute = {CREATE: limits.session_creates_per_minute, SIGNAL: limits.signalling_per_minute}
        self._prefix = prefix
        self._script = client.register_script(_GCRA)
        self._last_warning = 0.0

    async def check(self, bucket: str, ip: str) -> Decision:
        """Count one request of ``bucket`` from ``ip``; refused requests do not consume quota."""
        limit = self._per_minute[bucket]
        interval_ms = max(1, 60_000 // limit)
        key = f"{self._prefix}:{bucket}:{client_key(ip)}"
        if time.monotonic() < self._skip_until:
            FAIL_OPEN.inc()
            return Decision(True)  # Redis failed a moment ago: do not make every request wait a timeout
        try:
            allowed, retry_ms = await self._script(keys=[key], args=[interval_ms, limit])
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.inc()
            FAIL_OPEN.inc()
            now = time.monotonic()
            self._skip_until = now + self._open_seconds
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("rate limiter: Redis unreachable, failing open", extra={"error": str(exc)})
            return Decision(True)
        if int(allowed):
            return Decision(True)
        REJECTIONS.labels(bucket).inc()
        return Decision(False, int(retry_ms) / 1000.0)
