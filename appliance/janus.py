"""Async client of the co-located Janus's HTTP API (loopback only), built on httpx.

Why hand-written: the Python Janus clients on PyPI are unmaintained or WebSocket-only, and the REST
protocol is small — create/attach/message/trickle/hangup/detach/destroy plus one long-poll GET per
Janus session that delivers every event. What matters is done carefully here:

- **Transactions**: a plugin request is answered either synchronously (``success`` + plugindata) or
  with ``ack`` followed by an ``event`` carrying the same transaction on the long poll; both resolve the
  same awaitable. Plugin errors (``error_code`` in the data) raise :class:`JanusError`.
- **Events** (webrtcup, hangup, media, slowlink, detached, plugin events) are routed to their handle's
  bounded queue and to an optional session-level callback, so the supervisor can follow thousands of
  handles with one task per Janus session.
- **Keepalive**: one ``keepalive`` every ``keepalive_seconds`` per Janus session (Janus reaps sessions
  idle for ``session_timeout``, and a plain-RTP participant lives only as long as its session).
- **Secrets**: ``apisecret`` on every API request, ``admin_secret`` on admin requests; a wrong secret is
  a :class:`JanusError` with code 403 and Janus's reason, not a silent hang.
- **Session loss** (Janus restarted, session timed out): every handle gets a ``session_lost`` event
  and pending requests fail, so calls are torn down instead of waiting forever.

Recommended use by the supervisor: a few long-lived Janus sessions (e.g. one per shard), one handle
per call. One Janus session per call would cost one long-poll connection per call.

Helpers for the two plugins: NoSIP ``generate``/``process`` (1:1 WebRTC ↔ plain RTP, no transcoding)
and AudioBridge rooms with plain-RTP participants. :func:`plain_rtp_answer` writes the bare SDP a media
worker answers with; :func:`parse_plain_sdp` reads Janus's side (address, port, payload types).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import Counter

from appliance.config import JanusConfig, secret

log = logging.getLogger(__name__)

EVENTS = Counter("va_janus_events_total", "Janus events received", ["kind"])
ERRORS = Counter("va_janus_errors_total", "Janus requests that failed", ["kind"])

NOSIP = "janus.plugin.nosip"
AUDIOBRIDGE = "janus.plugin.audiobridge"

ERR_SESSION_NOT_FOUND = 458
ERR_HANDLE_NOT_FOUND = 459
ERR_UNAUTHORIZED = 403

EventCallback = Callable[["JanusEvent"], Awaitable[None] | None]


class JanusError(Exception):
    """Janus (or a plugin) refused a request; ``code`` is Janus's or the plugin's error code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"janus error {code}: {reason}")
        self.code = code
        self.reason = reason


class JanusUnavailable(JanusError):
    """Janus could not be reached or did not answer in time."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, reason)


@dataclass(frozen=True)
class JanusEvent:
    """One event from Janus. ``kind``: webrtcup, hangup, media, slowlink, detached, event (plugin),
    trickle, timeout or session_lost. ``data`` is the plugin data for ``event``, else the raw message."""

    kind: str
    session_id: int
    handle_id: int | None
    data: dict[str, Any]
    jsep: dict[str, Any] | None = None

    @property
    def reason(self) -> str:
        return str(self.data.get("reason", ""))


@dataclass(frozen=True)
class PlainRtp:
    """The plain-RTP side described by a bare SDP (Janus's, or a worker's)."""

    ip: str
    port: int
    payload_type: int
    channels: int
    telephone_event_payload_type: int | None
    red_payload_type: int | None = None  # RFC 2198 red/48000/2 carrying this Opus PT (Chromium offers it)


def plain_rtp_answer(ip: str, port: int, payload_type: int, *, channels: int = 2,
                     telephone_event_payload_type: int | None = None,
                     red_payload_type: int | None = None) -> str:
    """The bare SDP a media worker answers NoSIP's ``generated`` offer with (plain RTP/AVP, Opus; RED
    when ``red_payload_type`` is given — NoSIP carries it into the browser's answer unchanged)."""
    # RED first: a browser sends with the first codec of the answer (Opus stays negotiated: we send it)
    pts = ([str(red_payload_type)] if red_payload_type is not None else []) + [str(payload_type)] \
        + ([str(telephone_event_payload_type)] if telephone_event_payload_type else [])
    family = "IP6" if ":" in ip else "IP4"
    lines = [
        "v=0",
        f"o=- {secrets.randbelow(2**31)} 1 IN {family} {ip}",
        "s=voice-appliance",
        f"c=IN {family} {ip}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(pts)}",
        f"a=rtpmap:{payload_type} opus/48000/{channels}",
        f"a=fmtp:{payload_type} useinbandfec=1",
    ]
    if red_payload_type is not None:
        lines += [f"a=rtpmap:{red_payload_type} red/48000/{channels}",
                  f"a=fmtp:{red_payload_type} {payload_type}/{payload_type}"]
    if telephone_event_payload_type:
        lines.append(f"a=rtpmap:{telephone_event_payload_type} telephone-event/48000")
    lines.append("a=sendrecv")
    return "\r\n".join(lines) + "\r\n"


