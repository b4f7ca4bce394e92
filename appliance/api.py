"""The public session API: a Starlette ASGI app in front of the control plane.

Why Starlette (and not FastAPI): the surface is a handful of routes whose security checks must run in a fixed,
visible order — per-IP rate limit (cheap, first), body size, JWT, body schema, SDP validation, then
the control plane — and FastAPI's dependency injection would hide that order for little gain. Bodies
are parsed with pydantic (already a dependency of google-genai) so the same models give the OpenAPI
document at ``/openapi.json``.

The app knows nothing about Janus, shards or workers: it calls a :class:`SessionService` (the
supervisor implements it). Every error is JSON ``{"error": code, "detail": reason}``:
400 bad body/SDP, 401 bad token, 404 unknown (or someone else's) session, 413 body too large,
429 rate limited (Retry-After), 503 full/draining/not ready (Retry-After), 504 control plane timeout.
Only the token's ``sub`` may see or touch its own sessions; someone else's session is a plain 404 so
ids cannot be probed.

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
import dataclasses
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
from appliance.ratelimit import CREATE, SIGNAL, RateLimiter
from appliance.sdp import MAX_SDP_BYTES, OfferInfo, SdpError, validate_offer
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


@dataclass(frozen=True)
class ClientInfo:
    """Who is calling: the token's subject and the client's address."""

    sub: str
    ip: str
    scopes: frozenset[str] = frozenset()
    user_agent: str = ""
    tenant: str = ""  # the token's `tenant` claim, checked against [tenants.<name>]; "" = the default


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
    """Raised by a :class:`SessionService` to answer with a specific status and JSON error."""

    status = 500
    code = "internal"

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status or type(self).status
        self.code = code or type(self).code
        self.retry_after = retry_after


class CapacityError(ServiceError):
    """No room for another session (all shards full, or draining): 503 with Retry-After."""

    status = 503
    code = "capacity"


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
        """Tear a session down; False if it did not exist."""
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
    box: str = ""
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


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
) -> Starlette:
    """Build the ASGI app.

    ``verifier`` defaults to one built from ``cfg.auth`` (the public key file must exist); ``limiter``
    None disables rate limiting (tests; the supervisor passes
    ``RateLimiter(redis_client(cfg.redis), cfg.limits)``). ``create_timeout`` defaults to
    ``api.create_timeout_seconds``. ``extra_routes`` (demo page, static files,
    metrics) are appended after the API routes. ``ice_servers_fn(user)`` (user = the session id, or a
    random ``c_…`` id for ``GET /v1/ice-servers``) overrides the ICE server list (default: coturn HMAC
    credentials from ``cfg.turn`` for ``cfg.api.public_host``).
    """
    deps = _Deps(
        cfg=cfg,
        service=service,
        verifier=verifier or JwtVerifier.from_config(cfg.auth),
        limiter=limiter,
        create_timeout=create_timeout or cfg.api.create_timeout_seconds,
        ice_servers=ice_servers_fn or (lambda sid: ice_servers(cfg.turn, sid, cfg.api.public_host)),
        box=box_id(cfg),
        trusted=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.api.trusted_proxies),
    )

    def route(name: str, bucket: str | None) -> Callable[[DepsHandler], Handler]:
        """Wrap a handler with the per-IP limit, error mapping and metrics."""

        def wrap(fn: DepsHandler) -> Handler:
            async def endpoint(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    if bucket and deps.limiter is not None:
                        ip = client_ip(request, deps.trusted)
                        decision = await deps.limiter.check(bucket, ip)
                        if not decision.allowed:
                            raise ApiError(429, "rate_limited", f"too many requests; retry in "
                                           f"{decision.retry_after_header} s",
                                           {"Retry-After": decision.retry_after_header})
                    response = await fn(request, deps)
                except ApiError as exc:
                    response = error_response(exc.status, exc.code, exc.detail, exc.headers)
                except AuthError as exc:
                    response = error_response(401, exc.code, exc.detail,
                                              {"WWW-Authenticate": f'Bearer error="{exc.code}"'})
                except ServiceError as exc:
                    headers = _retry_after(exc.retry_after) if exc.status in (429, 503) else {}
                    response = error_response(exc.status, exc.code, exc.detail, headers)
                except Exception:
                    log.exception("session API: unexpected error", extra={"route": name})
                    response = error_response(500, "internal", "internal error")
                REQUESTS.labels(name, str(response.status_code)).inc()
                LATENCY.labels(name).observe(time.perf_counter() - start)
                return response

            return endpoint

        return wrap

    @route("create_session", CREATE)
    async def create_session(request: Request, d: _Deps) -> Response:
        principal = d.verifier.verify_authorization(request.headers.get("authorization"))
        tenant_name = _tenant_claim(principal, d.cfg)
        body = await _parse(request, d.cfg.api.max_body_bytes, CreateSessionRequest)
        try:
            offer = validate_offer(body.sdp)
        except SdpError as exc:
            raise ApiError(400, "invalid_sdp", str(exc)) from exc
        if not d.service.ready():
            raise ApiError(503, "not_ready", "not accepting new sessions (starting or draining)",
                           _retry_after(d.service.retry_after()))
        options = SessionOptions(mode=body.mode, voice=body.voice, language=body.language,
                                 resume_token=body.resume_token, offer=offer)
        client = dataclasses.replace(_client(request, principal, d.trusted), tenant=tenant_name)
        try:
            async with asyncio.timeout(d.create_timeout):
                created = await d.service.create(body.sdp, options, client)
        except TimeoutError as exc:
            raise ApiError(504, "timeout", "session setup timed out") from exc
        out = CreateSessionResponse(
            session_id=created.session_id,
            sdp=created.answer_sdp,
            ice_servers=[IceServer(**s) for s in d.ice_servers(created.session_id)],
            resume_token=created.resume_token,
            expires_at=rfc3339(created.expires_at),
            resumed_from=created.resumed_from or None,
        )
        return JSONResponse(out.model_dump(exclude_none=True), status_code=201,
                            headers={"Cache-Control": "no-store",
                                     "Location": f"/v1/sessions/{created.session_id}"})

    @route("ice_servers", SIGNAL)
    async def get_ice_servers(request: Request, d: _Deps) -> Response:
        # before the offer: a relay-only caller needs TURN credentials to gather relay candidates at all.
        # The TURN user is a random id, not the token's sub (coturn logs usernames; subs may be PII).
        d.verifier.verify_authorization(request.headers.get("authorization"))
        servers = d.ice_servers("c_" + secrets.token_urlsafe(12))
        ttl = max(1, min(int(d.cfg.turn.ttl_seconds), MAX_TTL_SECONDS))
        out = IceServersResponse(ice_servers=[IceServer(**s) for s in servers], ttl=ttl)
        return JSONResponse(out.model_dump(exclude_none=True), headers={"Cache-Control": "no-store"})

    @route("trickle", SIGNAL)
    async def trickle(request: Request, d: _Deps) -> Response:
        principal = d.verifier.verify_authorization(request.headers.get("authorization"))
        sid = await _owned(request, d, principal, live=True)
        body = await _parse(request, d.cfg.api.max_body_bytes, IceRequest)
        # completed:true, or the empty candidate some browsers send, both mean end of candidates
        candidate = None if body.completed or not body.candidate else IceCandidate(
            candidate=(body.candidate or "").removeprefix("a="), sdp_mid=body.sdpMid,
            sdp_mline_index=body.sdpMLineIndex)
        await d.service.trickle(sid.session_id, candidate)
        return Response(status_code=204, headers={"Cache-Control": "no-store"})

    @route("get_session", SIGNAL)
    async def get_session(request: Request, d: _Deps) -> Response:
        principal = d.verifier.verify_authorization(request.headers.get("authorization"))
        info = await _owned(request, d, principal)
        out = SessionResponse(session_id=info.session_id, state=info.state, mode=info.mode,
                              created_at=rfc3339(info.created_at), expires_at=rfc3339(info.expires_at),
                              details=info.details)
        return JSONResponse(out.model_dump(), headers={"Cache-Control": "no-store"})

    @route("delete_session", SIGNAL)
    async def delete_session(request: Request, d: _Deps) -> Response:
        principal = d.verifier.verify_authorization(request.headers.get("authorization"))
        info = await _owned(request, d, principal, live=True)
        if not await d.service.delete(info.session_id):
            raise ApiError(404, "not_found", "no such session on this box (unknown, expired or ended)")
        return Response(status_code=204, headers={"Cache-Control": "no-store"})

    @route("healthz", None)
    async def healthz(request: Request, d: _Deps) -> Response:
        return JSONResponse(HealthResponse(status="ok").model_dump())

    @route("readyz", None)
    async def readyz(request: Request, d: _Deps) -> Response:
        if d.service.ready():
            return JSONResponse(HealthResponse(status="ready").model_dump())
        raise ApiError(503, "not_ready", "not accepting new sessions (starting or draining)",
                       _retry_after(d.service.retry_after()))

    openapi = build_openapi()

    async def openapi_json(request: Request) -> Response:
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


async def _owned(request: Request, d: _Deps, principal: Principal, *, live: bool = False) -> SessionInfo:
    """The caller's session named in the path, or a 404 that says why (see the module docstring)."""
    sid = request.path_params["session_id"]
    if not SESSION_ID_RE.match(sid):
        raise ApiError(404, "not_found", "no such session (malformed session id)")
    owner_box, dot, _ = sid.partition(".")
    if dot and d.box and owner_box != d.box:
        raise ApiError(404, "wrong_box", f"session {sid} belongs to box {owner_box!r}, this is box "
                       f"{d.box!r}; send requests for a session through the load balancer, which routes "
                       f"on the box named in the id")
    info = await d.service.get(sid)
    if info is None or info.owner != principal.sub:
        raise ApiError(404, "not_found", "no such session on this box (unknown, expired or ended)")
    if live and info.state == "moved":
        raise ApiError(404, "moved", f"session was resumed on another box as "
                       f"{info.details.get('moved_to', '?')}; use that id")
    return info


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


def _client(request: Request, principal: Principal,
            trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> ClientInfo:
    return ClientInfo(
        sub=principal.sub,
        ip=client_ip(request, trusted),
        scopes=principal.scopes,
        user_agent=request.headers.get("user-agent", "")[:256],
    )


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the session API (schemas from the pydantic models)."""
    models: list[type[BaseModel]] = [CreateSessionRequest, CreateSessionResponse, IceRequest,
                                     IceServersResponse, SessionResponse, ErrorResponse, HealthResponse]
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
    common = {"401": err("Missing or invalid token"),
              "404": err("No such session: not_found (unknown here), wrong_box (the id names another box), "
                         "moved (resumed on another box: details name the new id)"),
              "429": err("Rate limited (Retry-After)")}
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Voice appliance session API", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "paths": {
            "/v1/sessions": {"post": {
                "operationId": "createSession", "security": security,
                "summary": "Start a voice session from a WebRTC offer",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": ref("CreateSessionRequest")}}},
                "responses": {"201": ok("Session created", "CreateSessionResponse"),
                              "400": err("Invalid body or SDP"), "401": common["401"],
                              "403": err("The token's tenant claim names no tenant of this appliance"),
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
