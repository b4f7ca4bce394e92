"""The model circuit breaker, shared by every AI worker of a box and, through Redis, by the whole fleet.

Why: without it a model outage makes every call retry Gemini on its own (a thundering herd at recovery,
quota burned meanwhile). With it, consecutive connect/setup failures (or 1011/5xx-like closes) open
the breaker; while open, new calls degrade at once without touching the model and live calls stop
retrying; after ``reset_seconds`` exactly ONE caller anywhere gets a half-open probe (a lease in Redis,
so a probe that never reports back expires after ``probe_timeout_seconds``); ``success_threshold``
good probes close it, a failed probe re-opens it. Defaults are the seed's: 3 failures, 30 s, 2 successes.

Why not pybreaker (the first choice the guide names): 1.4 has no asyncio support (danielfm/pybreaker#7;
an ``acall`` PR is unreleased), its Redis storage uses a blocking client (a stall on the AI worker's
event loop is a stall of every call's audio), and it does not coordinate the half-open trial across
processes: each process that sees the reset time pass makes its own trial call (#24 shows the shared
state's open/half-open hand-over going wrong). Here the whole transition is one Lua script, atomic in
Redis, so N workers on M boxes make one probe per reset period.

Redis unreachable: the breaker falls back to a local one with the same rules (:class:`LocalState`), so
a Redis outage never blocks a call and still stops this process's herd. The transition rules exist
twice (Lua for Redis, Python for the fallback); tests run the same cases against both.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

STATE = Gauge("va_model_breaker_state", "Model circuit breaker as last seen (0 closed, 1 half-open, 2 open)",
              ["breaker"])
TRANSITIONS = Counter("va_model_breaker_transitions_total", "Model breaker state changes made here",
                      ["breaker", "to"])
DENIED = Counter("va_model_breaker_denied_total", "Model connection attempts the open breaker refused",
                 ["breaker"])
_CODES = {"closed": 0, "half_open": 1, "open": 2}


class Decision(enum.Enum):
    ALLOW = "allow"  # closed: go ahead
    PROBE = "probe"  # half-open: you are the one trial; report the outcome with probe=True
    DENY = "deny"  # open: do not touch the model, degrade


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 3
    reset_seconds: float = 30.0
    success_threshold: int = 2
    probe_timeout_seconds: float = 15.0


# KEYS[1] = hash; ARGV: op ("allow" | "ok" | "fail"), now, fail_max, reset, succ_max, probe_timeout, probe_id
# Returns {decision_or_state, state, transitioned_to_or_empty}
_LUA = """
local k = KEYS[1]
local op, now = ARGV[1], tonumber(ARGV[2])
local fail_max, reset, succ_max, ptimeout = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local pid = ARGV[7]
local st = redis.call('HGET', k, 'state') or 'closed'
local fails = tonumber(redis.call('HGET', k, 'fails') or '0')
local succ = tonumber(redis.call('HGET', k, 'succ') or '0')
local opened = tonumber(redis.call('HGET', k, 'opened') or '0')
local lease = tonumber(redis.call('HGET', k, 'lease') or '0')
local holder = redis.call('HGET', k, 'holder') or ''
local moved = ''
local function to(s)
  if s ~= st then moved = s end
  st = s
end
local out = 'allow'
if op == 'allow' then
  if st == 'open' and now - opened >= reset then
    to('half_open'); succ = 0; lease = 0
  end
  if st == 'open' then
    out = 'deny'
  elseif st == 'half_open' then
    if lease <= now then
      lease = now + ptimeout; holder = pid; out = 'probe'
    else
      out = 'deny'
    end
  end
elseif op == 'fail' then
  if st == 'half_open' then
    if holder == pid or lease <= now then
      to('open'); opened = now; succ = 0; lease = 0; holder = ''
    end
  elseif st == 'closed' then
    fails = fails + 1
    if fails >= fail_max then to('open'); opened = now; fails = 0 end
  end
  out = st
elseif op == 'ok' then
  if st == 'half_open' and holder == pid then
    succ = succ + 1; lease = 0; holder = ''
    if succ >= succ_max then to('closed'); fails = 0; succ = 0 end
  elseif st == 'closed' then
    fails = 0
  end
  out = st
end
redis.call('HSET', k, 'state', st, 'fails', fails, 'succ', succ, 'opened', opened, 'lease', lease,
  'holder', holder)