_C_LINE = re.compile(r"^c=IN IP[46] (\S+)", re.M)
_M_AUDIO = re.compile(r"^m=audio (\d+) \S+ ([\d ]+)", re.M)
_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([A-Za-z0-9-]+)/(\d+)(?:/(\d+))?", re.M)


def parse_plain_sdp(sdp: str) -> PlainRtp:
    """Read address, port and Opus/telephone-event payload types from a bare (plain RTP) SDP."""
    c = _C_LINE.search(sdp)
    m = _M_AUDIO.search(sdp)
    if not c or not m:
        raise JanusError(0, "bare SDP without c= or m=audio line")
    opus_pt, channels, dtmf = None, 1, None
    for pt, name, _rate, ch in _RTPMAP.findall(sdp):
        if name.lower() == "opus" and opus_pt is None:
            opus_pt, channels = int(pt), int(ch or 1)
        elif name.lower() == "telephone-event" and dtmf is None:
            dtmf = int(pt)
    if opus_pt is None:
        raise JanusError(0, "bare SDP without opus")
    red = None
    for pt, name, _rate, _ch in _RTPMAP.findall(sdp):
        if name.lower() == "red" and re.search(rf"^a=fmtp:{pt} {opus_pt}(/{opus_pt})*\s*$", sdp, re.M):
            red = int(pt)
            break
    return PlainRtp(c.group(1), int(m.group(1)), opus_pt, channels, dtmf, red)


