"""Session state in Redis (redis-py asyncio), built so a Redis outage never drops a call.

One JSON value per session (``va:session:<id>``) plus a resume index (``va:resume:<sha256(token)>`` →
id). A whole-record value, not a hash, because the owning supervisor is the only writer and a record
is small (< 1 KB): every write is an idempotent full snapshot, which is what makes queued catch-up
simple and correct.

- TTL: ``redis.active_ttl_seconds`` (1 h) while a call is up, ``redis.disconnected_ttl_seconds``
  (5 min) after it disconnects — the window in which a caller may resume, on this box or another one.
- Resume tokens are 256-bit random strings given to the caller once; only their SHA-256 is stored
  (a Redis dump or replica must not let anyone take over calls). A slow salted hash buys nothing for
  tokens with 256 bits of entropy. :meth:`SessionStore.claim` swaps the token atomically (WATCH/MULTI), so
  a token resumes a call exactly once.
- Redis briefly unreachable: the store keeps a write-through cache of this box's sessions; a failed
  write marks the session dirty and a background task retries with backoff, then writes the latest
  snapshot of every dirty session (coalesced, so a long outage costs one write per session). While it
  is degraded new writes go straight to the queue, so API requests do not each wait for a timeout.
  Reads fall back to the cache. ``va_state_pending_writes`` and ``va_state_redis_errors_total`` show it.
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
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from appliance.config import RedisConfig

log = logging.getLogger(__name__)

PENDING = Gauge("va_state_pending_writes", "Session-state writes queued while Redis is unreachable")
REDIS_ERRORS = Counter("va_state_redis_errors_total", "Session-state Redis operations that failed")

ACTIVE, DISCONNECTED, ENDED = "active", "disconnected", "ended"


def new_session_id() -> str:
    """A fresh, unguessable session id (URL-safe)."""
    return "s_" + secrets.token_urlsafe(16)


def new_resume_token() -> str:
    """A fresh resume token (256 bits); give it to the caller, store only :func:`hash_token`."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def redis_client(cfg: RedisConfig, timeout: float = 0.5) -> aioredis.Redis:
    """A client with short timeouts and no built-in retries: the callers here decide what a failure means."""
    return aioredis.from_url(
        cfg.url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=10,
    )


@dataclass
class SessionRecord:
    """Everything needed to find, tear down or resume one call (on this box or another)."""

    session_id: str
    sub: str
    state: str = ACTIVE
    mode: str = "direct"
    box: str = ""  # instance id of the owning appliance
    shard: int = -1
    slot: int = -1
    generation: int = 0
    janus_session_id: int | None = None
    janus_handle_id: int | None = None
    room_id: int | None = None
    voice: str = ""
    language: str = ""
    resume_token_hash: str = ""
    resume_handle: str = ""
    last_transcript: str = ""
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