redis.call('PEXPIRE', k, 86400000)
return {out, st, moved}
"""


class LocalState:
    """The same rules as the Lua script, in-process (Redis unreachable, or no Redis at all)."""

    def __init__(self) -> None:
        self.state, self.fails, self.succ, self.opened, self.lease, self.holder = "closed", 0, 0, 0.0, 0.0, ""

    def apply(self, op: str, now: float, s: BreakerSettings, pid: str) -> tuple[str, str, str]:
        moved = ""

        def to(new: str) -> None:
            nonlocal moved
            if new != self.state:
                moved = new
            self.state = new

        out = "allow"
        if op == "allow":
            if self.state == "open" and now - self.opened >= s.reset_seconds:
                to("half_open")
                self.succ, self.lease = 0, 0.0
            if self.state == "open":
                out = "deny"
            elif self.state == "half_open":
                if self.lease <= now:
                    self.lease, self.holder, out = now + s.probe_timeout_seconds, pid, "probe"
                else:
                    out = "deny"
        elif op == "fail":
            if self.state == "half_open":
                if self.holder == pid or self.lease <= now:
                    to("open")
                    self.opened, self.succ, self.lease, self.holder = now, 0, 0.0, ""
            elif self.state == "closed":
                self.fails += 1
                if self.fails >= s.failure_threshold:
                    to("open")
                    self.opened, self.fails = now, 0
            out = self.state
        elif op == "ok":
            if self.state == "half_open" and self.holder == pid:
                self.succ, self.lease, self.holder = self.succ + 1, 0.0, ""
                if self.succ >= s.success_threshold:
                    to("closed")
                    self.fails = self.succ = 0
            elif self.state == "closed":
                self.fails = 0
            out = self.state
        return out, self.state, moved


class Breaker:
    """One breaker (e.g. per model endpoint). ``redis`` None = local only."""

    def __init__(self, name: str, settings: BreakerSettings, redis: aioredis.Redis | None,
                 *, prefix: str = "va:", clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.settings = settings
        self.redis = redis
        self.key = f"{prefix}breaker:{name}"
        self.clock = clock
        self.local = LocalState()
        self.state = "closed"  # as last seen
        self._script = redis.register_script(_LUA) if redis is not None else None

    async def _apply(self, op: str, probe_id: str) -> str:
        s = self.settings
        now = self.clock()
        result: tuple[str, str, str] | None = None
        if self._script is not None:
            try:
                raw = await self._script(keys=[self.key], args=[op, now, s.failure_threshold, s.reset_seconds,
                                                                 s.success_threshold, s.probe_timeout_seconds,
                                                                 probe_id])
                out, st, moved = (x.decode() if isinstance(x, bytes) else str(x) for x in raw)
                result = (out, st, moved)
            except (RedisError, OSError) as exc:
                log.warning("breaker state in Redis unavailable, using the local breaker",
                            extra={"breaker": self.name, "error": type(exc).__name__})
        if result is None:
            result = self.local.apply(op, now, s, probe_id)
        out, st, moved = result
        self.state = st
        STATE.labels(self.name).set(_CODES.get(st, 0))
        if moved:
            TRANSITIONS.labels(self.name, moved).inc()
            log.info("model breaker %s", moved, extra={"breaker": self.name})
        return out

    async def allow(self) -> tuple[Decision, str]:
        """Ask before connecting. Returns the decision and a probe id to hand back to :meth:`record`."""
        probe_id = secrets.token_hex(8)
        decision = Decision(await self._apply("allow", probe_id))
        if decision is Decision.DENY:
            DENIED.labels(self.name).inc()
        return decision, probe_id

    async def record(self, ok: bool, probe_id: str = "") -> None:
        """Report a connect/setup outcome (``probe_id`` from :meth:`allow` when it was a probe)."""
        await self._apply("ok" if ok else "fail", probe_id)


def breaker_settings(cfg: Any) -> BreakerSettings:
    b = cfg.breaker
    return BreakerSettings(b.failure_threshold, b.reset_seconds, b.success_threshold, b.probe_timeout_seconds)


def model_breakers(cfg: Any) -> Callable[[str], Breaker] | None:
    """One breaker per model name (``model_breaker_name``; routing reads the primary's), from ``[breaker]``,
    their state in the session Redis; None when disabled."""
    if not cfg.breaker.enabled:
        return None
    from appliance.state import redis_client

    try:
        client: aioredis.Redis | None = redis_client(cfg.redis)
    except Exception as exc:  # a bad Redis config must not stop calls: the local breaker still works
        log.warning("model breaker without Redis (local only)", extra={"error": str(exc)})
        client = None
    settings = breaker_settings(cfg)
    made: dict[str, Breaker] = {}

    def for_model(model: str) -> Breaker:
        if model not in made:
            made[model] = Breaker(model_breaker_name(model), settings, client)
        return made[model]

    return for_model


def model_breaker_name(model: str) -> str:
    """The breaker of one model (routing asks the primary's; docs/architecture.md "Model routing")."""
    return f"model:{model}"


async def peek(breaker: Breaker) -> str:
    """The breaker's state without taking part (no probe lease, no counters): "closed", "open" (new
    calls must not go there) or "half_open" (the reset period has passed and no probe holds the lease,
    so the next call there would be the probe). Redis unreachable: the local state."""
    now = breaker.clock()
    st, opened, lease = breaker.local.state, breaker.local.opened, breaker.local.lease
    if breaker.redis is not None:
        try:
            raw = await breaker.redis.hmget(breaker.key, ["state", "opened", "lease"])
            vals = [x.decode() if isinstance(x, bytes) else x for x in raw]
            st = vals[0] or "closed"
            opened, lease = float(vals[1] or 0), float(vals[2] or 0)
        except (RedisError, OSError, ValueError):
            pass
    if st == "open":
        return "open" if now - opened < breaker.settings.reset_seconds else "half_open"
    if st == "half_open":
        return "open" if lease > now else "half_open"
    return "closed"
