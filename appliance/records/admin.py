"""The operator's admin API and console, served by the supervisor on ``api.admin_host:admin_port``.

Bearer JWTs (RS256, the same key and audience as the session API; `voice-appliance token --scope
calls:read,records:read …` mints dev ones) whose scopes decide what an operator may do:

================================  ==================  ==============================================
endpoint                          scope               what
================================  ==================  ==============================================
GET  /v1/admin/calls              calls:read          live calls on this box (``state=live``) or the
                                                      records in PostgreSQL (``state=ended``/none),
                                                      newest first, keyset-paged (``cursor``)
GET  /v1/admin/calls/{id}         records:read        the whole record; transcript paged (sealed lines
                                                      opened; one that does not open has ``text: null``
                                                      and an ``error`` naming it, listed in ``errors``)
POST /v1/admin/calls/{id}/hangup  calls:write         end a live call on this box
DELETE /v1/admin/calls/{id}       records:delete      delete a call's record
POST /v1/admin/drain | undrain    calls:write         stop / resume admitting calls on this box
GET  /v1/admin/usage              records:read        tokens and cost estimate per tenant and model
                                                      (``since``/``until``, default the last 30 days;
                                                      ``tenant``)
GET  /v1/admin/webhooks/dead-letters  audit:read      webhook events given up on
DELETE /v1/admin/subjects/{sub}   records:delete      GDPR erasure: the subject's calls, transcripts,
                                                      events, dead letters, Redis sessions; a receipt
GET  /v1/admin/subjects/{sub}/export records:read     GDPR access: everything about the subject (JSON)
GET  /v1/admin/audit              audit:read          the audit trail, oldest first (``after`` = the
                                                      previous page's ``next``, ``subject``, ``limit``)
GET  /v1/admin/calls/{id}/recording  records:read     the call's recording (audio/ogg, Opus, caller left,
                                                      AI right), decrypted on the fly; audited
GET  …/recording/metadata         records:read        its sidecar(s): AI-generated segments, gaps
POST …/recording/pause | resume   calls:write         pause / resume a live call's recording (a gap)
================================  ==================  ==============================================

A caller's token (``voice:session`` only) gets 403 everywhere. Errors are JSON ``{error, detail}``:
401 bad token, 403 missing scope (naming it), 400 a malformed query parameter (naming it), 404 unknown
id, 503 when the records database is not configured or unreachable. ``/admin/`` is the console (plain
HTML/JS, ``static/``); ``/v1/admin/openapi.json`` the schema.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from appliance import __version__
from appliance.auth import AuthError, JwtVerifier, Principal
from appliance.compliance import subjects, trail
from appliance.compliance.atrest import pg_store
from appliance.compliance.envelope import DecryptError, Keyring
from appliance.compliance.recordings import RecordingStore
from appliance.config import DEFAULT_TENANT, TENANT_NAME_RE
from appliance.records import store
from appliance.records.usage import PriceTable
from appliance.records.usage_report import usage_report
from appliance.records.writer import Database

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
SCOPES = ("calls:read", "calls:write", "records:read", "records:delete", "audit:read")
CALL_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
SUB_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
MAX_LIMIT = 200
MAX_TRANSCRIPT_LIMIT = 5000


class AdminControl(Protocol):
    """What the admin API needs from the supervisor (``appliance.sessions.Sessions`` provides it)."""

    def live_calls(self) -> list[dict[str, Any]]: ...
    def live_call(self, call_id: str) -> dict[str, Any] | None: ...
    async def hangup(self, call_id: str) -> bool: ...
    def set_draining(self, on: bool) -> None: ...
    @property
    def draining(self) -> bool: ...


AuditHook = Callable[[str, str, str, dict[str, Any]], None]  # (actor, action, subject, details)


class AdminError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def _time_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        if re.fullmatch(r"\d+(\.\d+)?", raw):
            return datetime.fromtimestamp(float(raw), UTC)
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise AdminError(400, "invalid_parameter",
                         f"{name}: expected an RFC 3339 time or unix seconds, got {raw[:40]!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise AdminError(400, "invalid_parameter", f"{name}: expected an integer from {lo} to {hi}")
    return int(raw)


@dataclass
class _Admin:
    verifier: JwtVerifier
    control: AdminControl
    db: Database | None
    prices: PriceTable
    keyring: Keyring | None
    audit: AuditHook | None
    recordings: RecordingStore | None


MAX_RECORDING_BYTES = 512 * 1024 * 1024


def create_admin_app(verifier: JwtVerifier, control: AdminControl, db: Database | None, *,
                     prices: PriceTable, dev_token: Callable[[], str] | None = None,
                     keyring: Keyring | None = None, audit: AuditHook | None = None,
                     recordings: RecordingStore | None = None) -> Starlette:
    """``keyring`` (``atrest.db_keyring``) opens sealed transcript lines on read; ``audit`` records every
    authenticated request (actor ``admin:<sub>``, action ``admin.<operation>``, the call or subject id,
    the status) — the supervisor spools it for the record writer (``compliance.trail``); ``recordings``
    (``compliance.recordings``) serves, pauses and erases this box's call recordings."""
    a = _Admin(verifier, control, db, prices, keyring, audit, recordings)

    def scoped(scope: str, fn: Callable[[Request, Principal], Awaitable[Response]]) -> Callable[..., Any]:
        async def handler(request: Request) -> Response:
            try:
                principal = a.verifier.verify_authorization(request.headers.get("authorization"))
            except AuthError as exc:
                return _error(401, exc.code, exc.detail, {"WWW-Authenticate": f'Bearer error="{exc.code}"'})
            if scope not in principal.scopes:
                response: Response = _error(403, "insufficient_scope", f"scope {scope!r} required")
            else:
                try:
                    response = await fn(request, principal)
                except AdminError as exc:
                    response = _error(exc.status, exc.code, exc.detail)
                except (psycopg.Error, OSError) as exc:
                    log.warning("admin API: records database unavailable",
                                extra={"error": str(exc)[:200]})
                    response = _error(503, "records_unavailable",
                                      "the records database is unreachable; retry later",
                                      {"Retry-After": "5"})
            if a.audit is not None:
                # a data subject's id never enters the audit trail (it outlives a deletion)
                subject = str(request.path_params.get("call_id") or "")
                try:
                    a.audit(f"admin:{principal.sub}"[:200], f"admin.{fn.__name__}", subject[:200],
                            {"method": request.method, "status": response.status_code, "scope": scope})
                except OSError as exc:  # a full spool must not turn a read into an error
                    log.warning("admin API: audit entry not spooled", extra={"error": str(exc)})
            return response
        return handler

    def need_db() -> Database:
        if a.db is None:
            raise AdminError(503, "records_disabled", "call records are not configured (records.dsn)")
        return a.db

    def call_id(request: Request) -> str:
        cid = request.path_params["call_id"]
        if not CALL_ID_RE.match(cid):
            raise AdminError(404, "not_found", "no such call")
        return cid

    async def list_calls(request: Request, _p: Principal) -> Response:
        state = request.query_params.get("state")
        if state not in (None, "", "live", "ended"):
            raise AdminError(400, "invalid_parameter", "state: expected 'live' or 'ended'")
        since, until = _time_param(request, "since"), _time_param(request, "until")
        limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
        sub = request.query_params.get("sub") or None
        if sub is not None and len(sub) > 256:
            raise AdminError(400, "invalid_parameter", "sub: at most 256 characters")
        cursor = request.query_params.get("cursor") or None
        if cursor is not None:
            try:
                store.decode_cursor(cursor, 2)
            except ValueError:
                raise AdminError(400, "invalid_parameter", "cursor: not a cursor this API returned") from None
        if state == "live":
            calls = [c for c in a.control.live_calls()
                     if (since is None or c["created_at"] >= since.isoformat())
                     and (until is None or c["created_at"] < until.isoformat())
                     and (sub is None or c["sub"] == sub)]
            calls.sort(key=lambda c: (c["created_at"], c["id"]), reverse=True)
            return JSONResponse({"calls": calls[:limit], "next": None}, headers={"Cache-Control": "no-store"})
        async with need_db().connection() as conn:
            calls, nxt = await store.list_calls(conn, state=state or None, since=since, until=until, sub=sub,
                                                limit=limit, cursor=cursor)
        return JSONResponse({"calls": calls, "next": nxt}, headers={"Cache-Control": "no-store"})

    async def get_call(request: Request, _p: Principal) -> Response:
        cid = call_id(request)
        tlimit = _int_param(request, "transcript_limit", 1000, 1, MAX_TRANSCRIPT_LIMIT)
        tcursor = request.query_params.get("transcript_cursor") or None
        if tcursor is not None:
            try:
                store.decode_cursor(tcursor, 3)
            except ValueError:
                raise AdminError(400, "invalid_parameter",
                                 "transcript_cursor: not a cursor this API returned") from None
        live = a.control.live_call(cid)
        record = None
        if a.db is not None:
            async with a.db.connection() as conn:
                if a.keyring is not None:
                    await pg_store(a.keyring).load(conn)
                record = await store.get_call(conn, cid, prices=a.prices, transcript_limit=tlimit,
                                              transcript_cursor=tcursor, keyring=a.keyring)
        if record is None and live is None:
            raise AdminError(404, "not_found", "no such call")
        if record is None:
            assert live is not None  # the 404 above
            record = {**live, "transcript": [], "transcript_next": None, "events": [], "usage": None,
                      "quality": live.get("quality")}
        if live is not None:
            record["live"] = live
            record["state"] = "live"
        return JSONResponse(record, headers={"Cache-Control": "no-store"})

    async def delete_call(request: Request, _p: Principal) -> Response:
        cid = call_id(request)
        if a.control.live_call(cid) is not None:
            raise AdminError(409, "call_live", "the call is live; hang it up first")
        parts = a.recordings.delete([cid]) if a.recordings is not None else 0
        async with need_db().connection() as conn:
            if not await store.delete_call(conn, cid) and not parts:
                raise AdminError(404, "not_found", "no such call")
        log.info("admin: record deleted", extra={"session": cid, "by": _p.sub})
        return Response(status_code=204)

    async def hangup(request: Request, p: Principal) -> Response:
        cid = call_id(request)
        if not await a.control.hangup(cid):
            raise AdminError(404, "not_found", "no such live call on this box")
        log.info("admin: call hung up", extra={"session": cid, "by": p.sub})
        return JSONResponse({"id": cid, "state": "ended"})

    async def drain(_request: Request, p: Principal) -> Response:
        a.control.set_draining(True)
        log.info("admin: drain", extra={"by": p.sub})
        return JSONResponse({"draining": a.control.draining})

    async def undrain(_request: Request, p: Principal) -> Response:
        a.control.set_draining(False)
        log.info("admin: undrain", extra={"by": p.sub})
        return JSONResponse({"draining": a.control.draining})

    async def usage(request: Request, _p: Principal) -> Response:
        """Tokens and cost per tenant and model (appliance/records/usage_report.py); default: 30 days."""
        until = _time_param(request, "until") or datetime.now(UTC)
        since = _time_param(request, "since") or until - timedelta(days=30)
        if since >= until:
            raise AdminError(400, "invalid_parameter", "since: must be before until")
        name = request.query_params.get("tenant") or None
        if name is not None and not (name == DEFAULT_TENANT or TENANT_NAME_RE.match(name)):
            raise AdminError(400, "invalid_parameter", f"tenant: expected {TENANT_NAME_RE.pattern}")
        async with need_db().connection() as conn:
            report = await usage_report(conn, since=since, until=until, tenant=name, prices=a.prices)
        return JSONResponse(report, headers={"Cache-Control": "no-store"})

    async def dead_letters(request: Request, _p: Principal) -> Response:
        limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
        cursor = request.query_params.get("cursor") or None
        if cursor is not None:
            try:
                store.decode_cursor(cursor, 2)
            except ValueError:
                raise AdminError(400, "invalid_parameter", "cursor: not a cursor this API returned") from None
        async with need_db().connection() as conn:
            rows, nxt = await store.dead_letters(conn, limit=limit, cursor=cursor)
        return JSONResponse({"dead_letters": rows, "next": nxt}, headers={"Cache-Control": "no-store"})

    async def audit_log(request: Request, _p: Principal) -> Response:
        limit = _int_param(request, "limit", 100, 1, 1000)
        after = _int_param(request, "after", 0, 0, 2**62)
        subject = request.query_params.get("subject") or None
        if subject is not None and len(subject) > 256:
            raise AdminError(400, "invalid_parameter", "subject: at most 256 characters")
        async with need_db().connection() as conn:
            entries = await trail.page(conn, after=after, limit=limit, subject=subject)
        nxt = str(entries[-1]["seq"]) if len(entries) == limit else None
        return JSONResponse({"entries": entries, "next": nxt}, headers={"Cache-Control": "no-store"})

    def subject_id(request: Request) -> str:
        sub = request.path_params["sub"]
        if not SUB_RE.match(sub):
            raise AdminError(400, "invalid_parameter", "sub: 1-256 characters, no control characters")
        return str(sub)

    async def delete_subject(request: Request, p: Principal) -> Response:
        sub = subject_id(request)
        if any(c.get("sub") == sub for c in a.control.live_calls()):
            raise AdminError(409, "call_live", "the subject has a live call on this box; hang it up first")
        async with need_db().connection() as conn:
            ids = await subjects.call_ids(conn, sub)
            counts = await subjects.delete_records(conn, sub)
        if a.recordings is not None:
            counts["recordings"] = a.recordings.delete(ids)
        delete_sessions = getattr(a.control, "delete_subject_sessions", None)
        counts["redis_keys"] = int(await delete_sessions(sub)) if delete_sessions else 0
        if not any(counts.values()):
            raise AdminError(404, "not_found", "nothing is stored about this subject")
        receipt = subjects.receipt(counts, by=p.sub)
        if a.audit is not None:  # the tombstone: who, when, what classes, how much — not whom
            a.audit(f"admin:{p.sub}"[:200], "gdpr.subject_deleted", receipt["receipt_id"],
                    {"deleted": counts})
        log.info("admin: data subject deleted", extra={"receipt": receipt["receipt_id"], "by": p.sub})
        return JSONResponse(receipt, headers={"Cache-Control": "no-store"})

    async def export_subject(request: Request, _p: Principal) -> Response:
        sub = subject_id(request)
        async with need_db().connection() as conn:
            if a.keyring is not None:
                await pg_store(a.keyring).load(conn)
            calls = await subjects.export_records(conn, sub, keyring=a.keyring, prices=a.prices)
        for record in calls:  # the audio itself: GET /v1/admin/calls/{id}/recording (listed here)
            if a.recordings is not None and (parts := a.recordings.describe(str(record.get("id")))):
                record["recordings"] = {"download": f"/v1/admin/calls/{record.get('id')}/recording",
                                        "parts": parts}
        sessions_of = getattr(a.control, "subject_sessions", None)
        sessions = list(await sessions_of(sub)) if sessions_of else []
        live = [c for c in a.control.live_calls() if c.get("sub") == sub]
        if not calls and not sessions and not live:
            raise AdminError(404, "not_found", "nothing is stored about this subject")
        return JSONResponse({"sub": sub, "exported_at": datetime.now(UTC).isoformat(), "calls": calls,
                             "sessions": sessions, "live_calls": live},
                            headers={"Cache-Control": "no-store",
                                     "Content-Disposition": 'attachment; filename="subject-export.json"'})

    def need_recordings(cid: str) -> RecordingStore:
        if a.recordings is None or not a.recordings.parts(cid):
            raise AdminError(404, "not_found", "no recording of this call on this box")
        return a.recordings

    async def get_recording(request: Request, _p: Principal) -> Response:
        cid = call_id(request)
        rec = need_recordings(cid)

        def read() -> bytes:
            out = bytearray()
            for chunk in rec.open_session(cid):
                out += chunk
                if len(out) > MAX_RECORDING_BYTES:
                    raise AdminError(413, "recording_too_large", "recording larger than this API serves")
            return bytes(out)

        try:  # decrypted in memory, never written back; a thread keeps the loop free
            body = await asyncio.to_thread(read)
        except DecryptError as exc:
            log.error("admin: recording does not open", extra={"session": cid, "error": str(exc)})
            raise AdminError(500, "recording_unreadable", f"the recording does not decrypt: {exc}") from None
        complete = all(m.get("complete") for m in rec.describe(cid))
        return Response(body, media_type="audio/ogg", headers={
            "Cache-Control": "no-store", "X-Recording-Complete": "true" if complete else "false",
            "Content-Disposition": f'attachment; filename="{cid}.ogg"'})

    async def recording_metadata(request: Request, _p: Principal) -> Response:
        cid = call_id(request)
        return JSONResponse({"id": cid, "parts": need_recordings(cid).describe(cid)},
                            headers={"Cache-Control": "no-store"})

    async def pause_recording(request: Request, p: Principal) -> Response:
        return set_paused(request, p, True)

    async def resume_recording(request: Request, p: Principal) -> Response:
        return set_paused(request, p, False)

    def set_paused(request: Request, p: Principal, paused: bool) -> Response:
        cid = call_id(request)
        if a.control.live_call(cid) is None:
            raise AdminError(404, "not_found", "no such live call on this box")
        rec = need_recordings(cid)
        rec.set_paused(cid, paused, by=p.sub)
        log.info("admin: recording paused" if paused else "admin: recording resumed",
                 extra={"session": cid, "by": p.sub})
        return JSONResponse({"id": cid, "recording": "paused" if paused else "recording"})

    openapi = build_admin_openapi()

    async def openapi_json(_request: Request) -> Response:
        return JSONResponse(openapi)

    async def console(_request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def to_console(_request: Request) -> Response:
        return RedirectResponse("/admin/")

    async def call_resource(request: Request) -> Response:
        if request.method == "DELETE":
            return await scoped("records:delete", delete_call)(request)
        return await scoped("records:read", get_call)(request)

    routes: list[Any] = [
        Route("/v1/admin/calls", scoped("calls:read", list_calls), methods=["GET"]),
        Route("/v1/admin/calls/{call_id}", call_resource, methods=["GET", "DELETE"]),
        Route("/v1/admin/calls/{call_id}/hangup", scoped("calls:write", hangup), methods=["POST"]),
        Route("/v1/admin/calls/{call_id}/recording", scoped("records:read", get_recording), methods=["GET"]),
        Route("/v1/admin/calls/{call_id}/recording/metadata", scoped("records:read", recording_metadata),
              methods=["GET"]),
        Route("/v1/admin/calls/{call_id}/recording/pause", scoped("calls:write", pause_recording),
              methods=["POST"]),
        Route("/v1/admin/calls/{call_id}/recording/resume", scoped("calls:write", resume_recording),
              methods=["POST"]),
        Route("/v1/admin/drain", scoped("calls:write", drain), methods=["POST"]),
        Route("/v1/admin/undrain", scoped("calls:write", undrain), methods=["POST"]),
        Route("/v1/admin/usage", scoped("records:read", usage), methods=["GET"]),
        Route("/v1/admin/webhooks/dead-letters", scoped("audit:read", dead_letters), methods=["GET"]),
        Route("/v1/admin/audit", scoped("audit:read", audit_log), methods=["GET"]),
        Route("/v1/admin/subjects/{sub}", scoped("records:delete", delete_subject), methods=["DELETE"]),
        Route("/v1/admin/subjects/{sub}/export", scoped("records:read", export_subject), methods=["GET"]),
        Route("/v1/admin/openapi.json", openapi_json, methods=["GET"]),
        Route("/admin", to_console, methods=["GET"]),
        Route("/admin/", console, methods=["GET"]),
        Mount("/admin/static", StaticFiles(directory=STATIC_DIR), name="admin_static"),
    ]
    if dev_token is not None:
        async def mint(_request: Request) -> Response:
            return JSONResponse({"token": dev_token(), "dev": True}, headers={"Cache-Control": "no-store"})
        routes.append(Route("/admin/dev-token", mint, methods=["POST"]))
    return Starlette(routes=routes)


def build_admin_openapi() -> dict[str, Any]:
    err = {"description": "Error", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}}}}
    common = {"401": err, "403": err}
    cid = {"name": "call_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": CALL_ID_RE.pattern}}
    sub_param = {"name": "sub", "in": "path", "required": True,
                 "schema": {"type": "string", "maxLength": 256}}
    obj = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}

    def q(name: str, schema: dict[str, Any], desc: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}

    def op(op_id: str, scope: str, summary: str, **extra: Any) -> dict[str, Any]:
        return {"operationId": op_id, "security": [{"bearer": [scope]}], "summary": f"{summary} ({scope})",
                "responses": {"200": obj, **common, **extra.pop("responses", {})}, **extra}

    time_schema = {"type": "string", "description": "RFC 3339 or unix seconds"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Voice appliance admin API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "bearerFormat": "JWT"}}},
        "paths": {
            "/v1/admin/calls": {"get": op(
                "listCalls", "calls:read", "Live calls on this box, or recorded calls",
                parameters=[q("state", {"enum": ["live", "ended"]}, "live: this box, from memory"),
                            q("since", time_schema, "created at or after"), q("until", time_schema, "before"),
                            q("sub", {"type": "string", "maxLength": 256}, "caller subject"),
                            q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size"),
                            q("cursor", {"type": "string"}, "the previous page's next")],
                responses={"400": err, "503": err})},
            "/v1/admin/calls/{call_id}": {
                "get": op("getCall", "records:read", "The whole call record",
                          parameters=[cid, q("transcript_limit", {"type": "integer", "minimum": 1,
                                                                  "maximum": MAX_TRANSCRIPT_LIMIT}, "lines"),
                                      q("transcript_cursor", {"type": "string"}, "transcript_next")],
                          responses={"400": err, "404": err, "503": err}),
                "delete": op("deleteCall", "records:delete", "Delete a call's record", parameters=[cid],
                             responses={"204": {"description": "Deleted"}, "404": err, "409": err}),
            },
            "/v1/admin/calls/{call_id}/hangup": {"post": op("hangupCall", "calls:write", "End a live call",
                                                            parameters=[cid], responses={"404": err})},
            "/v1/admin/calls/{call_id}/recording": {"get": op(
                "getRecording", "records:read", "The call's recording (Ogg Opus; caller left, AI right)",
                parameters=[cid], responses={"200": {"description": "OK", "content": {"audio/ogg": {}}},
                                             "404": err, "500": err})},
            "/v1/admin/calls/{call_id}/recording/metadata": {"get": op(
                "getRecordingMetadata", "records:read", "The recording's sidecar: AI segments and gaps",
                parameters=[cid], responses={"404": err})},
            "/v1/admin/calls/{call_id}/recording/pause": {"post": op(
                "pauseRecording", "calls:write", "Pause a live call's recording", parameters=[cid],
                responses={"404": err})},
            "/v1/admin/calls/{call_id}/recording/resume": {"post": op(
                "resumeRecording", "calls:write", "Resume a live call's recording", parameters=[cid],
                responses={"404": err})},
            "/v1/admin/drain": {"post": op("drain", "calls:write", "Stop admitting new calls")},
            "/v1/admin/undrain": {"post": op("undrain", "calls:write", "Admit new calls again")},
            "/v1/admin/subjects/{sub}": {"delete": op(
                "deleteSubject", "records:delete", "Delete everything about a data subject (GDPR art. 17)",
                parameters=[sub_param], responses={"400": err, "404": err, "409": err, "503": err})},
            "/v1/admin/subjects/{sub}/export": {"get": op(
                "exportSubject", "records:read", "Everything stored about a data subject (GDPR art. 15)",
                parameters=[sub_param], responses={"400": err, "404": err, "503": err})},
            "/v1/admin/audit": {"get": op(
                "listAudit", "audit:read", "The audit trail (hash-chained entries), oldest first",
                parameters=[q("after", {"type": "integer", "minimum": 0}, "the previous page's next"),
                            q("subject", {"type": "string", "maxLength": 256}, "a call or subject id"),
                            q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size")],
                responses={"400": err, "503": err})},
            "/v1/admin/usage": {"get": op(
                "usageReport", "records:read", "Tokens and cost estimate per tenant and model",
                parameters=[q("since", time_schema, "reports at or after (default: until - 30 days)"),
                            q("until", time_schema, "before (default: now)"),
                            q("tenant", {"type": "string"}, "one tenant only")],
                responses={"400": err, "503": err})},
            "/v1/admin/webhooks/dead-letters": {"get": op(
                "listDeadLetters", "audit:read", "Webhook events given up on",
                parameters=[q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size"),
                            q("cursor", {"type": "string"}, "the previous page's next")],
                responses={"400": err, "503": err})},
        },
    }
