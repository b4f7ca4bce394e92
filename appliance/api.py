"""The public session API: a Starlette ASGI app in front of the control plane.

Why Starlette (and not FastAPI): the surface is a handful of routes whose security checks must run in a fixed,
visible order — credential (JWT or session token), per-``sub`` rate limit, body size, body schema, SDP
validation, concurrent-session cap, then the control plane — and FastAPI's dependency injection would
hide that order for little gain. Per-IP limits apply only where there is no identity: unauthenticated
paths and refused credentials (docs/security.md "Limits after identity"). Bodies
are parsed with pydantic (already a dependency of google-genai) so the same models give the OpenAPI
document at ``/openapi.json``.

The app knows nothing about Janus, shards or workers: it calls a :class:`SessionService` (the
supervisor implements it). Every error is JSON ``{"error": code, "detail": reason}``:
400 bad body/SDP, 401 bad token, 403 a session token used for another session, 404 unknown (or someone
else's) session, 409 refresh too early, 413 body too large, 429 rate limited or too many sessions
(Retry-After), 503 full/draining/not ready (Retry-After), 504 control plane timeout. Only the token's
``sub`` may see or touch its own sessions; someone else's session is a plain 404 so ids cannot be probed.
A 5xx body never carries internal detail (a Janus reason, a URL): that goes to the log only.

Session credentials (appliance/session_token.py): the 201 carries ``session_token``, which authorises
trickle/GET/DELETE/refresh and a resume of that one session; ``POST /v1/sessions/{id}/refresh`` swaps
it for a fresh one in its last two minutes. A bearer JWT of the owning ``sub`` works on those routes too.

TURN credentials: ``GET /v1/ice-servers`` hands out the ICE server list (coturn HMAC credentials, TTL
≤ 1 h) *before* a session exists, because a caller must know its TURN server when it gathers candidates
for its offer — a relay-only caller (``iceTransportPolicy: "relay"``) has no candidate at all otherwise.
The 201 of ``POST /v1/sessions`` still carries a list too (for ICE restarts).

Client IP (:func:`client_ip`): the TCP peer, unless the peer is in ``api.trusted_proxies``; then the
rightmost address in ``X-Forwarded-For`` that is not itself a trusted proxy (each proxy appends the
address it saw, so everything left of the last untrusted hop may be forged by the caller). uvicorn's own
proxy-header handling is off: this is the one place that decides.

Fleet routing: session ids name their box (``<box_id>.<random>``) and the load balancer sends
``/v1/sessions/{id}…`` to that box. A request that still reaches the wrong box (stale route, a box
renamed) gets a 404 ``wrong_box`` saying which box owns the id; an unknown id a 404 ``not_found``; a
session that resumed on another box a 404 ``moved`` for trickle/DELETE (GET shows ``state: moved`` and
``details.moved_to``). None of them is dropped silently.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from appliance import __version__
from appliance.auth import AuthError, JwtVerifier, Principal
from appliance.config import DEFAULT_TENANT, Config, box_id
from appliance.ratelimit import ANON, AUTH_FAIL, CREATE, SIGNAL, Decision, RateLimiter, SessionCap
from appliance.sdp import MAX_SDP_BYTES, OfferInfo, SdpError, validate_offer
from appliance.session_token import (
    REFRESH_WINDOW_SECONDS,
    SessionGrant,
    SessionTokenError,
    SessionTokens,
    is_session_token,
)
from appliance.turn import MAX_TTL_SECONDS, ice_servers

log = logging.getLogger(__name__)

REQUESTS = Counter("va_api_requests_total", "Session API requests by route and status", ["route", "status"])
LATENCY = Histogram(
    "va_api_request_duration_seconds",
    "Session API request handling time",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

SESSION_ID_RE = re.compile(r"^(?:[a-z0-9][a-z0-9-]{0,30}\.)?[A-Za-z0-9_-]{1,64}$")  # [box.]random
DEFAULT_RETRY_AFTER = 5.0


# ---------------------------------------------------------------------------------------------------
# The contract with the control plane
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionOptions:
    """What the caller asked for besides the SDP offer."""

    mode: Literal["direct", "room"] = "direct"
    voice: str | None = None
    language: str | None = None
    resume_token: str | None = None
    offer: OfferInfo | None = None  # the validated offer's essentials (opus PT, channels, DTMF PT)
    recording: str | None = None  # "audio": this call opts in (workers/ai/recording.py)


@dataclass(frozen=True)
class ClientInfo:
    """Who is calling: the token's subject and the client's address.

    ``session_id`` is set when the credential is a session token: it may act on (resume) that session
    only, and the service must refuse a resume token of any other session."""

    sub: str
    ip: str
    scopes: frozenset[str] = frozenset()
    user_agent: str = ""
    session_id: str | None = None
    tenant: str = ""  # the JWT's `tenant` claim, checked against [tenants.<name>]; "" = none/default


@dataclass(frozen=True)
class CreatedSession:
    session_id: str
    answer_sdp: str
    resume_token: str
    expires_at: float  # unix time after which the session (and its resume token) is gone
    resumed_from: str = ""  # a resume on another box: the id the session had there


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    owner: str  # the ``sub`` that created it
    state: str  # e.g. connecting | active | disconnected | ended
    mode: str
    created_at: float
    expires_at: float
    details: dict[str, Any] = field(default_factory=dict)  # extra non-secret fields for the caller


@dataclass(frozen=True)
class IceCandidate:
    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None


class ServiceError(Exception):
    """Raised by a :class:`SessionService` to answer with a specific status and JSON error.

    ``detail`` of a 5xx goes to the log only (it may name Janus's reason or an internal URL); the client
    gets :data:`PUBLIC_5XX` for the status unless the raiser marks its detail ``public`` (our own words,
    e.g. "no capacity (full)")."""

    status = 500
    code = "internal"
    public_default: bool | None = None  # None: public below 500

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None, public: bool | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status or type(self).status
        self.code = code or type(self).code
        self.retry_after = retry_after
        chosen = public if public is not None else type(self).public_default
        self.public = self.status < 500 if chosen is None else chosen


PUBLIC_5XX = {
    500: "internal error",
    502: "the media gateway could not set up the call; try again",
    503: "temporarily unavailable; try again",
    504: "timed out; try again",
}


class CapacityError(ServiceError):
    """No room for another session (all shards full, or draining): 503 with Retry-After."""

    status = 503
    code = "capacity"
    public_default = True


class SessionNotFound(ServiceError):
    status = 404
    code = "not_found"


class InvalidRequest(ServiceError):
    """The request is well-formed but unacceptable (e.g. an unknown voice or a dead resume token)."""

    status = 400
    code = "invalid_request"


class UpstreamError(ServiceError):
    """Janus or a worker failed to set the session up."""

    status = 502
    code = "upstream"


class SessionService(Protocol):
    """What the API needs from the control plane (implemented by the supervisor)."""

    async def create(self, offer_sdp: str, options: SessionOptions, client: ClientInfo) -> CreatedSession:
        """Admit, place and set up a session; raise :class:`CapacityError` when full."""
        ...

    async def trickle(self, session_id: str, candidate: IceCandidate | None) -> None:
        """Pass a caller ICE candidate to Janus; ``None`` means end of candidates."""
        ...

    async def get(self, session_id: str) -> SessionInfo | None: ...

    async def delete(self, session_id: str) -> bool:
        """Tear a session down; False if it did not exist. The service releases the session's
        :class:`SessionCap` lease whenever a session ends (delete, hangup, timeout)."""
        ...

    def ready(self) -> bool:
        """True when new sessions can be admitted (not starting, not draining)."""
        ...

    def retry_after(self) -> float:
        """Seconds a refused caller should wait before retrying (503 responses)."""
        ...


# ---------------------------------------------------------------------------------------------------
# Wire models (also the OpenAPI schemas)
# ---------------------------------------------------------------------------------------------------
class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sdp: str = Field(max_length=MAX_SDP_BYTES, description="The caller's WebRTC SDP offer")
    type: Literal["offer"]
    voice: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    language: str | None = Field(None, max_length=35, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")
    mode: Literal["direct", "room"] = "direct"
    resume_token: str | None = Field(None, min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    recording: Literal["audio"] | None = Field(
        None, description="Opt this call in to recording (stereo Ogg Opus, docs/compliance.md); absent: the "
                          "tenant's `recording` policy. A call cannot opt out of a tenant's recording")


class IceServer(BaseModel):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class CreateSessionResponse(BaseModel):
    session_id: str
    sdp: str
    type: Literal["answer"] = "answer"
    ice_servers: list[IceServer]
    resume_token: str
    expires_at: str = Field(description="RFC 3339 UTC time")
    resumed_from: str | None = Field(None, description="Set when a resume moved the session to this box: "
                                                       "its previous id (the new session_id names this box)")
    session_token: str = Field(description="Bearer credential for this session's trickle/GET/DELETE/"
                                           "refresh/resume only; refresh it in its last 120 s")
    session_token_expires_at: str = Field(description="RFC 3339 UTC time")
    ai_generated_audio: bool = Field(default=True, description="The audio this session sends the caller is "
                                                       "AI-generated (EU AI Act art. 50(2) marking)")


class RefreshResponse(BaseModel):
    session_token: str
    session_token_expires_at: str = Field(description="RFC 3339 UTC time")


class IceServersResponse(BaseModel):
    ice_servers: list[IceServer] = Field(description="RTCPeerConnection iceServers (STUN, then TURN with "
                                                    "fresh coturn HMAC credentials)")
    ttl: int = Field(description="Seconds the TURN credentials stay valid (at most 3600)")


class IceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str | None = Field(None, max_length=1024)
    sdpMid: str | None = Field(None, max_length=64)  # the browser's RTCIceCandidateInit field names
    sdpMLineIndex: int | None = Field(None, ge=0, le=63)
    usernameFragment: str | None = Field(None, max_length=256)
    completed: bool | None = None

    @model_validator(mode="after")
    def _one_of(self) -> IceRequest:
        if self.completed:
            if self.candidate:
                raise ValueError("send either a candidate or completed:true, not both")
            return self
        if self.candidate is None:
            raise ValueError("candidate is required (or completed:true)")
        if self.candidate and not self.candidate.startswith(("candidate:", "a=candidate:")):
            raise ValueError("candidate must start with 'candidate:'")
        if self.sdpMid is None and self.sdpMLineIndex is None:
            raise ValueError("sdpMid or sdpMLineIndex is required")
        return self


class SessionResponse(BaseModel):
    session_id: str
    state: str
    mode: str
    created_at: str
    expires_at: str
    details: dict[str, Any] = Field(default_factory=dict)
    ai_generated_audio: bool = Field(default=True, description="The audio this session sends is AI-generated")


class ErrorResponse(BaseModel):
    error: str
    detail: str


class HealthResponse(BaseModel):
    status: str
    version: str = __version__


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _retry_after(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds or DEFAULT_RETRY_AFTER)))}


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    hdrs = {"Cache-Control": "no-store", **(headers or {})}
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=hdrs)


def _validation_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


Handler = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)


@dataclass
class _Deps:
    cfg: Config
    service: SessionService
    verifier: JwtVerifier
    limiter: RateLimiter | None
    create_timeout: float
    ice_servers: Callable[[str], list[dict[str, Any]]]
    tokens: SessionTokens
    cap: SessionCap | None
    box: str = ""
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    async def limit(self, bucket: str, who: str) -> None:
        """Count one request; raise 429 (Retry-After, reason) when ``who`` is over ``bucket``."""
        if self.limiter is None:
            return
        decision = await self.limiter.check(bucket, who)
        if not decision.allowed:
            raise _limited(decision, _LIMIT_REASON[bucket])


_LIMIT_REASON = {
    CREATE: "too many new sessions for this user",
    SIGNAL: "too many requests for this user",
    ANON: "too many requests from this address",
    AUTH_FAIL: "too many refused credentials from this address",
}


def _limited(decision: Decision, reason: str) -> ApiError:
    return ApiError(429, "rate_limited", f"{reason}; retry in {decision.retry_after_header} s",
                    {"Retry-After": decision.retry_after_header})


@dataclass(frozen=True)
class _Caller:
    """A verified credential: a JWT principal, or a session token's grant (then ``grant`` is set)."""

    sub: str
    scopes: frozenset[str]
    grant: SessionGrant | None = None
    tenant: str = ""  # the JWT's checked `tenant` claim (a session token's resume keeps its record's)


DepsHandler = Callable[[Request, _Deps], Awaitable[Response]]


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------
def create_app(
    cfg: Config,
    service: SessionService,
    *,
    verifier: JwtVerifier | None = None,
    limiter: RateLimiter | None = None,
    create_timeout: float | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    ice_servers_fn: Callable[[str], list[dict[str, Any]]] | None = None,
    tokens: SessionTokens | None = None,
    cap: SessionCap | None = None,
) -> Starlette:
    """Build the ASGI app.

    ``verifier`` defaults to one built from ``cfg.auth`` (the public key file must exist); ``limiter``
    None disables rate limiting (tests; the supervisor passes
    ``RateLimiter(redis_client(cfg.redis), cfg.limits)``). ``create_timeout`` defaults to
    ``api.create_timeout_seconds``. ``extra_routes`` (demo page, static files,
    metrics) are appended after the API routes. ``ice_servers_fn(sub)`` (the caller's JWT ``sub``)
    overrides the ICE server list (default: coturn HMAC credentials from ``cfg.turn`` for
    ``cfg.api.public_host``). ``tokens`` issues/verifies session tokens (default: from ``cfg.auth``);
    ``cap`` (None: no concurrent-session cap) is the per-sub session cap the service also holds.
    """
    deps = _Deps(
        cfg=cfg,
        service=service,
        verifier=verifier or JwtVerifier.from_config(cfg.auth),
        limiter=limiter,
        create_timeout=create_timeout or cfg.api.create_timeout_seconds,
        ice_servers=ice_servers_fn or (lambda sub: ice_servers(cfg.turn, sub, cfg.api.public_host)),
        tokens=tokens or SessionTokens.from_config(cfg.auth),
        cap=cap,
        box=box_id(cfg),
        trusted=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.api.trusted_proxies),
    )

    def route(name: str, anonymous: bool = False) -> Callable[[DepsHandler], Handler]:
        """Wrap a handler with error mapping, metrics, and the per-IP limits (``anonymous`` routes;
        refused credentials everywhere)."""

        def wrap(fn: DepsHandler) -> Handler:
            async def endpoint(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    if anonymous:
                        await deps.limit(ANON, client_ip(request, deps.trusted))
                    response = await fn(request, deps)
                except ApiError as exc:
                    response = error_response(exc.status, exc.code, exc.detail, exc.headers)
                except AuthError as exc:
                    response = await _auth_failed(request, deps, exc)
                except ServiceError as exc:
                    headers = _retry_after(exc.retry_after) if exc.status in (429, 503) else {}
                    detail = exc.detail
                    if not exc.public:
                        log.warning("session API: service error", extra={
                            "route": name, "status": exc.status, "error": exc.code, "detail": exc.detail})
                        detail = PUBLIC_5XX.get(exc.status, PUBLIC_5XX[500])
                    response = error_response(exc.status, exc.code, detail, headers)
                except Exception:
                    log.exception("session API: unexpected error", extra={"route": name})
                    response = error_response(500, "internal", "internal error")
                REQUESTS.labels(name, str(response.status_code)).inc()
                LATENCY.labels(name).observe(time.perf_counter() - start)
                return response

            return endpoint

        return wrap

    @route("create_session")
    async def create_session(request: Request, d: _Deps) -> Response:
        caller = _credential(request, d)
        await d.limit(CREATE, caller.sub)
        body = await _parse(request, d.cfg.api.max_body_bytes, CreateSessionRequest)
        if caller.grant is not None and not body.resume_token:
            raise ApiError(403, "forbidden", "a session token can only resume its own session "
                           "(send resume_token); create a new session with a JWT")
        try:
            offer = validate_offer(body.sdp)
        except SdpError as exc:
            raise ApiError(400, "invalid_sdp", str(exc)) from exc
        if not d.service.ready():
            raise ApiError(503, "not_ready", "not accepting new sessions (starting or draining)",
                           _retry_after(d.service.retry_after()))
        options = SessionOptions(mode=body.mode, voice=body.voice, language=body.language,
                                 resume_token=body.resume_token, offer=offer, recording=body.recording)
        client = _client(request, caller, d.trusted)
        # a session token's own session may already hold its lease (a resume): it is not counted twice
        lease = caller.grant.session_id if caller.grant else "pending:" + secrets.token_urlsafe(9)
        if d.cap is not None:
            decision = await d.cap.acquire(caller.sub, lease, d.create_timeout + 5)
            if not decision.allowed:
                raise _limited(decision, f"this user already has {d.cap.cap} live sessions")
        try:
            async with asyncio.timeout(d.create_timeout):
                created = await d.service.create(body.sdp, options, client)
        except TimeoutError as exc:
            await _drop_lease(d, caller, lease)
            raise ApiError(504, "timeout", "session setup timed out") from exc
        except BaseException:
            await _drop_lease(d, caller, lease)
            raise
        if d.cap is not None:  # the session's own lease (full length), replacing the pending one
            await d.cap.confirm(caller.sub, lease, created.session_id)
        token, token_exp = d.tokens.issue(created.session_id, caller.sub)
        out = CreateSessionResponse(
            session_id=created.session_id,
            sdp=created.answer_sdp,
            ice_servers=[IceServer(**s) for s in d.ice_servers(caller.sub)],
            resume_token=created.resume_token,
            expires_at=rfc3339(created.expires_at),
            session_token=token,
            session_token_expires_at=rfc3339(token_exp),
            resumed_from=created.resumed_from or None,
        )
        return JSONResponse(out.model_dump(exclude_none=True), status_code=201,
                            headers={"Cache-Control": "no-store",
                                     "Location": f"/v1/sessions/{created.session_id}"})

    @route("ice_servers")
    async def get_ice_servers(request: Request, d: _Deps) -> Response:
        # before the offer: a relay-only caller needs TURN credentials to gather relay candidates at all.
        # The TURN user is a keyed hash of the token's sub (appliance.turn.turn_user): per-caller quotas
        # bind, and coturn's logs hold no personal data.
        caller = _credential(request, d)
        await d.limit(SIGNAL, caller.sub)
        servers = d.ice_servers(caller.sub)
        ttl = max(1, min(int(d.cfg.turn.ttl_seconds), MAX_TTL_SECONDS))
        out = IceServersResponse(ice_servers=[IceServer(**s) for s in servers], ttl=ttl)
        return JSONResponse(out.model_dump(exclude_none=True), headers={"Cache-Control": "no-store"})

    @route("trickle")
    async def trickle(request: Request, d: _Deps) -> Response:
        sid, _ = await _session_access(request, d, live=True)
        body = await _parse(request, d.cfg.api.max_body_bytes, IceRequest)
        # completed:true, or the empty candidate some browsers send, both mean end of candidates
        candidate = None if body.completed or not body.candidate else IceCandidate(
            candidate=(body.candidate or "").removeprefix("a="), sdp_mid=body.sdpMid,
            sdp_mline_index=body.sdpMLineIndex)
        await d.service.trickle(sid.session_id, candidate)
        return Response(status_code=204, headers={"Cache-Control": "no-store"})

    @route("get_session")
    async def get_session(request: Request, d: _Deps) -> Response:
        info, _ = await _session_access(request, d)
        out = SessionResponse(session_id=info.session_id, state=info.state, mode=info.mode,
                              created_at=rfc3339(info.created_at), expires_at=rfc3339(info.expires_at),
                              details=info.details)
        return JSONResponse(out.model_dump(), headers={"Cache-Control": "no-store"})

    @route("delete_session")
    async def delete_session(request: Request, d: _Deps) -> Response:
        info, _ = await _session_access(request, d, live=True)
        if not await d.service.delete(info.session_id):
            raise ApiError(404, "not_found", "no such session on this box (unknown, expired or ended)")
        return Response(status_code=204, headers={"Cache-Control": "no-store"})

    @route("refresh_session")
    async def refresh_session(request: Request, d: _Deps) -> Response:
        info, caller = await _session_access(request, d, live=True)
        if info.state == "ended":
            raise ApiError(404, "not_found", "no such session")
        if caller.grant is not None:  # a JWT re-authorises at any time; a session token only near its end
            left = caller.grant.expires_at - time.time()
            if left > REFRESH_WINDOW_SECONDS:
                wait = left - REFRESH_WINDOW_SECONDS
                raise ApiError(409, "too_early", f"session token still valid for {left:.0f} s; refresh in "
                               f"its last {REFRESH_WINDOW_SECONDS} s", _retry_after(wait))
        token, exp = d.tokens.issue(info.session_id, caller.sub)
        out = RefreshResponse(session_token=token, session_token_expires_at=rfc3339(exp))
        return JSONResponse(out.model_dump(), headers={"Cache-Control": "no-store"})

    @route("healthz")
    async def healthz(request: Request, d: _Deps) -> Response:
        return JSONResponse(HealthResponse(status="ok").model_dump())

    @route("readyz")
    async def readyz(request: Request, d: _Deps) -> Response:
        if d.service.ready():
            return JSONResponse(HealthResponse(status="ready").model_dump())
        raise ApiError(503, "not_ready", "not accepting new sessions (starting or draining)",
                       _retry_after(d.service.retry_after()))

    openapi = build_openapi()

    @route("openapi", anonymous=True)
    async def openapi_json(request: Request, d: _Deps) -> Response:
        return JSONResponse(openapi)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal", "internal error")

    middleware = []
    if cfg.api.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.api.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    async def session_resource(request: Request) -> Response:
        # one Route per path, so a 405 lists every method the resource supports in Allow
        return await (delete_session if request.method == "DELETE" else get_session)(request)

    routes: list[BaseRoute] = [
        Route("/v1/sessions", create_session, methods=["POST"], name="create_session"),
        Route("/v1/sessions/{session_id}", session_resource, methods=["GET", "DELETE"], name="session"),
        Route("/v1/sessions/{session_id}/ice", trickle, methods=["POST"], name="trickle"),
        Route("/v1/sessions/{session_id}/refresh", refresh_session, methods=["POST"], name="refresh"),
        Route("/v1/ice-servers", get_ice_servers, methods=["GET"], name="ice_servers"),
        Route("/healthz", healthz, methods=["GET"], name="healthz"),
        Route("/readyz", readyz, methods=["GET"], name="readyz"),
        Route("/openapi.json", openapi_json, methods=["GET"], name="openapi"),
    ]
    app = Starlette(routes=[*routes, *extra_routes], middleware=middleware,
                    exception_handlers={HTTPException: http_error, 500: server_error})
    app.state.deps = deps
    return app


async def _json_body(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes (even without Content-Length)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid_request", "bad Content-Length")
        if int(length) > limit:
            raise ApiError(413, "too_large", f"body larger than {limit} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"body larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc


async def _parse(request: Request, limit: int, model: type[M]) -> M:
    data = await _json_body(request, limit)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", _validation_detail(exc)) from exc


async def _drop_lease(d: _Deps, caller: _Caller, lease: str) -> None:
    """Undo a create's lease. A session token's lease is the session's own (maybe still live on another
    box): it is left to expire (pending leases live create_timeout + 5 s) or to be renewed there."""
    if d.cap is not None and caller.grant is None:
        await d.cap.release(caller.sub, lease)


async def _auth_failed(request: Request, d: _Deps, exc: AuthError) -> Response:
    """401 for a refused credential — or 429 once this address has had too many refused."""
    if d.limiter is not None:
        decision = await d.limiter.check(AUTH_FAIL, client_ip(request, d.trusted))
        if not decision.allowed:
            err = _limited(decision, _LIMIT_REASON[AUTH_FAIL])
            return error_response(err.status, err.code, err.detail, err.headers)
    return error_response(401, exc.code, exc.detail, {"WWW-Authenticate": f'Bearer error="{exc.code}"'})


def _credential(request: Request, d: _Deps) -> _Caller:
    """Verify the bearer credential: a session token (``vst1.…``) or a JWT; :class:`AuthError` if bad."""
    header = request.headers.get("authorization")
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and is_session_token(token):
        try:
            grant = d.tokens.verify(token)
        except SessionTokenError as exc:
            raise AuthError(exc.detail) from exc
        return _Caller(grant.sub, frozenset(), grant)
    principal: Principal = d.verifier.verify_authorization(header)
    return _Caller(principal.sub, principal.scopes, tenant=_tenant_claim(principal, d.cfg))


async def _session_access(request: Request, d: _Deps, *, live: bool = False) -> tuple[SessionInfo, _Caller]:
    """Authorise a request on ``/v1/sessions/{id}…``: credential, per-sub limit, ownership; the caller's
    session named in the path, or a 404 that says why (see the module docstring)."""
    caller = _credential(request, d)
    sid = request.path_params["session_id"]
    if caller.grant is not None and caller.grant.session_id != sid:
        raise ApiError(403, "forbidden", "this session token belongs to another session")
    await d.limit(SIGNAL, caller.sub)
    if not SESSION_ID_RE.match(sid):
        raise ApiError(404, "not_found", "no such session (malformed session id)")
    owner_box, dot, _ = sid.partition(".")
    if dot and d.box and owner_box != d.box:
        raise ApiError(404, "wrong_box", f"session {sid} belongs to box {owner_box!r}, this is box "
                       f"{d.box!r}; send requests for a session through the load balancer, which routes "
                       f"on the box named in the id")
    info = await d.service.get(sid)
    if info is None or info.owner != caller.sub:
        raise ApiError(404, "not_found", "no such session on this box (unknown, expired or ended)")
    if live and info.state == "moved":
        raise ApiError(404, "moved", f"session was resumed on another box as "
                       f"{info.details.get('moved_to', '?')}; use that id")
    return info, caller


def client_ip(request: Request,
              trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> str:
    """The caller's address: the TCP peer, or through trusted proxies the rightmost untrusted
    ``X-Forwarded-For`` hop (module docstring). Garbage in the header ends the walk at the last good hop."""
    peer = request.client.host if request.client else "unknown"
    if not trusted or not _in(peer, trusted):
        return peer
    hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    ip = peer
    for hop in reversed([h for h in hops if h]):
        try:
            addr = ipaddress.ip_address(hop.strip("[]"))
        except ValueError:
            break
        ip = str(addr)
        if not _in(ip, trusted):
            break
    return ip


def _in(ip: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in n for n in nets)


def _tenant_claim(principal: Principal, cfg: Config) -> str:
    """The token's ``tenant`` claim if this box's config defines it ("" without one: the default
    tenant); anything else is a 403 saying why (the token is valid, it just names no tenant here)."""
    name = principal.claims.get("tenant")
    if name is None or name == "":
        return ""
    if not isinstance(name, str):
        raise ApiError(403, "unknown_tenant", "claim 'tenant' must be a string")
    if name != DEFAULT_TENANT and name not in cfg.tenants:
        raise ApiError(403, "unknown_tenant", f"tenant {name[:64]!r} is not configured on this appliance")
    return "" if name == DEFAULT_TENANT else name


def _client(request: Request, caller: _Caller,
            trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> ClientInfo:
    return ClientInfo(
        sub=caller.sub,
        ip=client_ip(request, trusted),
        scopes=caller.scopes,
        user_agent=request.headers.get("user-agent", "")[:256],
        session_id=caller.grant.session_id if caller.grant else None,
        tenant=caller.tenant,
    )


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the session API (schemas from the pydantic models)."""
    models: list[type[BaseModel]] = [CreateSessionRequest, CreateSessionResponse, IceRequest,
                                     IceServersResponse, SessionResponse, RefreshResponse, ErrorResponse,
                                     HealthResponse]
    _, defs = models_json_schema([(m, "validation") for m in models],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def err(desc: str) -> dict[str, Any]:
        return {"description": desc, "content": {"application/json": {"schema": ref("ErrorResponse")}}}

    def ok(desc: str, name: str) -> dict[str, Any]:
        return {"description": desc, "content": {"application/json": {"schema": ref(name)}}}

    sid_param = [{"name": "session_id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": SESSION_ID_RE.pattern}}]
    common = {"401": err("Missing or invalid token"), "403": err("Session token of another session"),
              "404": err("No such session: not_found (unknown here), wrong_box (the id names another box), "
                         "moved (resumed on another box: details name the new id)"),
              "429": err("Rate limited (Retry-After)")}
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Voice appliance session API", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT, or a session token (vst1.…)"}},
        },
        "paths": {
            "/v1/sessions": {"post": {
                "operationId": "createSession", "security": security,
                "summary": "Start a voice session from a WebRTC offer",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": ref("CreateSessionRequest")}}},
                "responses": {"201": ok("Session created", "CreateSessionResponse"),
                              "400": err("Invalid body or SDP"), "401": common["401"],
                              "403": err("Session token without a resume of its own session, or the "
                                         "JWT's tenant claim names no tenant of this appliance"),
                              "413": err("Body too large"), "415": err("Not JSON"),
                              "429": err("Rate limited, or the tenant's max_sessions reached (Retry-After "
                                         "only for the rate limit)"),
                              "503": err("Full, draining or not ready (Retry-After)"),
                              "504": err("Setup timed out")},
            }},
            "/v1/sessions/{session_id}": {
                "get": {"operationId": "getSession", "security": security, "parameters": sid_param,
                        "summary": "Session state",
                        "responses": {"200": ok("Session", "SessionResponse"), **common}},
                "delete": {"operationId": "deleteSession", "security": security, "parameters": sid_param,
                           "summary": "End a session",
                           "responses": {"204": {"description": "Ended"}, **common}},
            },
            "/v1/sessions/{session_id}/ice": {"post": {
                "operationId": "trickleIce", "security": security, "parameters": sid_param,
                "summary": "Trickle one ICE candidate (or completed:true)",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": ref("IceRequest")}}},
                "responses": {"204": {"description": "Accepted"}, "400": err("Invalid candidate"),
                              "409": err("The session is not connected on this box (resume it)"),
                              "413": err("Body too large"), "415": err("Not JSON"), **common},
            }},
            "/v1/sessions/{session_id}/refresh": {"post": {
                "operationId": "refreshSessionToken", "security": security, "parameters": sid_param,
                "summary": "A fresh session token (with the current one in its last 120 s, or a JWT)",
                "responses": {"200": ok("Fresh session token", "RefreshResponse"),
                              "409": err("Too early (Retry-After)"), **common},
            }},
            "/v1/ice-servers": {"get": {
                "operationId": "getIceServers", "security": security,
                "summary": "ICE servers with fresh TURN credentials, to fetch before creating the offer "
                           "(a relay-only caller cannot gather relay candidates without them)",
                "responses": {"200": ok("ICE servers", "IceServersResponse"), "401": common["401"],
                              "429": common["429"]},
            }},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness",
                                 "responses": {"200": ok("Alive", "HealthResponse")}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness (admits new sessions)",
                                "responses": {"200": ok("Ready", "HealthResponse"),
                                              "503": err("Not ready or draining")}}},
        },
    }
