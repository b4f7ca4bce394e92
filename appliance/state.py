"""Session state in Redis (redis-py asyncio), built so a Redis outage never drops a call.

One JSON value per session (``va:session:<id>``) plus a resume index (``va:resume:<sha256(token)>`` →
id). A whole-record value, not a hash, because only the owning box writes a record and a record is
small (< 1 KB): every write is an idempotent full snapshot, which is what makes queued catch-up
simple and correct.

- TTL: ``redis.active_ttl_seconds`` (1 h) while a call is up, ``redis.disconnected_ttl_seconds``
  (5 min) after it disconnects — the window in which a caller may resume, on this box or another one.
- Resume tokens are 256-bit random strings given to the caller once; only their SHA-256 is stored
  (a Redis dump or replica must not let anyone take over calls). A slow salted hash buys nothing for
  tokens with 256 bits of entropy. :meth:`SessionStore.claim` swaps the token atomically (WATCH/MULTI), so
  a token resumes a call exactly once; a spent token leaves a marker (``va:spent:<hash>``, 1 h).
- Ownership (docs/architecture.md "Fleet: session ids and ownership"): a record names its owner box
  and an ownership epoch. Every write is a compare-and-set in one Lua script: it lands only while the
  record in Redis still names this box with an epoch no newer than ours (or is absent and its token is
  not spent). A box that finds it lost a session (a write refused, or :meth:`SessionStore.lost_of`)
  drops everything it had queued for it — its writes are never replayed — and tells its owner
  (``on_lost``), which ends the call's leg here.
- Redis briefly unreachable: the store keeps a write-through cache of this box's sessions; a failed
  write marks the session dirty and a background task retries with backoff, then writes the latest
  snapshot of every dirty session (coalesced, so a long outage costs one write per session). While it
  is degraded new writes go straight to the queue, so API requests do not each wait for a timeout.
  Reads fall back to the cache. When Redis answers again every cached session is re-written, so writes
  a failed primary acknowledged but never replicated (Sentinel failover) are not lost either.
  ``va_state_pending_writes`` and ``va_state_redis_errors_total`` show it.
- Redis is found directly (``redis.url``) or through Sentinel (``redis.sentinels``): one factory,
  :func:`redis_client`, for every Redis user of the appliance (the rate limiter too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from appliance.config import BOX_ID_RE, RedisConfig, secret

log = logging.getLogger(__name__)

PENDING = Gauge("va_state_pending_writes", "Session-state writes queued while Redis is unreachable")
REDIS_ERRORS = Counter("va_state_redis_errors_total", "Session-state Redis operations that failed")
LOST = Counter("va_state_ownership_lost_total",
               "Sessions this box stopped writing because another box took them over")

ACTIVE, DISCONNECTED, ENDED = "active", "disconnected", "ended"
MIGRATING = "migrating"  # the box asked the caller to resume elsewhere (drain + force-migrate)
MOVED = "moved"  # resumed on another box under a new id (``moved_to``); kept as a tombstone
CLAIMABLE = (ACTIVE, DISCONNECTED, MIGRATING)


class StateUnavailable(RuntimeError):
    """Redis cannot be reached and the operation needs it (e.g. taking over another box's session)."""


def new_session_id(box: str) -> str:
    """A fresh, unguessable session id that names its box: ``<box>.<random>`` (``.`` is not in the random
    part, so the load balancer can split on it)."""
    return f"{box}.{secrets.token_urlsafe(16)}"


def box_of(session_id: str) -> str | None:
    """The box a session id names, or None (a malformed or pre-fleet ``s_…`` id)."""
    box, dot, rest = session_id.partition(".")
    return box if dot and rest and BOX_ID_RE.match(box) else None


def new_resume_token() -> str:
    """A fresh resume token (256 bits); give it to the caller, store only :func:`hash_token`."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def redis_client(cfg: RedisConfig, timeout: float = 0.5) -> aioredis.Redis:
    """The appliance's Redis client: ``redis.url``, or the master that ``redis.sentinels`` name.

    Short timeouts and no built-in retries: the callers here decide what a failure means (the store
    queues, the limiter fails open). Through Sentinel the pool asks the Sentinels for the master's
    address on every new connection, so after a failover the next attempt reaches the new primary.
    Credentials: ``redis.username`` + ``redis.password_file`` (a systemd credential); TLS with
    ``redis.tls`` / ``redis.ca_file`` for the data nodes and the Sentinels alike.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 10,
    }
    password = secret("", cfg.password_file)
    if cfg.username:
        kwargs["username"] = cfg.username
    if password:
        kwargs["password"] = password
    tls: dict[str, Any] = {}
    if cfg.tls:
        tls = {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": cfg.ca_file or None}
    if not cfg.sentinels:
        url = cfg.url
        if cfg.tls:  # from_url picks the TLS connection class by scheme, not by an ``ssl`` argument
            url = "rediss://" + url.removeprefix("redis://").removeprefix("rediss://")
            tls.pop("ssl")
        return aioredis.from_url(url, **kwargs, **tls)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                       "retry": Retry(NoBackoff(), 0), **tls}
    if cfg.sentinel_username:
        sentinel_kwargs["username"] = cfg.sentinel_username
    sentinel_password = secret("", cfg.sentinel_password_file)
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    nodes = [(h, int(p)) for h, _, p in (a.rpartition(":") for a in cfg.sentinels)]
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(cfg.sentinel_master, **kwargs, **tls)


