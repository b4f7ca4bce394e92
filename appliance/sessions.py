"""The session service: what `POST/GET/DELETE /v1/sessions` do on this box (``api.SessionService``).

Create (direct mode, the default)::

    admit (placement: least-loaded shard, free slot, deterministic RTP port; full → 503 Retry-After)
    → Janus NoSIP ``generate`` with the caller's offer  (Janus's plain-RTP side: ip, port, payload type)
    → ``slot.activate(...)``                            (the media worker binds the port on its next scan,
                                                         the AI worker opens the Live session while ICE and
                                                         DTLS complete)
    → NoSIP ``process`` with the worker's bare answer   (the WebRTC answer for the caller)
    → Redis record (resume token)                        → 201 with the answer

``room`` mode puts the caller in a private AudioBridge room (WebRTC participant) and the media worker in
the same room as a plain-RTP participant; the room is destroyed with the session.

Teardown (DELETE, Janus ``hangup``/``detached`` = ICE or DTLS failure or the caller closing, Janus
session loss, the maximum session age): slot → CLOSING (workers drop the call on their next scan), Janus
handle detached, slot → FREE a moment later (so the worker sees CLOSING first), placement released.
DELETE forgets the Redis record; a hangup keeps it as ``disconnected`` for the resume window
(``redis.disconnected_ttl_seconds``) so the caller can come back with its resume token — on this box or,
via the load balancer, on another one.

Every second the service mirrors what the AI worker writes into the slot (latest resumable Live
handle, model state, last transcript line) into Redis, so another box can resume the conversation. A
resumed session gets a fresh resume token (the old one is spent atomically) and starts its Live session
from the stored handle. Session ids name their box (``<box_id>.<random>``): a resume on the same box
keeps the id; a resume on another box continues under a new id that names the new box (the 201 says
``resumed_from``) and the old record becomes a ``moved`` tombstone — see docs/architecture.md "Fleet".
The same tick asks Redis whether another box has taken over any of this box's calls (one Lua round
trip) and ends those legs without writing anything.

Force-migrate (:meth:`Sessions.migrate_all`, drain timeout): each call gets state ``migrating`` and a
fresh resume token shown only to its owner in ``GET /v1/sessions/{id}``; its leg here ends once it has
resumed elsewhere, or after ``api.migrate_grace_seconds`` (kept resumable).

Janus: one long-lived Janus session per shard (one long-poll each), one handle per call. An offer that
passed our SDP validation but that Janus refuses is the caller's mistake: 400 ``invalid_sdp`` with
Janus's reason (:func:`offer_refused`); any other Janus failure is a 502 whose detail stays in the log.

Dead sessions: a caller that never connects (no ``webrtcup`` within ``api.connect_timeout_seconds``)
is torn down like a hangup — slot, Janus handle and Live session freed — instead of holding them for
``redis.active_ttl_seconds``.

Concurrent-session cap: the API takes the lease (:class:`appliance.ratelimit.SessionCap`); this service
renews the leases of its live sessions and releases them at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from appliance import routing, tracing
from appliance.api import (
    CapacityError,
    ClientInfo,
    CreatedSession,
    IceCandidate,
    InvalidRequest,
    SessionInfo,
    SessionOptions,
    UpstreamError,
)
from appliance.breaker import Breaker, breaker_settings, model_breaker_name, peek
from appliance.config import DEFAULT_TENANT, Config, secret, tenant
from appliance.janus import (
    AUDIOBRIDGE,
    ERR_HANDLE_NOT_FOUND,
    ERR_SESSION_NOT_FOUND,
    ERR_UNAUTHORIZED,
    NOSIP,
    JanusClient,
    JanusError,
    JanusEvent,
    JanusHandle,
    JanusSession,
    JanusUnavailable,
    plain_rtp_answer,
)
from appliance.metrics import Metrics
from appliance.placement import AdmissionRefused, Placed, Placement
from appliance.ratelimit import SessionCap
from appliance.records.calls import SupervisorRecorder
from appliance.state import (
    ACTIVE,
    MOVED,
    SessionRecord,
    SessionStore,
    StateUnavailable,
    box_of,
    new_session_id,
)
from shm.segment import MODEL_STATE_ENDED

log = logging.getLogger(__name__)

CLOSE_GRACE_SECONDS = 0.3  # CLOSING → FREE delay: workers scan every tick (≤ 20 ms)
MIRROR_SECONDS = 1.0
# what an AI worker may end a call for (a metric label): workers/ai/consent.py, workers/ai/ivr.py END_REASONS
ENDED_REASONS = frozenset({"consent_refused", "degraded_callback", "degraded_transferred",
                           "degraded_max_hold"})
REFRESH_SECONDS = 300.0
MAX_REASON_CHARS = 200
_NOT_THE_CALLERS_FAULT = {0, ERR_UNAUTHORIZED, 405, ERR_SESSION_NOT_FOUND, ERR_HANDLE_NOT_FOUND, 490}


def ended_reason(model_state: str) -> str:
    """The teardown reason for a slot whose model state is ``ended:<why>`` (shm/segment.py)."""
    why = model_state[len(MODEL_STATE_ENDED):]
    return why if why in ENDED_REASONS else "ai_ended"


class OfferRefused(Exception):
    """Janus refused the caller's offer itself (raised from the step that hands Janus the offer)."""

    def __init__(self, exc: JanusError) -> None:
        super().__init__(str(exc))
        self.janus_error = exc