class JanusClient:
    """Connection settings and an HTTP client shared by all Janus sessions of one supervisor."""

    def __init__(
        self,
        url: str,
        *,
        api_secret: str = "",
        admin_url: str = "",
        admin_secret: str = "",
        keepalive_seconds: float = 25.0,
        request_timeout: float = 10.0,
        session_lost_after: float = 60.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.admin_url = admin_url.rstrip("/")
        self.api_secret = api_secret
        self.admin_secret = admin_secret
        self.keepalive_seconds = keepalive_seconds
        self.request_timeout = request_timeout
        self.session_lost_after = session_lost_after  # Janus unreachable this long → session_lost
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(
            timeout=request_timeout, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            trust_env=False,  # loopback only: never route Janus calls through an environment proxy
        )
        self.sessions: dict[int, JanusSession] = {}

    @classmethod
    def from_config(cls, cfg: JanusConfig) -> JanusClient:
        return cls(
            cfg.url,
            api_secret=secret(cfg.api_secret, cfg.api_secret_file),
            admin_url=cfg.admin_url,
            admin_secret=secret(cfg.admin_secret, cfg.admin_secret_file),
            keepalive_seconds=cfg.keepalive_seconds,
        )

    async def __aenter__(self) -> JanusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, destroy_sessions: bool = True) -> None:
        """Stop every session's tasks and close the HTTP client.

        ``destroy_sessions`` also destroys them in Janus (ending their calls); a supervisor that restarts
        in place passes False so Janus keeps the calls until their session timeout.
        """
        for session in list(self.sessions.values()):
            if destroy_sessions:
                with contextlib.suppress(JanusError):
                    await session.destroy()
            else:
                await session.stop()
        if self._own_http:
            await self.http.aclose()

    # -- raw requests -----------------------------------------------------------------------------
    async def post(self, path: str, body: dict[str, Any], *, admin: bool = False,
                   http_timeout: float | None = None) -> dict[str, Any]:
        """POST one request; returns Janus's reply; an ``error`` reply raises :class:`JanusError`."""
        body = {"transaction": secrets.token_hex(8), **body}
        if admin:
            base = self.admin_url
            if self.admin_secret:
                body["admin_secret"] = self.admin_secret
        else:
            base = self.url
            if self.api_secret:
                body["apisecret"] = self.api_secret
        try:
            resp = await self.http.post(base + path, json=body, timeout=http_timeout or self.request_timeout)
        except httpx.HTTPError as exc:
            ERRORS.labels("transport").inc()
            raise JanusUnavailable(f"{type(exc).__name__} talking to Janus at {base}: {exc}") from exc
        return _check(resp)

    async def info(self) -> dict[str, Any]:
        """GET /info (no secret needed): version, plugins, transports."""
        try:
            resp = await self.http.get(self.url + "/info")
        except httpx.HTTPError as exc:
            raise JanusUnavailable(f"Janus at {self.url} unreachable: {exc}") from exc
        return _check(resp)

    async def admin(self, request: str, **fields: Any) -> dict[str, Any]:
        """One Admin API request (``list_sessions``, ``list_handles``, ``handle_info``, ``ping``…)."""
        if not self.admin_url:
            raise JanusError(0, "janus.admin_url is not configured")
        path = ""
        if "session_id" in fields:
            path += f"/{int(fields.pop('session_id'))}"
            if "handle_id" in fields:
                path += f"/{int(fields.pop('handle_id'))}"
        return await self.post(path, {"janus": request, **fields}, admin=True)

    async def create_session(self, on_event: EventCallback | None = None) -> JanusSession:
        """Create a Janus session and start its long-poll and keepalive tasks."""
        data = await self.post("", {"janus": "create"})
        session = JanusSession(self, int(data["data"]["id"]), on_event)
        self.sessions[session.id] = session
        session._start()
        return session

    async def resume_session(self, session_id: int, on_event: EventCallback | None = None) -> JanusSession:
        """Pick up an existing Janus session by id (a restarted supervisor adopting its calls): ``claim``
        it, so Janus delivers its events to this connection again (after the old transport went away it
        kept the session for ``reclaim_session_timeout``), and start its long poll and keepalives.
        If Janus no longer knows it, the session is closed at once (``session_lost`` follows)."""
        session = JanusSession(self, int(session_id), on_event)
        self.sessions[session.id] = session
        try:
            await session._post("", {"janus": "claim"})
        except JanusError as exc:
            log.warning("janus session not reclaimed", extra={"janus_session": session.id, "error": str(exc)})
            session._close("not reclaimed")
            return session
        session._start()
        return session