@dataclass
class SessionRecord:
    """Everything needed to find, tear down or resume one call (on this box or another)."""

    session_id: str
    sub: str
    state: str = ACTIVE
    mode: str = "direct"
    box: str = ""  # the owning box (api.box_id): the only one that may write this record
    epoch: int = 1  # ownership epoch: +1 at every claim; a write never lowers it
    shard: int = -1
    slot: int = -1
    generation: int = 0
    janus_session_id: int | None = None
    janus_handle_id: int | None = None
    janus_room_handle_id: int | None = None  # room mode: the worker's AudioBridge handle
    room_id: int | None = None
    voice: str = ""
    language: str = ""
    tenant: str = ""  # [tenants.<name>] the caller's token named; "" = the default tenant
    model: str = ""  # the model routing chose for this call (kept across resumes)
    resume_token_hash: str = ""
    resume_handle: str = ""
    last_transcript: str = ""
    resumed_from: str = ""  # the id this session had on the box it was resumed from
    moved_to: str = ""  # state "moved": the id it continues under on its new box
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    disconnected_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionRecord:
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_FIELDS = {f.name for f in dataclasses.fields(SessionRecord)} - {"session_id", "epoch", "box"}

# The compare-and-set write. KEYS[1] is the record; then, each only if its ARGV[7] flag is '1' (an ACL
# limited to the prefix refuses any other key name, even an empty one): its resume index, the spent
# marker of its token, a replaced token's index to delete, that token's spent marker to set.
# ARGV: 1 box, 2 epoch, 3 JSON ('' = delete), 4 TTL seconds, 5 session id, 6 spent-marker TTL, 7 flags.
# Returns {1} when written, {0, owner, epoch} when another box (or a newer epoch) owns the record.
# A record without an owner (box '', written before ownership existed) belongs to whoever writes it.
_PUT = """
local n = 1
local function opt(i)
  if string.sub(ARGV[7], i, i) == '1' then n = n + 1; return KEYS[n] end
  return nil
end
local idx, spent, old_idx, old_spent = opt(1), opt(2), opt(3), opt(4)
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' then
    local epoch = tonumber(rec['epoch']) or 0
    local owner = rec['box']
    if (owner ~= '' and owner ~= ARGV[1]) or epoch > tonumber(ARGV[2]) then
      return {0, tostring(owner), tostring(epoch)}
    end
  end
elseif spent and redis.call('EXISTS', spent) == 1 then
  return {0, '', '-1'}
end
if old_idx then redis.call('DEL', old_idx) end
if old_spent then redis.call('SET', old_spent, '1', 'EX', ARGV[6]) end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  if idx then redis.call('DEL', idx) end
  return {1}
end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
if idx then redis.call('SET', idx, ARGV[5], 'EX', ARGV[4]) end
return {1}
"""


def _optional_keys(*keys: str) -> tuple[list[str], str]:
    """The present keys of ``keys`` and the ARGV flags string saying which they were."""
    return [k for k in keys if k], "".join("1" if k else "0" for k in keys)