_FIELDS = {f.name for f in dataclasses.fields(SessionRecord)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    """Session records in Redis with a local write-through cache and queued catch-up."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        active_ttl: int = 3600,
        disconnected_ttl: int = 300,
        prefix: str = "va",
        max_backoff: float = 2.0,
    ) -> None:
        self._redis = client
        self.active_ttl = active_ttl
        self.disconnected_ttl = disconnected_ttl
        self._prefix = prefix
        self._max_backoff = max_backoff
        self._cache: dict[str, SessionRecord] = {}
        self._tombstones: dict[str, str] = {}  # deleted session id -> resume hash still to remove
        self._spent: dict[str, str] = {}  # session id -> resume hash claimed offline, index to remove
        self._dirty: dict[str, None] = {}  # ordered set of session ids with unwritten changes
        self._inflight: set[str] = set()
        self._degraded = False
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    @classmethod
    def from_config(cls, cfg: RedisConfig, client: aioredis.Redis | None = None) -> SessionStore:
        return cls(
            client or redis_client(cfg),
            active_ttl=cfg.active_ttl_seconds,
            disconnected_ttl=cfg.disconnected_ttl_seconds,
        )

    # -- keys -------------------------------------------------------------------------------------
    def _k_rec(self, sid: str) -> str:
        return f"{self._prefix}:session:{sid}"

    def _k_resume(self, token_hash: str) -> str:
        return f"{self._prefix}:resume:{token_hash}"

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
        """Change some fields of a session this box owns (ids, Janus ids, resume handle, transcript…)."""
        unknown = set(fields) - _FIELDS
        if unknown:
            raise TypeError(f"unknown session fields: {', '.join(sorted(unknown))}")
        record = self._cache.get(session_id)
        if record is None:
            record = await self._load(session_id)
            if record is None:
                raise KeyError(session_id)
            self._cache[session_id] = record
        for key, value in fields.items():
            setattr(record, key, value)
        record.updated_at = time.time()
        await self._write(session_id)
        return record

    async def mark_disconnected(self, session_id: str) -> SessionRecord:
        """The caller is gone (ICE failed, hangup): keep the record for the resume window only."""
        return await self.update(session_id, state=DISCONNECTED, disconnected_at=time.time())

    async def mark_active(self, session_id: str) -> SessionRecord:
        return await self.update(session_id, state=ACTIVE, disconnected_at=None)

    async def refresh_active(self) -> int:
        """Re-write every cached active session (extends the 1 h TTL of long calls); returns the count."""
        sids = [sid for sid, rec in self._cache.items() if rec.state == ACTIVE]
        for sid in sids:
            await self._write(sid)
        return len(sids)

    async def delete(self, session_id: str) -> None:
        """Forget a session everywhere (after teardown)."""
        record = self._cache.pop(session_id, None)
        if record is None:
            with contextlib.suppress(RedisError, OSError):
                record = await self._load(session_id)
        self._tombstones[session_id] = record.resume_token_hash if record else ""
        await self._write(session_id)

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
        if record is None or not hmac.compare_digest(record.resume_token_hash, token_hash):
            return None
        return record

    async def claim(self, token: str, box: str) -> tuple[SessionRecord, str] | None:
        """Atomically take over the session of ``token`` for ``box``: returns (record, new token) or None.

        The old token stops working at once, so a token resumes a call exactly once even if two boxes
        race for it. With Redis unreachable, a session of this box can still be resumed here (the
        swap is queued like any other write); other boxes' sessions cannot.
        """
        token_hash = hash_token(token)
        if self._degraded:
            return await self._claim_local(token_hash, box)
        try:
            return await self._claim_redis(token_hash, box)
        except (RedisError, OSError) as exc:
            self._on_error(exc)
            self._kick()
            return await self._claim_local(token_hash, box)

    async def _claim_local(self, token_hash: str, box: str) -> tuple[SessionRecord, str] | None:
        record = self._cached_by_hash(token_hash)
        if record is None or record.state == ENDED:
            return None
        old_hash = record.resume_token_hash
        new_token = new_resume_token()
        record.resume_token_hash = hash_token(new_token)
        record.box, record.state, record.disconnected_at = box, ACTIVE, None
        record.updated_at = time.time()
        self._spent[record.session_id] = old_hash
        await self._write(record.session_id)
        return dataclasses.replace(record), new_token

    async def _claim_redis(self, token_hash: str, box: str) -> tuple[SessionRecord, str] | None:
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
                    if record.state == ENDED or not hmac.compare_digest(record.resume_token_hash, token_hash):
                        return None
                    new_token = new_resume_token()
                    record.resume_token_hash = hash_token(new_token)
                    record.box, record.state, record.disconnected_at = box, ACTIVE, None
                    record.updated_at = time.time()
                    pipe.multi()
                    pipe.delete(idx)
                    pipe.set(self._k_rec(sid), record.to_json(), ex=self.active_ttl)
                    pipe.set(self._k_resume(record.resume_token_hash), sid, ex=self.active_ttl)
                    await pipe.execute()
                except WatchError:
                    continue
                self._cache[sid] = record
                return dataclasses.replace(record), new_token
        return None

    async def _load(self, session_id: str) -> SessionRecord | None:
        raw = await self._redis.get(self._k_rec(session_id))
        return SessionRecord.from_json(raw) if raw is not None else None

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
            token_hash = self._tombstones[sid]
            keys = [self._k_rec(sid)] + ([self._k_resume(token_hash)] if token_hash else [])
            await self._redis.delete(*keys)
            self._tombstones.pop(sid, None)
            return
        record = self._cache.get(sid)
        if record is None:
            return
        snapshot = record.to_json()
        ttl = self._ttl(record)
        spent = self._spent.get(sid)
        async with self._redis.pipeline(transaction=True) as pipe:
            if spent:
                pipe.delete(self._k_resume(spent))
            if ttl <= 0:
                pipe.delete(self._k_rec(sid), self._k_resume(record.resume_token_hash))
            else:
                pipe.set(self._k_rec(sid), snapshot, ex=ttl)
                if record.resume_token_hash:
                    pipe.set(self._k_resume(record.resume_token_hash), sid, ex=ttl)
            await pipe.execute()
        if spent and self._spent.get(sid) == spent:
            del self._spent[sid]
        if ttl <= 0 and self._cache.get(sid) is record and sid not in self._dirty:
            self._cache.pop(sid, None)

    def _ttl(self, record: SessionRecord) -> int:
        if record.state == ACTIVE:
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
            while self._dirty:
                failed = False
                for sid in list(self._dirty):
                    if not await self._drain(sid):
                        failed = True
                        break
                if failed:
                    await asyncio.sleep(backoff)
                    backoff = min(self._max_backoff, backoff * 2)
                elif self._dirty:
                    await asyncio.sleep(0.01)  # the rest is being written by in-flight writers
            if self._degraded:
                log.info("session store: Redis reachable again, caught up")
            self._degraded = False
            backoff = 0.05