def offer_refused(exc: JanusError) -> bool:
    """True when Janus's answer to the caller's offer blames the offer (JSEP/SDP or plugin errors), not
    Janus being down, our secret, a lost session or one of our own parse checks (code 0)."""
    return not isinstance(exc, JanusUnavailable) and exc.code not in _NOT_THE_CALLERS_FAULT


def _public_reason(reason: str) -> str:
    """Janus's reason, one line, bounded (it quotes the caller's own SDP, never our addresses)."""
    return " ".join(reason.split())[:MAX_REASON_CHARS] or "refused"


@dataclass
class LiveSession:
    """A session running on this box."""

    session_id: str
    sub: str
    mode: str
    placed: Placed
    generation: int
    created_at: float
    expires_at: float
    handle: JanusHandle | None = None
    room_handle: JanusHandle | None = None
    room_id: int | None = None
    webrtc_up: bool = False
    resumed: bool = False
    mirrored: tuple[str, str, str] = ("", "", "")
    closing: bool = False
    migrate_token: str = ""  # set by a force-migrate: the caller resumes elsewhere with it
    migrating_since: float = 0.0
    tenant: str = ""  # "" = the default tenant
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Sessions:
    """The supervisor's :class:`appliance.api.SessionService`."""

    def __init__(
        self,
        cfg: Config,
        placement: Placement,
        segments: dict[int, Any],
        store: SessionStore,
        metrics: Metrics,
        *,
        box: str,
        janus: JanusClient | None = None,
        on_slot_freed: Any = None,
        redis: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.placement = placement
        self.segments = segments
        self.store = store
        self.metrics = metrics
        self.box = box
        self.janus = janus or JanusClient.from_config(cfg.janus)
        self.ab_admin_key = secret(cfg.janus.audiobridge_admin_key, cfg.janus.audiobridge_admin_key_file)
        self.on_slot_freed = on_slot_freed  # (shard, slot) -> None: harvest counters before reuse
        # model routing: the primary's breaker state lives in Redis (``redis`` None: local only)
        self.rng = rng or random.Random()
        self._redis = redis
        self._breakers: dict[str, Breaker] = {}
        self.cap: SessionCap | None = None  # the API's per-sub session cap (the supervisor sets it)
        self._last_renew = 0.0
        self.records = SupervisorRecorder(cfg, box)  # call rows for the record (appliance/records/calls.py)
        self.accepting = False
        self.live: dict[str, LiveSession] = {}
        self._by_handle: dict[int, str] = {}
        self._jsessions: dict[int, JanusSession] = {}
        self._jlocks: dict[int, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        store.on_lost = self._on_lost

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._mirror_loop(), name="sessions-mirror"))

    async def adopt(self) -> int:
        """Take over the calls a previous supervisor of this box left running (its crash or in-place
        restart): every ACTIVE slot whose Redis record this box still owns becomes a live session again,
        on the same Janus session and handles (keepalives and the long poll resume at once, well inside
        Janus's 60 s session timeout). A slot without such a record is closed. Returns the count.
        Protocol: docs/architecture.md "Supervisor restart and adoption"."""
        from shm.segment import SlotState

        adopted = 0
        for shard, seg in self.segments.items():
            for slot in seg.slots():
                if slot.state == SlotState.CLOSING:
                    slot.free()
                    continue
                info = slot.snapshot()
                if info is None:
                    continue
                try:
                    record = await self.store.adopt(info.session_id, self.box)
                except Exception:
                    log.exception("cannot read a live call's record; it is not adopted",
                                  extra={"session": info.session_id})
                    record = None
                if record is None or record.janus_session_id is None or record.janus_handle_id is None:
                    log.warning("slot without a live record on this box: closed",
                                extra={"session": info.session_id, "shard": shard, "slot": slot.index})
                    slot.begin_close()
                    self._spawn(self._free_slot_later(slot, info.generation))
                    continue
                placed = self.placement.claim(shard, slot.index, info.session_id)
                live = LiveSession(info.session_id, record.sub, record.mode, placed, info.generation,
                                   record.created_at, record.created_at + self.cfg.redis.active_ttl_seconds,
                                   webrtc_up=True, room_id=record.room_id)
                js = self._jsessions.get(shard)
                if js is None or js.id != record.janus_session_id:
                    js = await self.janus.resume_session(record.janus_session_id,
                                                         on_event=self._on_janus_event)
                    self._jsessions.setdefault(shard, js)
                plugin = AUDIOBRIDGE if record.mode == "room" else NOSIP
                live.handle = js.adopt_handle(record.janus_handle_id, plugin)
                self._by_handle[live.handle.id] = live.session_id
                if record.janus_room_handle_id is not None:
                    live.room_handle = js.adopt_handle(record.janus_room_handle_id, AUDIOBRIDGE)
                    self._by_handle[live.room_handle.id] = live.session_id
                live.mirrored = (slot.resume_handle, slot.model_state, slot.transcript)
                self.live[live.session_id] = live
                adopted += 1
                log.info("call adopted", extra={"session": live.session_id, "shard": shard,
                                                "slot": slot.index, "janus_session": js.id})
        return adopted

    async def _free_slot_later(self, slot: Any, generation: int) -> None:
        await asyncio.sleep(CLOSE_GRACE_SECONDS)
        with contextlib.suppress(Exception):
            if slot.generation == generation:
                slot.free()

    async def release(self) -> None:
        """Stop this supervisor's part without ending any call (an in-place restart): the Janus long
        polls and keepalives stop (Janus keeps the sessions for 60 s), queued Redis writes flush."""
        self.accepting = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._bg, return_exceptions=True)
        for js in list(self._jsessions.values()):
            with contextlib.suppress(Exception):
                await js.stop()
        self._jsessions.clear()
        with contextlib.suppress(Exception):
            await self.janus.aclose(destroy_sessions=False)
        with contextlib.suppress(Exception):
            await self.store.close()

    async def close(self) -> None:
        """Tear down every live session (kept resumable), stop background work, close Janus/Redis."""
        self.accepting = False
        for sid in list(self.live):
            await self._teardown(sid, "shutdown", forget=False)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._bg, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.janus.aclose()
        with contextlib.suppress(Exception):
            await self.store.close()
        self.records.close()

    def ready(self) -> bool:
        """Accepting (started, not stopping), not draining, and at least one shard's media worker up."""
        return self.accepting and not self.placement.draining and self.placement.capacity > 0

    def retry_after(self) -> float:
        if self.placement.draining or not self.accepting:
            return float(self.placement.retry_after_draining)
        return float(self.placement.retry_after_full)

    # -- Janus sessions -------------------------------------------------------------------------
    async def _janus_session(self, shard: int) -> JanusSession:
        lock = self._jlocks.setdefault(shard, asyncio.Lock())
        async with lock:
            js = self._jsessions.get(shard)
            if js is None or not js.alive:
                js = await self.janus.create_session(on_event=self._on_janus_event)
                self._jsessions[shard] = js
            return js

    async def _on_janus_event(self, event: JanusEvent) -> None:
        if event.kind == "session_lost":
            sids = [self._by_handle[event.handle_id]] if event.handle_id in self._by_handle else []
            if event.handle_id is None:
                sids = [s.session_id for s in self.live.values()
                        if s.handle is not None and s.handle.session.id == event.session_id]
            for lost in sids:
                self._spawn(self._teardown(lost, "janus_lost", forget=False))
            return
        sid = self._by_handle.get(event.handle_id or -1)
        if sid is None or sid not in self.live:
            return
        live = self.live[sid]
        if event.kind == "webrtcup":
            live.webrtc_up = True
            self.records.connected(live)
            log.info("caller connected", extra={"session": sid})
        elif event.kind in ("hangup", "detached"):
            log.info("caller gone", extra={"session": sid, "janus_event": event.kind, "reason": event.reason})
            self._spawn(self._teardown(sid, "hangup", forget=False))
        elif event.kind == "event":
            raw = event.data.get("result")
            result: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if event.data.get("nosip") == "event" and result.get("event") in ("hangup", "hangingup"):
                self._spawn(self._teardown(sid, "hangup", forget=False))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # -- create ---------------------------------------------------------------------------------
    async def create(self, offer_sdp: str, options: SessionOptions, client: ClientInfo) -> CreatedSession:
        started = time.perf_counter()
        resume_handle = ""
        resumed: SessionRecord | None = None
        new_token = ""
        if options.resume_token:
            # Read (and check ownership) now, claim only once the new leg is set up: a refused or failed
            # setup must not spend the caller's token.
            resumed = await self._lookup(options.resume_token, client)
            resume_handle = resumed.resume_handle
            old = self.live.get(resumed.session_id)
            if old is not None:  # the caller came back before we noticed it had gone
                await self._teardown(old.session_id, "replaced", forget=False)
        # a resume on another box continues under an id that names this box (the LB routes on it)
        moving = resumed is not None and box_of(resumed.session_id) != self.box
        sid = resumed.session_id if resumed is not None and not moving else new_session_id(self.box)
        try:
            placed = self.placement.admit(sid)
        except AdmissionRefused as exc:
            result = "draining" if exc.reason == "draining" else "full"
            self.metrics.admissions.labels(result=result).inc()
            raise CapacityError(f"no capacity ({exc.reason})", retry_after=exc.retry_after) from exc
        try:
            tenant_cfg, model, route = await self._route(client, resumed)
            tenant_key = "" if tenant_cfg.name == DEFAULT_TENANT else tenant_cfg.name
        except Exception:
            self.placement.release(placed.shard, placed.slot)
            raise
        now = time.time()
        voice = options.voice or (resumed.voice if resumed else "") or ""
        language = options.language or (resumed.language if resumed else "") or ""
        live = LiveSession(sid, client.sub, options.mode, placed, 0, now,
                           now + self.cfg.redis.active_ttl_seconds, resumed=resumed is not None,
                           tenant=tenant_key, model=model)
        # the AI worker builds the call's Live setup, tools and greeting from the tenant and this model
        slot_opts: dict[str, Any] = {"voice": voice, "language": language, "tenant": tenant_key,
                                     "model": model}
        if resume_handle:
            slot_opts["resume_handle"] = resume_handle
        if options.recording:  # the caller opted this call in (the tenant's policy otherwise)
            slot_opts["recording"] = options.recording
        try:
            if options.mode == "room":
                answer = await self._setup_room(live, offer_sdp, slot_opts)
            else:
                answer = await self._setup_direct(live, offer_sdp, slot_opts)
        except asyncio.CancelledError:
            await self._abort(live)
            raise
        except OfferRefused as refused:
            await self._abort(live)
            self.metrics.admissions.labels(result="invalid").inc()
            why = refused.janus_error
            log.info("offer refused by Janus", extra={"session": sid, "code": why.code, "error": why.reason})
            raise InvalidRequest(f"the media gateway refused the offer: {_public_reason(why.reason)}",
                                 code="invalid_sdp") from why
        except JanusError as exc:
            await self._abort(live)
            self.metrics.admissions.labels(result="error").inc()
            log.warning("session setup failed in Janus", extra={"session": sid, "error": str(exc)})
            raise UpstreamError(f"media gateway refused the call: {exc.reason or exc}") from exc
        except Exception:
            await self._abort(live)
            self.metrics.admissions.labels(result="error").inc()
            raise
        if resumed is not None:
            try:
                resumed, new_token = await self._claim(options.resume_token or "", client,
                                                       sid if moving else None)
            except Exception:
                await self._abort(live)
                raise
            resume_handle = resumed.resume_handle or resume_handle
        self.live[sid] = live
        record_fields: dict[str, Any] = {
            "sub": client.sub, "state": ACTIVE, "mode": options.mode,
            "shard": placed.shard, "slot": placed.slot, "generation": live.generation,
            "janus_session_id": live.handle.session.id if live.handle else None,
            "janus_handle_id": live.handle.id if live.handle else None,
            "janus_room_handle_id": live.room_handle.id if live.room_handle else None,
            "room_id": live.room_id, "voice": voice, "language": language,
            "tenant": tenant_key, "model": model,
            "resume_handle": resume_handle, "disconnected_at": None,
        }
        try:
            if resumed is not None:
                await self.store.update(sid, **record_fields)
                token = new_token
            else:
                record = SessionRecord(session_id=sid, box=self.box, created_at=now, **record_fields)
                token = await self.store.create(record)
        except Exception as exc:  # the store queues writes itself; this is a real bug or a full outage
            log.exception("session state write failed", extra={"session": sid})
            await self._teardown(sid, "error", forget=True)
            raise UpstreamError("session state unavailable") from exc
        self.metrics.admissions.labels(result="resumed" if resumed else "accepted").inc()
        self.metrics.tenant_sessions.labels(tenant_cfg.name, model, route).inc()
        self.records.created(live, resumed=resumed is not None, voice=voice or tenant_cfg.model.voice,
                             language=language or tenant_cfg.model.language, tenant=tenant_key or None,
                             model=model)
        self.metrics.session_setup_seconds.observe(time.perf_counter() - started)
        # one trace per call id (appliance/tracing.py): a call resumed here under its id continues its
        # trace (a child of its call span); one that moved boxes got a new id and starts a new trace
        live.extra["span"] = (tracing.start_child(sid, "call_resumed", box=self.box)
                              if resumed is not None and not moving else
                              tracing.start_call(sid, box=self.box, shard=placed.shard, mode=options.mode,
                                                 resumed_from=resumed.session_id if resumed else ""))
        log.info("session created", extra={
            "session": sid, "shard": placed.shard, "slot": placed.slot, "port": placed.rtp_port,
            "mode": options.mode, "resumed": resumed is not None, "tenant": tenant_cfg.name,
            "model": model, "route": route})
        return CreatedSession(sid, answer, token, live.expires_at,
                              resumed_from=resumed.resumed_from if resumed is not None and moving else "")

    async def _route(self, client: ClientInfo, resumed: SessionRecord | None) -> tuple[Any, str, str]:
        """The caller's tenant (its limit checked) and the model of this call. A resume keeps the
        model it had (its Live handle belongs to that model) and must come with the same tenant."""
        name = client.tenant
        if resumed is not None:  # a session token carries no claim: the record's tenant holds
            if client.tenant and resumed.tenant != client.tenant:
                raise InvalidRequest("resume token belongs to another tenant", code="invalid_resume")
            name = resumed.tenant
        try:
            t = tenant(self.cfg, name)
        except KeyError:  # recorded under a tenant this box's config no longer has
            raise InvalidRequest(f"tenant {name!r} is not configured on this appliance", status=403,
                                 code="unknown_tenant") from None
        if t.max_sessions:
            mine = sum(1 for s in self.live.values() if s.tenant == name and not s.closing)
            if mine >= t.max_sessions:
                self.metrics.tenant_refused.labels(t.name).inc()
                raise InvalidRequest(f"tenant {t.name!r} has its maximum of {t.max_sessions} concurrent "
                                     "calls on this box", status=429, code="tenant_limit")
        if resumed is not None and resumed.model:
            return t, resumed.model, "resumed"
        chosen = await routing.choose(t.model, self.rng, self._breaker_state)
        return t, chosen.model, chosen.reason

    async def _breaker_state(self, model: str) -> str:
        b = self._breakers.get(model)
        if b is None:
            b = self._breakers[model] = Breaker(model_breaker_name(model), breaker_settings(self.cfg),
                                                self._redis)
        return await peek(b)

    async def _lookup(self, token: str, client: ClientInfo) -> SessionRecord:
        """The session a resume token belongs to, if ``client`` owns it (nothing is spent)."""
        try:
            record = await self.store.find_by_resume_token(token)
        except Exception as exc:
            raise UpstreamError("session state unavailable; cannot resume now", status=503,
                                retry_after=2) from exc
        if record is None or record.sub != client.sub or (
                client.session_id is not None and record.session_id != client.session_id):
            raise InvalidRequest("resume token unknown, expired or already used", code="invalid_resume")
        return record

    async def _claim(self, token: str, client: ClientInfo, new_id: str | None) -> tuple[SessionRecord, str]:
        """Atomically take over the session of ``token`` for this box (a token works exactly once)."""
        try:
            claimed = await self.store.claim(token, self.box, new_id)
        except StateUnavailable as exc:
            raise UpstreamError(str(exc), status=503, retry_after=2) from exc
        except Exception as exc:
            raise UpstreamError("session state unavailable; cannot resume now", status=503,
                                retry_after=2) from exc
        if claimed is None or claimed[0].sub != client.sub:
            raise InvalidRequest("resume token unknown, expired or already used", code="invalid_resume")
        return claimed

    def _activate(self, live: LiveSession, ip: str, port: int, pt: int, channels: int, dtmf: int | None,
                  opts: dict[str, Any]) -> None:
        slot = self.segments[live.placed.shard].slot(live.placed.slot)
        live.generation = slot.activate(
            session_id=live.session_id, local_rtp_port=live.placed.rtp_port, remote_rtp_ip=ip,
            remote_rtp_port=port, payload_type=pt, channels=max(1, min(2, channels)),
            dtmf_payload_type=dtmf if dtmf is not None else -1, mode=live.mode, options=opts)

    async def _attach(self, shard: int, plugin: str, opaque_id: str) -> tuple[JanusSession, JanusHandle]:
        """Attach on the shard's Janus session; once more on a fresh one if Janus no longer knows it (it
        restarted before the long poll noticed: the caller's resume must not wait for that)."""
        js = await self._janus_session(shard)
        try:
            return js, await js.attach(plugin, opaque_id=opaque_id)
        except JanusError as exc:
            if exc.code != ERR_SESSION_NOT_FOUND:
                raise
        js = await self._janus_session(shard)
        return js, await js.attach(plugin, opaque_id=opaque_id)

    async def _setup_direct(self, live: LiveSession, offer_sdp: str, opts: dict[str, Any]) -> str:
        _js, live.handle = await self._attach(live.placed.shard, NOSIP, live.session_id)
        self._by_handle[live.handle.id] = live.session_id
        try:
            side = await live.handle.nosip_generate(offer_sdp, info=live.session_id)
        except JanusError as exc:
            if offer_refused(exc):
                raise OfferRefused(exc) from exc
            raise
        for pt in (side.payload_type, side.telephone_event_payload_type, side.red_payload_type):
            if pt is not None and not 0 <= pt <= 127:  # what Janus made of the offer, not our bug
                raise OfferRefused(JanusError(0, f"the offer led to RTP payload type {pt} (valid: 0-127)"))
        red = side.red_payload_type if self.cfg.media.red else None
        if red is not None:
            opts = {**opts, "red_payload_type": red}  # the media worker unpacks it (workers/media/red.py)
        self._activate(live, side.ip, side.port, side.payload_type, side.channels,
                       side.telephone_event_payload_type, opts)
        bare = plain_rtp_answer(self.cfg.media.rtp_host, live.placed.rtp_port, side.payload_type,
                                channels=side.channels,
                                telephone_event_payload_type=side.telephone_event_payload_type,
                                red_payload_type=red)
        return await live.handle.nosip_process_answer(bare)

    async def _setup_room(self, live: LiveSession, offer_sdp: str, opts: dict[str, Any]) -> str:
        js, live.room_handle = await self._attach(live.placed.shard, AUDIOBRIDGE, live.session_id + "-ai")
        self._by_handle[live.room_handle.id] = live.session_id
        live.room_id = await live.room_handle.audiobridge_create_room(admin_key=self.ab_admin_key,
                                                                      description=live.session_id)
        # The worker's leg first: Janus sends to it only after its first packet, so no audio is lost.
        side, _pid = await live.room_handle.audiobridge_join_rtp(
            live.room_id, self.cfg.media.rtp_host, live.placed.rtp_port, payload_type=111,
            display="assistant")
        self._activate(live, side.ip, side.port, side.payload_type, 1, None, opts)
        live.handle = await js.attach(AUDIOBRIDGE, opaque_id=live.session_id)
        self._by_handle[live.handle.id] = live.session_id
        try:
            return await live.handle.audiobridge_join_webrtc(live.room_id, offer_sdp, display="caller")
        except JanusError as exc:
            if offer_refused(exc):
                raise OfferRefused(exc) from exc
            raise

    async def _abort(self, live: LiveSession) -> None:
        """Undo a half-done setup (slot, Janus handles, placement)."""
        for h in (live.handle, live.room_handle):
            if h is not None:
                self._by_handle.pop(h.id, None)
        await self._release(live)

    # -- signalling -----------------------------------------------------------------------------
    async def trickle(self, session_id: str, candidate: IceCandidate | None) -> None:
        live = self.live.get(session_id)
        if live is None or live.handle is None:
            # a disconnected (resumable) session has nothing to trickle to: say so, never drop silently
            raise InvalidRequest("session is not connected on this box; resume it with its resume token",
                                 status=409, code="not_connected")
        body = None if candidate is None else {
            "candidate": candidate.candidate, "sdpMid": candidate.sdp_mid,
            "sdpMLineIndex": candidate.sdp_mline_index}
        try:
            await live.handle.trickle(body)
        except JanusError as exc:
            if offer_refused(exc):
                raise InvalidRequest(f"the media gateway refused the candidate: {_public_reason(exc.reason)}",
                                     code="invalid_candidate") from exc
            raise UpstreamError(f"media gateway refused the candidate: {exc.reason or exc}") from exc

    async def get(self, session_id: str) -> SessionInfo | None:
        live = self.live.get(session_id)
        if live is not None:
            details: dict[str, Any] = {"shard": live.placed.shard,
                                       "webrtc": "up" if live.webrtc_up else "new",
                                       "tenant": live.tenant or "default", "model": live.model}
            with contextlib.suppress(Exception):
                slot = self.segments[live.placed.shard].slot(live.placed.slot)
                if slot.is_current(live.generation):
                    details["model_state"] = slot.model_state or "connecting"
                    details["transcript"] = slot.transcript
            if "quality" in live.extra:
                details["quality"] = live.extra["quality"]  # latest 5 s window (appliance/quality.py)
            state = "active" if live.webrtc_up else "connecting"
            if live.migrate_token:  # only the owner sees it (the API checks the token's sub first)
                state = "migrating"
                details["resume_token"] = live.migrate_token
            return SessionInfo(session_id, live.sub, state, live.mode, live.created_at, live.expires_at,
                               details)
        try:
            record = await self.store.get(session_id)
        except Exception:
            record = None
        if record is None:
            return None
        expires = record.created_at + self.cfg.redis.active_ttl_seconds
        if record.disconnected_at:
            expires = min(expires, record.disconnected_at + self.cfg.redis.disconnected_ttl_seconds)
        details = {"transcript": record.last_transcript, "box": record.box}
        if record.state == MOVED:
            details = {"moved_to": record.moved_to, "box": record.box}
        return SessionInfo(record.session_id, record.sub, record.state, record.mode, record.created_at,
                           expires, details)

    async def hangup(self, session_id: str) -> None:
        """An operator ended the call (admin API): torn down, kept resumable like a caller hangup."""
        await self._teardown(session_id, "admin_hangup", forget=False)

    async def delete(self, session_id: str) -> bool:
        if session_id in self.live:
            await self._teardown(session_id, "deleted", forget=True)
            return True
        try:
            record = await self.store.get(session_id)
        except Exception:
            record = None
        if record is None or record.state == MOVED:
            return False
        if record.box and record.box != self.box and record.state == ACTIVE:
            return False  # live on another box: that box owns it
        await self.store.delete(session_id)
        return True

    # -- teardown -------------------------------------------------------------------------------
    def _on_lost(self, session_id: str, owner: str) -> None:
        """The store found another box owns this call now: end the leg here, write nothing."""
        if session_id in self.live:
            self._spawn(self._teardown(session_id, "moved", forget=False, write=False))

    async def migrate_all(self) -> int:
        """Tell every call on this box to move (drain timeout): state ``migrating``, fresh resume token."""
        n = 0
        for sid, live in list(self.live.items()):
            if live.closing or live.migrate_token:
                continue
            try:
                live.migrate_token = await self.store.begin_migration(sid)
            except KeyError:
                continue
            live.migrating_since = time.monotonic()
            n += 1
        log.info("force-migrate: callers told to move", extra={"sessions": n})
        return n

    @property
    def migrating(self) -> int:
        return sum(1 for live in self.live.values() if live.migrate_token)

    async def _teardown(self, session_id: str, reason: str, *, forget: bool, write: bool = True) -> None:
        live = self.live.pop(session_id, None)
        if live is None or live.closing:
            return
        live.closing = True
        if self.cap is not None:
            self._spawn(self.cap.release(live.sub, session_id))
        handle_ids = [h.id for h in (live.handle, live.room_handle) if h is not None]
        mirror = self._read_slot(live)
        self.records.ended(live, reason, self._slot_of(live))
        await self._release(live)
        for hid in handle_ids:
            self._by_handle.pop(hid, None)
        self.metrics.sessions_ended.labels(reason=reason).inc()
        tracing.end(live.extra.pop("span", None), reason=reason)
        log.info("session ended", extra={"session": session_id, "reason": reason})
        if not write:
            return
        try:
            if forget:
                await self.store.delete(session_id)
            else:
                fields: dict[str, Any] = {}
                if mirror is not None:
                    fields = {"resume_handle": mirror[0], "last_transcript": mirror[2]}
                if fields:
                    await self.store.update(session_id, **fields)
                await self.store.mark_disconnected(session_id)
        except Exception:
            log.exception("session state update failed at teardown", extra={"session": session_id})

    async def _release(self, live: LiveSession) -> None:
        shard, slot_idx = live.placed.shard, live.placed.slot
        slot = None
        with contextlib.suppress(Exception):
            slot = self.segments[shard].slot(slot_idx)
            if live.generation and slot.is_current(live.generation):
                slot.begin_close()
            elif not live.generation:
                slot = None  # never activated
        for h in (live.handle, live.room_handle):
            if h is None:
                continue
            with contextlib.suppress(Exception):
                if live.room_id is not None and h is live.room_handle:
                    await h.audiobridge_destroy_room(live.room_id)
            with contextlib.suppress(Exception):
                await h.detach()
        if slot is None:
            self.placement.release(shard, slot_idx)
        else:  # FREE only after the workers have seen CLOSING; the caller does not wait for it
            self._spawn(self._free_later(live, slot))

    async def _free_later(self, live: LiveSession, slot: Any) -> None:
        try:
            await asyncio.sleep(CLOSE_GRACE_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                if self.on_slot_freed is not None:
                    self.on_slot_freed(live.placed.shard, slot)
                if slot.generation == live.generation:
                    slot.free()
            self.placement.release(live.placed.shard, live.placed.slot)

    def _slot_of(self, live: LiveSession) -> Any:
        with contextlib.suppress(Exception):
            return self.segments[live.placed.shard].slot(live.placed.slot)
        return None

    def _read_slot(self, live: LiveSession) -> tuple[str, str, str] | None:
        try:
            slot = self.segments[live.placed.shard].slot(live.placed.slot)
            if not slot.is_current(live.generation):
                return None
            return slot.resume_handle, slot.model_state, slot.transcript
        except Exception:
            return None

    def quality_refs(self) -> list[Any]:
        """The live calls as the call-quality sampler sees them (appliance/quality.py)."""
        from appliance.quality import CallRef

        refs = []
        for sid, live in list(self.live.items()):
            if live.closing or live.handle is None:
                continue
            refs.append(CallRef(sid, live.placed.shard, live.handle.id, self._counters_of(live),
                                functools.partial(self._publish_quality, live)))
        return refs

    @staticmethod
    def _publish_quality(live: LiveSession, q: Any) -> None:
        from appliance.quality import QualitySummary

        live.extra["quality"] = q.public()
        live.extra.setdefault("quality_summary", QualitySummary()).add(q)

    def quality_summary(self, session_id: str) -> dict[str, Any] | None:
        """The call's quality so far (samples, MOS mean/min, worst loss/jitter/RTT) for its call record;
        None for a call not live on this box. Read it before teardown."""
        live = self.live.get(session_id)
        summary = live.extra.get("quality_summary") if live is not None else None
        return summary.public() if summary is not None else None

    def _counters_of(self, live: LiveSession) -> Any:
        def read() -> dict[str, int] | None:
            slot = self.segments[live.placed.shard].slot(live.placed.slot)
            return slot.counters.snapshot() if slot.is_current(live.generation) else None
        return read

    # -- mirror to Redis ------------------------------------------------------------------------
    async def mirror_once(self) -> int:
        """Copy changed resume handles / model states / transcripts to Redis; returns the count."""
        n = 0
        now = time.time()
        connect_limit = self.cfg.api.connect_timeout_seconds
        grace = self.cfg.api.migrate_grace_seconds
        with contextlib.suppress(Exception):  # refused writes find the rest; this is the quiet path
            await self.store.lost_of(list(self.live))
        for sid, live in list(self.live.items()):
            if now >= live.expires_at:
                self._spawn(self._teardown(sid, "max_age", forget=False))
                continue
            if live.migrate_token and time.monotonic() - live.migrating_since > grace:
                self._spawn(self._teardown(sid, "migrate_timeout", forget=False))
                continue
            if not live.webrtc_up and now - live.created_at >= connect_limit:
                # a dead session (the caller never connected): free slot, Janus handle and Live session.
                # A fresh one is forgotten (nothing to resume); a resumed one keeps its resume window.
                log.info("caller never connected; ending the session",
                         extra={"session": sid, "timeout_seconds": connect_limit})
                self._spawn(self._teardown(sid, "connect_timeout", forget=not live.resumed))
                continue
            current = self._read_slot(live)
            if current is not None and current[1].startswith(MODEL_STATE_ENDED):  # the AI worker ended it
                self._spawn(self._teardown(sid, ended_reason(current[1]), forget=True))
                continue
            if current is None or current == live.mirrored:
                continue
            live.mirrored = current
            try:
                await self.store.update(sid, resume_handle=current[0], last_transcript=current[2])
                n += 1
            except KeyError:
                pass
            except Exception:
                self.metrics.redis_errors.inc()
        return n

    async def _mirror_loop(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(MIRROR_SECONDS)
            try:
                await self.mirror_once()
                if self.cap is not None and time.monotonic() - self._last_renew > SessionCap.RENEW_SECONDS:
                    self._last_renew = time.monotonic()
                    await self.cap.renew([(s.sub, sid) for sid, s in list(self.live.items())])
                if time.monotonic() - last_refresh > REFRESH_SECONDS:
                    last_refresh = time.monotonic()
                    await self.store.refresh_active()
            except Exception:
                log.exception("session mirror failed")