# Which of the records KEYS[i] no longer belong to ARGV[1] (box) at epoch ARGV[i+1]: their indexes.
# A missing record is not lost (Redis lost data, or it expired): the next write re-creates it.
# The plain-text find is the fast path (records are written with "box" then "epoch", by
# SessionRecord.to_json); only a record that does not match it is decoded.
_LOST = """
local out = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  local mine = '"box":' .. cjson.encode(ARGV[1]) .. ',"epoch":' .. ARGV[i + 1] .. ','
  if cur and not string.find(cur, mine, 1, true) then
    local ok, rec = pcall(cjson.decode, cur)
    if ok and type(rec) == 'table' and
       (rec['box'] ~= ARGV[1] or (tonumber(rec['epoch']) or 0) > tonumber(ARGV[i + 1])) then
      out[#out + 1] = i
    end
  end
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    """Session records in Redis with a local write-through cache, queued catch-up and owner CAS."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        active_ttl: int = 3600,
        disconnected_ttl: int = 300,
        prefix: str = "va",
        max_backoff: float = 2.0,
        wait_replicas: bool = False,
    ) -> None:
        self._redis = client
        self.active_ttl = active_ttl
        self.disconnected_ttl = disconnected_ttl
        self._prefix = prefix
        self._max_backoff = max_backoff
        self._wait_replicas = wait_replicas
        self._put = client.register_script(_PUT)
        self._lost_script = client.register_script(_LOST)
        self._cache: dict[str, SessionRecord] = {}
        self._tombstones: dict[str, SessionRecord | None] = {}  # deleted id -> the record to remove
        self._spent: dict[str, str] = {}  # session id -> resume hash replaced offline, index to remove
        self._dirty: dict[str, None] = {}  # ordered set of session ids with unwritten changes
        self._inflight: set[str] = set()
        self._degraded = False
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._last_warning = 0.0
        self.on_lost: Callable[[str, str], None] | None = None  # (session id, new owner box)

    @classmethod
    def from_config(cls, cfg: RedisConfig, client: aioredis.Redis | None = None) -> SessionStore:
        return cls(
            client or redis_client(cfg),
            active_ttl=cfg.active_ttl_seconds,
            disconnected_ttl=cfg.disconnected_ttl_seconds,
            wait_replicas=bool(cfg.sentinels),
        )

    # -- keys -------------------------------------------------------------------------------------
    def _k_rec(self, sid: str) -> str:
        return f"{self._prefix}:session:{sid}"

    def _k_resume(self, token_hash: str) -> str:
        return f"{self._prefix}:resume:{token_hash}"

    def _k_spent(self, token_hash: str) -> str:
        return f"{self._prefix}:spent:{token_hash}"

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background catch-up task (idempotent)."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="session-store-flusher")

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Try once more to write what is queued, then stop the background task."""
        if self._dirty:
            self._kick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_caught_up(), flush_timeout)
        if self._flusher:
            flusher, self._flusher = self._flusher, None
            flusher.cancel()
            try:
                await flusher
            except asyncio.CancelledError:
                # the flusher's own cancellation is expected; ours (the caller was cancelled while
                # waiting) must propagate, or a cancelled shutdown carries on as if nothing happened
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    @property
    def pending(self) -> int:
        """Sessions whose latest state has not reached Redis yet (queued, or being written right now)."""
        return len(self._dirty.keys() | self._inflight)

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def _wait_caught_up(self) -> None:
        while self._dirty:  # noqa: ASYNC110 - shutdown path only; an Event per write costs more
            await asyncio.sleep(0.02)

    # -- writes -----------------------------------------------------------------------------------
    async def create(self, record: SessionRecord) -> str:
        """Store a new session; returns its resume token (shown to the caller once, stored hashed)."""
        token = new_resume_token()
        record.resume_token_hash = hash_token(token)
        record.updated_at = time.time()
        self._cache[record.session_id] = record
        await self._write(record.session_id)
        return token

    async def update(self, session_id: str, **fields: Any) -> SessionRecord:
        """Change some fields of a session this box owns (ids, Janus ids, resume handle, transcript…).

        Raises KeyError for a session this box does not hold (unknown, or lost to another box).
        """
        unknown = set(fields) - _FIELDS
        if unknown:
            raise TypeError(f"unknown session fields: {', '.join(sorted(unknown))}")
        record = self._cache.get(session_id)
        if record is None:  # only a session created or claimed here: never adopt one from Redis
            raise KeyError(session_id)
        for key, value in fields.items():
            setattr(record, key, value)
        record.updated_at = time.time()
        await self._write(session_id)
        return record

    async def adopt(self, session_id: str, box: str) -> SessionRecord | None:
        """Hold again a record this box owns in Redis (a restarted supervisor adopting a live call).

        Returns None unless the record exists, names ``box`` and is active or migrating: a call that
        moved, ended or expired while no supervisor ran is not adopted. Redis errors propagate."""
        record = await self._load(session_id)
        if record is None or record.box != box or record.state not in (ACTIVE, MIGRATING):
            return None
        self._cache[session_id] = record
        return dataclasses.replace(record)

    async def mark_disconnected(self, session_id: str) -> SessionRecord:
        """The caller is gone (ICE failed, hangup): keep the record for the resume window only."""
        return await self.update(session_id, state=DISCONNECTED, disconnected_at=time.time())

    async def mark_active(self, session_id: str) -> SessionRecord:
        return await self.update(session_id, state=ACTIVE, disconnected_at=None)

    async def begin_migration(self, session_id: str) -> str:
        """Force-migrate: state ``migrating`` with a fresh resume token (returned; the old one is spent).

        The caller learns the token from ``GET /v1/sessions/{id}`` and resumes on another box.
        """
        record = self._cache.get(session_id)
        if record is None:
            raise KeyError(session_id)
        token = new_resume_token()
        if record.resume_token_hash:
            self._spent[session_id] = record.resume_token_hash
        record.resume_token_hash = hash_token(token)
        record.state, record.updated_at = MIGRATING, time.time()
        await self._write(session_id)
        return token

    async def refresh_active(self) -> int:
        """Re-write every cached active session (extends the 1 h TTL of long calls); returns the count."""
        sids = [sid for sid, rec in self._cache.items() if rec.state in (ACTIVE, MIGRATING)]
        for sid in sids:
            await self._write(sid)
        return len(sids)

    async def delete(self, session_id: str) -> None:
        """Forget a session everywhere (after teardown)."""
        record = self._cache.pop(session_id, None)
        if record is None:
            with contextlib.suppress(RedisError, OSError):
                record = await self._load(session_id)
        self._tombstones[session_id] = record
        await self._write(session_id)

    def owns(self, session_id: str) -> bool:
        """True while this box holds the session (created or claimed here, not lost since)."""
        return session_id in self._cache

    # -- reads ------------------------------------------------------------------------------------
    async def get(self, session_id: str) -> SessionRecord | None:
        """The session's record: from Redis, or this box's cache when Redis is unreachable."""
        if session_id in self._tombstones:
            return None
        if self._degraded or session_id in self._dirty:
            cached = self._cache.get(session_id)
            if cached is not None:
                return dataclasses.replace(cached)
        try:
            record = await self._load(session_id)
        except (RedisError, OSError) as exc:
            self._on_error(exc)
            cached = self._cache.get(session_id)
            return dataclasses.replace(cached) if cached else None
        return record

    def _cached_by_hash(self, token_hash: str) -> SessionRecord | None:
        for record in self._cache.values():
            if record.resume_token_hash and hmac.compare_digest(record.resume_token_hash, token_hash):
                return record
        return None

    async def find_by_resume_token(self, token: str) -> SessionRecord | None:
        """The session a resume token belongs to (without claiming it), or None.

        With Redis unreachable only this box's own sessions can be found.
        """
        token_hash = hash_token(token)
        try:
            return await self._find_by_hash(token_hash)
        except (RedisError, OSError) as exc:
            self._on_error(exc)
            cached = self._cached_by_hash(token_hash)
            return dataclasses.replace(cached) if cached else None

    async def _find_by_hash(self, token_hash: str) -> SessionRecord | None:
        sid = await self._redis.get(self._k_resume(token_hash))
        if sid is None:
            return None
        record = await self._load(_text(sid))
        if record is None or record.state not in CLAIMABLE or not hmac.compare_digest(
                record.resume_token_hash, token_hash):
            return None
        return record

    async def claim(self, token: str, box: str,
                    new_id: str | None = None) -> tuple[SessionRecord, str] | None:
        """Atomically take over the session of ``token`` for ``box``: returns (record, new token) or None.

        The old token stops working at once (and stays dead: a spent marker refuses any write that
        would index it again), so a token resumes a call exactly once even if two boxes race for it.
        ``new_id``: the session moves to a new id that names ``box`` (a resume on another box); the old
        record becomes a ``moved`` tombstone owned by ``box`` (so the old box's writes are refused)
        pointing at the new id. Without it the id stays and the ownership epoch goes up.

        With Redis unreachable, a session of this box can still be resumed here under its own id (the
        swap is queued like any other write); other boxes' sessions cannot (:class:`StateUnavailable`).
        """
        token_hash = hash_token(token)
        if self._degraded:
            return await self._claim_offline(token_hash, box, new_id)
        try:
            return await self._claim_redis(token_hash, box, new_id)
        except (RedisError, OSError) as exc:
            self._on_error(exc)
            self._kick()
            return await self._claim_offline(token_hash, box, new_id)

    async def _claim_offline(self, token_hash: str, box: str,
                             new_id: str | None) -> tuple[SessionRecord, str] | None:
        record = self._cached_by_hash(token_hash)
        if new_id is not None:
            raise StateUnavailable("session state unreachable: cannot take over a session now")
        if record is None or record.state not in CLAIMABLE:
            return None
        old_hash = record.resume_token_hash
        new_token = new_resume_token()
        record.resume_token_hash = hash_token(new_token)
        record.box, record.epoch = box, record.epoch + 1
        record.state, record.disconnected_at = ACTIVE, None
        record.updated_at = time.time()
        self._spent[record.session_id] = old_hash
        await self._write(record.session_id)
        return dataclasses.replace(record), new_token

    async def _claim_redis(self, token_hash: str, box: str,
                           new_id: str | None) -> tuple[SessionRecord, str] | None:
        idx = self._k_resume(token_hash)
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(5):
                try:
                    await pipe.watch(idx)
                    sid = await pipe.get(idx)
                    if sid is None:
                        return None
                    sid = _text(sid)
                    await pipe.watch(self._k_rec(sid))
                    raw = await pipe.get(self._k_rec(sid))
                    if raw is None:
                        return None
                    record = SessionRecord.from_json(raw)
                    if record.state not in CLAIMABLE or not hmac.compare_digest(
                            record.resume_token_hash, token_hash):
                        return None
                    new_token = new_resume_token()
                    now = time.time()
                    claimed = dataclasses.replace(
                        record, box=box, epoch=record.epoch + 1, state=ACTIVE, disconnected_at=None,
                        resume_token_hash=hash_token(new_token), updated_at=now)
                    pipe.multi()
                    pipe.delete(idx)
                    pipe.set(self._k_spent(token_hash), "1", ex=self.active_ttl)
                    if new_id is not None:
                        moved = dataclasses.replace(record, box=box, epoch=record.epoch + 1, state=MOVED,
                                                    moved_to=new_id, resume_token_hash="", updated_at=now)
                        claimed = dataclasses.replace(claimed, session_id=new_id, epoch=1, resumed_from=sid,
                                                      moved_to="", created_at=now)
                        pipe.set(self._k_rec(sid), moved.to_json(), ex=self.active_ttl)
                    pipe.set(self._k_rec(claimed.session_id), claimed.to_json(), ex=self.active_ttl)
                    pipe.set(self._k_resume(claimed.resume_token_hash), claimed.session_id,
                             ex=self.active_ttl)
                    await pipe.execute()
                except WatchError:
                    continue
                if self._wait_replicas:  # a claim a dying primary never replicated would come undone
                    with contextlib.suppress(RedisError, OSError):
                        await self._redis.wait(1, 200)
                self._cache[claimed.session_id] = claimed
                if new_id is not None:
                    self._forget_local(sid)
                return dataclasses.replace(claimed), new_token
        return None

    async def _load(self, session_id: str) -> SessionRecord | None:
        raw = await self._redis.get(self._k_rec(session_id))
        return SessionRecord.from_json(raw) if raw is not None else None

    async def lost_of(self, session_ids: Iterable[str]) -> list[str]:
        """Which of these sessions (held by this box) another box has taken over since; one round trip.

        Each is forgotten here as by a refused write (``on_lost`` is called). Sessions with queued
        writes are left to the write itself; with Redis unreachable nothing is checked.
        """
        held = [(sid, self._cache[sid]) for sid in session_ids
                if sid in self._cache and sid not in self._dirty and sid not in self._inflight]
        if not held or self._degraded:
            return []
        box = held[0][1].box
        try:
            idx = await self._lost_script(keys=[self._k_rec(sid) for sid, _ in held],
                                          args=[box, *(rec.epoch for _, rec in held)])
        except (RedisError, OSError) as exc:
            self._on_error(exc)
            return []
        lost = []
        for i in idx:
            sid = held[int(i) - 1][0]
            if self._cache.get(sid) is held[int(i) - 1][1]:
                lost.append(sid)
                await self._lose(sid, "?")
        return lost

    # -- write queue ------------------------------------------------------------------------------
    async def _write(self, sid: str) -> None:
        self._dirty[sid] = None
        PENDING.set(len(self._dirty))
        if self._degraded:
            self._kick()
            return
        if not await self._drain(sid):
            self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="session-store-flusher")
        self._wake.set()

    async def _drain(self, sid: str) -> bool:
        """Write the latest snapshot of ``sid`` until it is clean; False if Redis failed."""
        if sid in self._inflight:
            return True  # the writer already running for this session picks the change up
        self._inflight.add(sid)
        try:
            while sid in self._dirty:
                self._dirty.pop(sid)
                try:
                    await self._apply(sid)
                except (RedisError, OSError) as exc:
                    self._dirty[sid] = None
                    self._on_error(exc)
                    return False
            return True
        finally:
            self._inflight.discard(sid)
            PENDING.set(len(self._dirty))

    async def _apply(self, sid: str) -> None:
        if sid in self._tombstones:
            gone = self._tombstones[sid]
            if gone is None:
                await self._redis.delete(self._k_rec(sid))
            else:
                opt, flags = _optional_keys(
                    self._k_resume(gone.resume_token_hash) if gone.resume_token_hash else "", "", "", "")
                await self._put(keys=[self._k_rec(sid), *opt],
                                args=[gone.box, gone.epoch, "", 1, sid, self.active_ttl, flags])
            self._tombstones.pop(sid, None)
            return
        record = self._cache.get(sid)
        if record is None:
            return
        snapshot = record.to_json()
        ttl = self._ttl(record)
        spent = self._spent.get(sid)
        token_hash = record.resume_token_hash
        opt, flags = _optional_keys(
            self._k_resume(token_hash) if token_hash else "", self._k_spent(token_hash) if token_hash else "",
            self._k_resume(spent) if spent else "", self._k_spent(spent) if spent else "")
        result = await self._put(keys=[self._k_rec(sid), *opt],
                                 args=[record.box, record.epoch, snapshot if ttl > 0 else "", max(ttl, 1),
                                       sid, self.active_ttl, flags])
        if not int(result[0]):
            if self._cache.get(sid) is record:
                await self._lose(sid, _text(result[1]))
            return
        if spent and self._spent.get(sid) == spent:
            del self._spent[sid]
        if ttl <= 0 and self._cache.get(sid) is record and sid not in self._dirty:
            self._cache.pop(sid, None)

    def _forget_local(self, sid: str) -> None:
        self._cache.pop(sid, None)
        self._dirty.pop(sid, None)
        self._spent.pop(sid, None)
        self._tombstones.pop(sid, None)
        PENDING.set(len(self._dirty))

    async def _lose(self, sid: str, owner: str) -> None:
        """Another box owns ``sid`` now: drop what this box holds or queued for it, tell the owner."""
        self._forget_local(sid)
        LOST.inc()
        log.info("session taken over by another box: this box stops writing it",
                 extra={"session": sid, "owner": owner})
        if self.on_lost is not None:
            try:
                self.on_lost(sid, owner)
            except Exception:
                log.exception("on_lost callback failed", extra={"session": sid})

    def _ttl(self, record: SessionRecord) -> int:
        if record.state in (ACTIVE, MIGRATING):
            return self.active_ttl
        if record.state == DISCONNECTED:
            since = time.time() - (record.disconnected_at or record.updated_at)
            return int(self.disconnected_ttl - since)
        return 0  # ended: nothing to keep

    def _on_error(self, exc: BaseException) -> None:
        REDIS_ERRORS.inc()
        if not self._degraded:
            log.warning("session store: Redis unreachable, queueing writes", extra={"error": str(exc)})
        self._degraded = True
        self._kick()  # the flusher retries and clears the degraded state once Redis answers

    async def _flush_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            resynced = False
            while self._dirty:
                failed = False
                for sid in list(self._dirty):
                    if not await self._drain(sid):
                        failed = True
                        break
                if failed:
                    await asyncio.sleep(backoff)
                    backoff = min(self._max_backoff, backoff * 2)
                    continue
                if self._degraded and not resynced:
                    # Redis answers again, possibly a promoted replica that missed this box's last
                    # acknowledged writes (or an emptied restart): write every session once more.
                    resynced = True
                    for sid in list(self._cache):
                        self._dirty.setdefault(sid, None)
                elif self._dirty:
                    await asyncio.sleep(0.01)  # the rest is being written by in-flight writers
            if self._degraded:
                log.info("session store: Redis reachable again, caught up")
            self._degraded = False
            backoff = 0.05