def _check(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError as exc:
        ERRORS.labels("protocol").inc()
        raise JanusError(resp.status_code, f"non-JSON reply from Janus (HTTP {resp.status_code})") from exc
    if isinstance(data, dict) and data.get("janus") == "error":
        err = data.get("error") or {}
        ERRORS.labels("refused").inc()
        raise JanusError(int(err.get("code", 0)), str(err.get("reason", "unknown error")))
    if resp.status_code >= 400:
        ERRORS.labels("http").inc()
        raise JanusError(resp.status_code, f"HTTP {resp.status_code} from Janus")
    return data


class JanusSession:
    """One Janus session: handles, the long-poll event loop and keepalives."""

    def __init__(self, client: JanusClient, session_id: int, on_event: EventCallback | None) -> None:
        self.client = client
        self.id = session_id
        self.on_event = on_event
        self.handles: dict[int, JanusHandle] = {}
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.last_keepalive_ok = 0.0

    def _start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name=f"janus-poll-{self.id}"),
            asyncio.create_task(self._keepalive_loop(), name=f"janus-keepalive-{self.id}"),
        ]

    @property
    def alive(self) -> bool:
        return not self.closed.is_set()

    async def attach(self, plugin: str, opaque_id: str | None = None, queue_size: int = 256) -> JanusHandle:
        """Attach a plugin handle (``janus.plugin.nosip``, ``janus.plugin.audiobridge``)."""
        body: dict[str, Any] = {"janus": "attach", "plugin": plugin}
        if opaque_id:
            body["opaque_id"] = opaque_id
        data = await self._post("", body)
        handle = JanusHandle(self, int(data["data"]["id"]), plugin, queue_size)
        self.handles[handle.id] = handle
        return handle

    def adopt_handle(self, handle_id: int, plugin: str, queue_size: int = 256) -> JanusHandle:
        """A handle attached by an earlier supervisor (``JanusClient.resume_session``)."""
        handle = JanusHandle(self, int(handle_id), plugin, queue_size)
        self.handles[handle.id] = handle
        return handle

    async def keepalive(self) -> None:
        await self._post("", {"janus": "keepalive"})
        self.last_keepalive_ok = time.monotonic()

    async def destroy(self) -> None:
        """Destroy the Janus session (all its handles go with it) and stop the background tasks."""
        try:
            if self.alive:
                await self._post("", {"janus": "destroy"})
        finally:
            self._close("destroyed")
            await self.stop()

    async def stop(self) -> None:
        """Stop polling and keepalives without touching the session in Janus."""
        self.client.sessions.pop(self.id, None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                # expected from the cancelled loop; re-raise only if WE were cancelled meanwhile
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:  # a loop's own failure is already logged; stopping anyway
                pass

    async def _post(
        self, path: str, body: dict[str, Any], http_timeout: float | None = None
    ) -> dict[str, Any]:
        if not self.alive:
            raise JanusError(ERR_SESSION_NOT_FOUND, f"session {self.id} is gone ({self.close_reason})")
        try:
            return await self.client.post(f"/{self.id}{path}", body, http_timeout=http_timeout)
        except JanusError as exc:
            if exc.code == ERR_SESSION_NOT_FOUND:
                self._close("session not found")
            raise

    async def _request(self, path: str, body: dict[str, Any], reply_timeout: float | None) -> dict[str, Any]:
        """POST and, on ``ack``, wait for the event with the same transaction from the long poll."""
        tx = secrets.token_hex(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[tx] = fut
        try:
            reply = await self._post(path, {**body, "transaction": tx}, http_timeout=reply_timeout)
            if reply.get("janus") != "ack":
                return reply
            try:
                async with asyncio.timeout(reply_timeout or self.client.request_timeout):
                    return await fut
            except TimeoutError as exc:
                ERRORS.labels("timeout").inc()
                raise JanusUnavailable(f"no reply from Janus to {body.get('body', body)!r}") from exc
        finally:
            self._pending.pop(tx, None)

    # -- background loops -------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        params = {"maxev": "20"}
        if self.client.api_secret:
            params["apisecret"] = self.client.api_secret
        backoff = 0.05
        failing_since: float | None = None
        url = f"{self.client.url}/{self.id}"
        poll_timeout = httpx.Timeout(self.client.request_timeout, read=65.0)  # Janus answers within 30 s
        while self.alive:
            try:
                query = {**params, "rid": str(time.time_ns())}
                try:
                    resp = await self.client.http.get(url, params=query, timeout=poll_timeout)
                except httpx.HTTPError as exc:
                    ERRORS.labels("transport").inc()
                    raise JanusUnavailable(repr(exc)) from exc
                data = _check(resp)
                backoff, failing_since = 0.05, None
            except JanusError as exc:
                # a restarted Janus answers the long poll of a session it never knew with HTTP 404
                if exc.code in (ERR_SESSION_NOT_FOUND, 404):
                    self._close("session not found")
                    return
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.client.session_lost_after:
                    # Janus has been unreachable longer than it keeps idle sessions: the calls are gone
                    self._close("janus unreachable")
                    return
                log.warning("janus long poll failed", extra={"janus_session": self.id, "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)  # a restarted Janus is noticed within 1 s
                continue
            for msg in data if isinstance(data, list) else [data]:
                await self._dispatch(msg)

    async def _keepalive_loop(self) -> None:
        interval = self.client.keepalive_seconds
        if interval <= 0:
            return
        while self.alive:
            await asyncio.sleep(interval)
            try:
                await self.keepalive()
            except JanusError as exc:
                if exc.code == ERR_SESSION_NOT_FOUND:
                    return
                log.warning("janus keepalive failed", extra={"janus_session": self.id, "error": str(exc)})

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("janus")
        if kind in ("keepalive", "ack", None):
            return
        tx = msg.get("transaction")
        if tx and tx in self._pending and kind in ("event", "success", "error"):
            fut = self._pending[tx]
            if not fut.done():
                fut.set_result(msg)
            return
        handle_id = msg.get("sender")
        if kind == "event":
            pdata = msg.get("plugindata", {}).get("data", {})
            event = JanusEvent("event", self.id, handle_id, pdata, msg.get("jsep"))
        else:
            event = JanusEvent(str(kind), self.id, handle_id, msg)
        EVENTS.labels(event.kind if event.kind in _EVENT_KINDS else "other").inc()
        if kind == "timeout":
            self._close("timed out in Janus")
            return
        handle = self.handles.get(handle_id) if handle_id is not None else None
        if handle is not None:
            handle._deliver(event)
            if kind == "detached":
                self.handles.pop(handle.id, None)
        await self._notify(event)

    async def _notify(self, event: JanusEvent) -> None:
        if self.on_event is None:
            return
        try:
            result = self.on_event(event)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("janus event callback failed", extra={"janus_session": self.id})

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self.client.sessions.pop(self.id, None)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(JanusError(ERR_SESSION_NOT_FOUND, f"session {self.id} {reason}"))
        lost = [JanusEvent("session_lost", self.id, hid, {"reason": reason}) for hid in self.handles]
        for event in lost:
            self.handles[event.handle_id]._deliver(event)  # type: ignore[index]
        if self.on_event is not None:
            for event in lost or [JanusEvent("session_lost", self.id, None, {"reason": reason})]:
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().create_task(self._notify(event))
        if reason != "destroyed":
            log.warning("janus session lost", extra={"janus_session": self.id, "reason": reason})


_EVENT_KINDS = {"webrtcup", "hangup", "media", "slowlink", "detached", "event", "trickle", "timeout"}


class JanusHandle:
    """One plugin handle (one call's leg in Janus)."""

    def __init__(self, session: JanusSession, handle_id: int, plugin: str, queue_size: int) -> None:
        self.session = session
        self.id = handle_id
        self.plugin = plugin
        self._events: asyncio.Queue[JanusEvent] = asyncio.Queue(queue_size)
        self.dropped_events = 0
        self.generated_sdp = ""  # NoSIP's bare offer after nosip_generate

    def _deliver(self, event: JanusEvent) -> None:
        if self._events.full():
            self._events.get_nowait()  # keep the newest: a stale media event is worth less
            self.dropped_events += 1
        self._events.put_nowait(event)

    async def next_event(self, wait: float | None = None) -> JanusEvent:
        """The next event of this handle (webrtcup, media, hangup, slowlink, detached, event…)."""
        async with asyncio.timeout(wait):
            return await self._events.get()

    async def wait_for(self, kind: str, wait: float = 10.0) -> JanusEvent:
        """Skip events until one of ``kind`` arrives (``session_lost`` raises :class:`JanusError`)."""
        async with asyncio.timeout(wait):
            while True:
                event = await self._events.get()
                if event.kind == kind:
                    return event
                if event.kind == "session_lost":
                    raise JanusError(ERR_SESSION_NOT_FOUND, f"session lost while waiting for {kind}")

    async def events(self) -> AsyncIterator[JanusEvent]:
        while True:
            yield await self._events.get()

    async def message(self, body: dict[str, Any], jsep: dict[str, Any] | None = None,
                      reply_timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Send a plugin request; returns (plugin data, jsep) of its reply, sync or async."""
        req: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            req["jsep"] = jsep
        reply = await self.session._request(f"/{self.id}", req, reply_timeout)
        if reply.get("janus") == "error":
            err = reply.get("error") or {}
            raise JanusError(int(err.get("code", 0)), str(err.get("reason", "")))
        pdata = reply.get("plugindata", {}).get("data", {})
        if "error_code" in pdata:
            ERRORS.labels("plugin").inc()
            raise JanusError(int(pdata["error_code"]), str(pdata.get("error", "plugin error")))
        return pdata, reply.get("jsep")

    async def trickle(self, candidate: dict[str, Any] | None) -> None:
        """Send one caller candidate ({candidate, sdpMid, sdpMLineIndex}); ``None`` = completed."""
        body = {"janus": "trickle", "candidate": candidate if candidate is not None else {"completed": True}}
        await self.session._post(f"/{self.id}", body)

    async def hangup(self) -> None:
        """Tear down the handle's PeerConnection (Janus sends a ``hangup`` event)."""
        await self.session._post(f"/{self.id}", {"janus": "hangup"})

    async def detach(self) -> None:
        """Detach the handle from its plugin (Janus sends a ``detached`` event)."""
        try:
            await self.session._post(f"/{self.id}", {"janus": "detach"})
        finally:
            self.session.handles.pop(self.id, None)

    # -- NoSIP ------------------------------------------------------------------------------------
    async def nosip_generate(self, offer_sdp: str, info: str = "") -> PlainRtp:
        """Hand the caller's WebRTC offer to NoSIP; returns Janus's plain-RTP side (its bare offer)."""
        data, _ = await self.message({"request": "generate", "info": info},
                                     jsep={"type": "offer", "sdp": offer_sdp})
        data = data.get("result", data)  # NoSIP wraps its event in "result"
        if data.get("event") != "generated" or "sdp" not in data:
            raise JanusError(0, f"unexpected NoSIP reply to generate: {data}")
        self.generated_sdp = str(data["sdp"])
        return parse_plain_sdp(self.generated_sdp)

    async def nosip_process_answer(self, bare_answer_sdp: str) -> str:
        """Give NoSIP the media worker's bare answer; returns the WebRTC SDP answer for the caller."""
        data, jsep = await self.message({"request": "process", "type": "answer", "sdp": bare_answer_sdp})
        data = data.get("result", data)
        if data.get("event") != "processed" or not jsep or "sdp" not in jsep:
            raise JanusError(0, f"unexpected NoSIP reply to process: {data}")
        return str(jsep["sdp"])

    # -- AudioBridge ------------------------------------------------------------------------------
    async def audiobridge_create_room(self, room: int | None = None, *, admin_key: str = "",
                                      sampling_rate: int = 48000, prebuffer: int = 2,
                                      description: str = "", room_secret: str = "",
                                      extra: dict[str, Any] | None = None) -> int:
        """Create a (non-permanent) room that allows plain-RTP participants; returns its id."""
        body: dict[str, Any] = {
            "request": "create", "permanent": False, "allow_rtp_participants": True,
            "sampling_rate": sampling_rate, "default_prebuffering": prebuffer, "audiolevel_ext": False,
            "is_private": True,
        }
        if room is not None:
            body["room"] = room
        for key, value in (("admin_key", admin_key), ("description", description), ("secret", room_secret)):
            if value:
                body[key] = value
        body.update(extra or {})
        data, _ = await self.message(body)
        return int(data["room"])

    async def audiobridge_destroy_room(self, room: int, room_secret: str = "") -> None:
        body: dict[str, Any] = {"request": "destroy", "room": room}
        if room_secret:
            body["secret"] = room_secret
        await self.message(body)

    async def audiobridge_join_rtp(self, room: int, ip: str, port: int, *, payload_type: int = 111,
                                   display: str = "", fec: bool = True, prebuffer: int | None = None,
                                   ) -> tuple[PlainRtp, int]:
        """Join ``room`` as a plain-RTP participant that receives at ``ip:port``.

        Returns (Janus's RTP side, participant id). Janus sends nothing until the worker's first RTP
        packet arrives, and it ``connect()``s to ``ip:port``: the worker must send from that port.
        """
        body: dict[str, Any] = {"request": "join", "room": room, "codec": "opus",
                                "rtp": {"ip": ip, "port": port, "payload_type": payload_type, "fec": fec}}
        if display:
            body["display"] = display
        if prebuffer is not None:
            body["prebuffer"] = prebuffer
        data, _ = await self.message(body)
        if data.get("audiobridge") != "joined" or "rtp" not in data:
            raise JanusError(0, f"unexpected AudioBridge reply to join: {data}")
        rtp = data["rtp"]
        side = PlainRtp(str(rtp["ip"]), int(rtp["port"]), int(rtp.get("payload_type", payload_type)), 1, None)
        return side, int(data["id"])

    async def audiobridge_join_webrtc(self, room: int, offer_sdp: str, *, display: str = "") -> str:
        """Join ``room`` as a WebRTC participant with the caller's offer; returns the SDP answer."""
        body: dict[str, Any] = {"request": "join", "room": room, "codec": "opus"}
        if display:
            body["display"] = display
        data, jsep = await self.message(body, jsep={"type": "offer", "sdp": offer_sdp})
        if data.get("audiobridge") != "joined":
            raise JanusError(0, f"unexpected AudioBridge reply to join: {data}")
        if not jsep:
            # Janus 1.1 answers the offer with the join's event; if it did not, configure carries it
            offer = {"type": "offer", "sdp": offer_sdp}
            data, jsep = await self.message({"request": "configure"}, jsep=offer)
        if not jsep or "sdp" not in jsep:
            raise JanusError(0, "AudioBridge did not answer the offer")
        return str(jsep["sdp"])
