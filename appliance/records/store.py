"""PostgreSQL side of the call records: schema migrations, idempotent writes, the admin API's reads.

psycopg 3 (async): the maintained PostgreSQL driver with server-side parameter binding, COPY and a
binary build on PyPI; nothing hand-written could replace it.

Migrations are the plain SQL files in ``migrations/`` (``NNNN_name.sql``), applied in order inside one
transaction each, under an advisory lock (two boxes starting at once do not both migrate), recorded in
``schema_version``. A box never runs a schema newer than it knows (it refuses to start writing).

Writes (``apply_items``) are idempotent: every item table is keyed by the spool item id and inserted
with ``ON CONFLICT DO NOTHING``; call rows are upserts that only fill in or move forward. Webhook outbox
rows get their event id from the item id, so a re-shipped batch enqueues nothing twice.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from appliance.compliance import pan
from appliance.compliance.atrest import callback_ctx, open_text, seal_text, transcript_ctx, webhook_text_ctx
from appliance.compliance.envelope import DecryptError, Keyring
from appliance.records.quality import summarize_latencies
from appliance.records.usage import PriceTable, cost_of

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x7661_7265_6331  # pg_advisory_xact_lock key for migrations ("varec1")
# events that are also webhooks (workers/ai/ivr.py): type → webhook event type
REQUEST_WEBHOOKS = {"callback_requested": "call.callback_requested",
                    "transfer_requested": "call.transfer_requested"}
SPEAKERS = {"user": "caller", "caller": "caller", "model": "assistant", "assistant": "assistant"}


class SchemaError(RuntimeError):
    """The database's schema is newer than this build knows."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file, in order."""
    out = []
    for p in sorted(MIGRATIONS_DIR.iterdir()):
        m = _MIGRATION_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p.name, p.read_text()))
    return out


LATEST = migrations()[-1][0]


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: psycopg.AsyncConnection[Any], target: int | None = None) -> list[int]:
    """Apply pending migrations up to ``target`` (default: all). Returns the versions applied."""
    target = LATEST if target is None else target
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                           " version integer PRIMARY KEY, name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
    current = await schema_version(conn)
    if current > LATEST:
        raise SchemaError(f"database schema version {current} is newer than this build's {LATEST}")
    for version, name, sql in migrations():
        if version <= current or version > target:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if await schema_version(conn) >= version:  # another box got there first
                continue
            await conn.execute(sql.encode())
            await conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
        applied.append(version)
    return applied


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    return datetime.fromtimestamp(float(value), UTC)


@dataclass
class WriteStats:
    items: int = 0
    dropped_reported: int = 0  # sum of spool.dropped counts seen in the batch
    masked: list[tuple[str, float, int, int]] = field(default_factory=list)  # (call, at, pans, codes)


async def apply_items(conn: psycopg.AsyncConnection[Any], items: Iterable[dict[str, Any]], *,
                      webhooks: bool, ended_grace_seconds: float = 2.0,
                      keyring: Keyring | None = None) -> WriteStats:
    """Store one batch in the current transaction (the caller commits, then acks the spool).

    Transcript text is PAN-masked (``compliance.pan``; the counts become a ``pan_masked`` event) and,
    with a ``keyring``, sealed into ``text_sealed`` (the ``text`` column stays NULL). The caller flushes
    the keyring's new data keys in the same transaction (``atrest.PgKeyStore.flush``)."""
    stats = WriteStats()
    events: list[tuple[Any, ...]] = []
    lines: list[tuple[Any, ...]] = []
    usage: list[tuple[Any, ...]] = []
    outbox: list[tuple[Any, ...]] = []
    for it in items:
        stats.items += 1
        kind, call, at = it.get("kind"), str(it.get("call") or ""), _ts(it.get("at"))
        iid = it["id"]
        match kind:
            case "call.created":
                await conn.execute(
                    "INSERT INTO calls (id, box, sub, tenant, mode, created_at, model, voice, language)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET"
                    " model = coalesce(calls.model, EXCLUDED.model), updated_at = now()",
                    (call, it.get("box", ""), it.get("sub", ""), it.get("tenant"), it.get("mode", "direct"),
                     at, it.get("model"), it.get("voice"), it.get("language")))
                if webhooks:
                    outbox.append((f"evt_{iid}", call, "call.started",
                                   Jsonb({"call_id": call, "box": it.get("box"), "sub": it.get("sub"),
                                          "tenant": it.get("tenant"), "mode": it.get("mode"),
                                          "created_at": _iso(at), "model": it.get("model")}), 0.0))
            case "call.connected":
                await conn.execute("UPDATE calls SET connected_at = coalesce(connected_at, %s),"
                                   " updated_at = now() WHERE id = %s", (at, call))
                events.append((iid, call, at, it.get("offset_ms"), "connected", Jsonb({})))
            case "call.resumed":
                events.append((iid, call, at, it.get("offset_ms"), "resumed", Jsonb({"box": it.get("box")})))
                await conn.execute("UPDATE calls SET ended_at = NULL, end_reason = NULL, updated_at = now()"
                                   " WHERE id = %s", (call,))
            case "call.ended":
                await conn.execute(
                    "INSERT INTO calls (id, box, sub, mode, created_at, ended_at, end_reason, quality,"
                    " counters) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET"
                    " ended_at = EXCLUDED.ended_at, end_reason = EXCLUDED.end_reason,"
                    " quality = EXCLUDED.quality, counters = EXCLUDED.counters, updated_at = now()",
                    (call, it.get("box", ""), it.get("sub", ""), it.get("mode", "direct"),
                     _ts(it.get("created_at")) or at, at, it.get("reason"), Jsonb(it.get("quality") or {}),
                     Jsonb(it.get("counters") or {})))
                events.append((iid, call, at, it.get("offset_ms"), "ended",
                               Jsonb({"reason": it.get("reason")})))
                if webhooks:
                    outbox.append((f"evt_{iid}", call, "call.ended", Jsonb({"call_id": call}),
                                   ended_grace_seconds))
            case "event":
                etype, data = str(it.get("type", "")), dict(it.get("data") or {})
                number = it.get("callback_number")
                if etype == "callback_requested" and isinstance(number, str):
                    data["number"] = seal_text(keyring, number, callback_ctx(iid))
                events.append((iid, call, at, it.get("offset_ms"), etype, Jsonb(data)))
                if webhooks and etype in REQUEST_WEBHOOKS:
                    payload = {"call_id": call, "offset_ms": int(it.get("offset_ms") or 0),
                               **{k: v for k, v in data.items() if k != "number"}}
                    if isinstance(number, str):
                        payload["number"] = seal_text(keyring, number, webhook_text_ctx(f"evt_{iid}"))
                    outbox.append((f"evt_{iid}", call, REQUEST_WEBHOOKS[etype], Jsonb(payload), 0.0))
            case "transcript":
                speaker = SPEAKERS.get(str(it.get("speaker")), "caller")
                masked = pan.mask(str(it.get("text", "")))
                if masked.pans or masked.codes:
                    stats.masked.append((call, float(it.get("at") or 0), masked.pans, masked.codes))
                    events.append((f"{iid}.pan", call, at, it.get("offset_ms"), "pan_masked",
                                   Jsonb({"pans": masked.pans, "security_codes": masked.codes})))
                text = masked.text
                if keyring is not None:
                    sealed = keyring.seal(text.encode(), context=transcript_ctx(iid),
                                          tenant=str(it.get("tenant") or ""))
                    lines.append((iid, call, at, int(it.get("offset_ms") or 0), speaker, None, sealed))
                else:
                    lines.append((iid, call, at, int(it.get("offset_ms") or 0), speaker, text, None))
                if webhooks:
                    outbox.append((f"evt_{iid}", call, "call.transcript",
                                   Jsonb({"call_id": call, "offset_ms": int(it.get("offset_ms") or 0),
                                          "speaker": speaker,
                                          "text": seal_text(keyring, text, webhook_text_ctx(f"evt_{iid}"))}),
                                   0.0))
            case "usage":
                usage.append((iid, call, at, it.get("model"), int(it.get("prompt_tokens") or 0),
                              int(it.get("response_tokens") or 0), int(it.get("total_tokens") or 0),
                              Jsonb(it.get("details") or {})))
            case "spool.dropped":
                stats.dropped_reported += int(it.get("count") or 0)
            case _:
                pass  # an item kind from a newer build: skipped, not fatal
    async with conn.cursor() as cur:
        if events:
            await cur.executemany("INSERT INTO call_events (id, call_id, at, offset_ms, type, data)"
                                  " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO NOTHING", events)
        if lines:
            await cur.executemany("INSERT INTO transcript_lines (id, call_id, at, offset_ms, speaker, text,"
                                  " text_sealed) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO NOTHING",
                                  lines)
        if usage:
            await cur.executemany("INSERT INTO usage_reports (id, call_id, at, model, prompt_tokens,"
                                  " response_tokens, total_tokens, details) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
                                  " ON CONFLICT (id) DO NOTHING", usage)
        if outbox:
            await cur.executemany("INSERT INTO webhook_outbox (event_id, call_id, type, payload,"
                                  " next_attempt_at) VALUES (%s,%s,%s,%s, now() + make_interval(secs => %s))"
                                  " ON CONFLICT (event_id) DO NOTHING", outbox)
        if any(e[4] == "resumed" for e in events):
            await cur.execute("UPDATE calls c SET resume_count = (SELECT count(*) FROM call_events e"
                              " WHERE e.call_id = c.id AND e.type = 'resumed') WHERE c.id = ANY(%s)",
                              ([e[1] for e in events if e[4] == "resumed"],))
    return stats


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# -- reads (admin API) ---------------------------------------------------------------------------
def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts, default=str).encode()).decode().rstrip("=")


def decode_cursor(text: str, n: int) -> list[Any]:
    """Raises ValueError for anything that is not one of our cursors."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    parts = json.loads(raw)
    if not isinstance(parts, list) or len(parts) != n:
        raise ValueError("bad cursor")
    return parts


CALL_COLUMNS = ("id, box, sub, tenant, mode, created_at, connected_at, ended_at, end_reason, resume_count,"
                " model, voice, language, quality")


def call_summary(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in ("id", "box", "sub", "tenant", "mode", "end_reason", "resume_count",
                                   "model", "voice", "language")}
    for k in ("created_at", "connected_at", "ended_at"):
        out[k] = _iso(row.get(k))
    out["state"] = "ended" if row.get("ended_at") else "live"
    return out


async def list_calls(conn: psycopg.AsyncConnection[Any], *, state: str | None, since: datetime | None,
                     until: datetime | None, sub: str | None, limit: int,
                     cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paged on (created_at, id)."""
    where: list[str] = []
    args: list[Any] = []
    if state == "ended":
        where.append("ended_at IS NOT NULL")
    elif state == "live":
        where.append("ended_at IS NULL")
    if since is not None:
        where.append("created_at >= %s")
        args.append(since)
    if until is not None:
        where.append("created_at < %s")
        args.append(until)
    if sub:
        where.append("sub = %s")
        args.append(sub)
    if cursor:
        ts, cid = decode_cursor(cursor, 2)
        where.append("(created_at, id) < (%s::timestamptz, %s)")
        args += [ts, cid]
    sql = f"SELECT {CALL_COLUMNS} FROM calls"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
    args.append(limit + 1)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, args)
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = encode_cursor(rows[-1]["created_at"].isoformat(), rows[-1]["id"]) if more and rows else None
    return [call_summary(r) for r in rows], nxt


async def get_call(conn: psycopg.AsyncConnection[Any], call_id: str, *, prices: PriceTable,
                   transcript_limit: int = 1000, transcript_cursor: str | None = None,
                   keyring: Keyring | None = None) -> dict[str, Any] | None:
    """The whole record (transcript paged), or None. Sealed lines are opened with ``keyring``; a line
    that does not open carries ``error`` (naming the line and the key, never content) instead of text."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {CALL_COLUMNS}, counters FROM calls WHERE id = %s", (call_id,))
        row = await cur.fetchone()
        if row is None:
            await cur.execute("SELECT 1 FROM call_events WHERE call_id = %s UNION ALL"
                              " SELECT 1 FROM transcript_lines WHERE call_id = %s LIMIT 1",
                              (call_id, call_id))
            if await cur.fetchone() is None:
                return None
            row = {"id": call_id}
        targs: list[Any] = [call_id]
        tsql = ("SELECT id, offset_ms, speaker, text, text_sealed, at FROM transcript_lines"
                " WHERE call_id = %s")
        if transcript_cursor:
            off, at, lid = decode_cursor(transcript_cursor, 3)
            tsql += " AND (offset_ms, at, id) > (%s, %s::timestamptz, %s)"
            targs += [int(off), at, lid]
        tsql += " ORDER BY offset_ms, at, id LIMIT %s"
        targs.append(transcript_limit + 1)
        await cur.execute(tsql, targs)
        lines = await cur.fetchall()
        await cur.execute("SELECT id, at, offset_ms, type, data FROM call_events WHERE call_id = %s"
                          " ORDER BY at, id", (call_id,))
        events = await cur.fetchall()
        await cur.execute("SELECT model, prompt_tokens, response_tokens, total_tokens, details"
                          " FROM usage_reports WHERE call_id = %s", (call_id,))
        usage_rows = await cur.fetchall()
    more = len(lines) > transcript_limit
    lines = lines[:transcript_limit]
    record = call_summary(row)
    record["transcript"] = [_line(r, keyring) for r in lines]
    errors = [ln["error"] for ln in record["transcript"] if "error" in ln]
    if errors:
        record["errors"] = errors
    record["transcript_next"] = (encode_cursor(lines[-1]["offset_ms"], lines[-1]["at"].isoformat(),
                                               lines[-1]["id"]) if more and lines else None)
    record["events"] = [{"at": _iso(e["at"]), "offset_ms": e["offset_ms"], "type": e["type"],
                         **({"data": _event_data(e, keyring)} if e["data"] else {})} for e in events]
    record["usage"] = summarize_usage(usage_rows, row.get("model"), prices)
    quality = dict(row.get("quality") or {})
    quality.update(summarize_latencies(events))
    record["quality"] = quality
    return record


def _event_data(e: dict[str, Any], keyring: Keyring | None) -> dict[str, Any]:
    """An event's data with a sealed callback number opened (an error note if it does not open)."""
    data = dict(e["data"])
    if e["type"] == "callback_requested" and isinstance(data.get("number"), str):
        try:
            data["number"] = open_text(keyring, data["number"], callback_ctx(str(e["id"])))
        except DecryptError as exc:
            data["number"] = None
            data["error"] = str(exc)
    return data


def _line(r: dict[str, Any], keyring: Keyring | None) -> dict[str, Any]:
    out: dict[str, Any] = {"offset_ms": int(r["offset_ms"]), "speaker": r["speaker"]}
    sealed = r.get("text_sealed")
    if sealed is None:
        out["text"] = r["text"]
        return out
    try:
        if keyring is None:
            raise DecryptError("no master key configured")
        out["text"] = keyring.open(bytes(sealed), context=transcript_ctx(r["id"])).decode()
    except (DecryptError, UnicodeDecodeError) as exc:
        out["text"] = None
        out["error"] = {"item": f"transcript_lines/{r['id']}", "error": "undecryptable", "detail": str(exc)}
    return out


def summarize_usage(rows: list[dict[str, Any]], model: str | None, prices: PriceTable) -> dict[str, Any]:
    prompt = sum(int(r["prompt_tokens"]) for r in rows)
    response = sum(int(r["response_tokens"]) for r in rows)
    total = sum(int(r["total_tokens"]) for r in rows)
    by_modality: dict[str, dict[str, int]] = {"input": {}, "output": {}}
    for r in rows:
        d = r.get("details") or {}
        for direction, tokens in (("input", int(r["prompt_tokens"])), ("output", int(r["response_tokens"]))):
            detail = d.get(direction) or {}
            counted = 0
            for modality, n in detail.items():
                by_modality[direction][modality] = by_modality[direction].get(modality, 0) + int(n)
                counted += int(n)
            if tokens > counted:  # tokens the server did not attribute to a modality
                by_modality[direction]["UNSPECIFIED"] = (by_modality[direction].get("UNSPECIFIED", 0)
                                                         + tokens - counted)
    used_model = next((r["model"] for r in rows if r.get("model")), None) or model
    cost = cost_of(prices, used_model, by_modality)
    return {"model": used_model, "prompt_tokens": prompt, "response_tokens": response, "total_tokens": total,
            "by_modality": by_modality, "reports": len(rows), **cost}


async def delete_call(conn: psycopg.AsyncConnection[Any], call_id: str) -> bool:
    async with conn.transaction():
        n = 0
        for table, col in (("transcript_lines", "call_id"), ("call_events", "call_id"),
                           ("usage_reports", "call_id"), ("webhook_outbox", "call_id"), ("calls", "id")):
            cur = await conn.execute(f"DELETE FROM {table} WHERE {col} = %s", (call_id,))
            n += cur.rowcount
    return n > 0


async def dead_letters(conn: psycopg.AsyncConnection[Any], *, limit: int,
                       cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    args: list[Any] = []
    sql = ("SELECT event_id, call_id, type, attempts, last_error, created_at, dead_at"
           " FROM webhook_dead_letters")
    if cursor:
        ts, eid = decode_cursor(cursor, 2)
        sql += " WHERE (dead_at, event_id) < (%s::timestamptz, %s)"
        args += [ts, eid]
    sql += " ORDER BY dead_at DESC, event_id DESC LIMIT %s"
    args.append(limit + 1)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, args)
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    out = [{**r, "created_at": _iso(r["created_at"]), "dead_at": _iso(r["dead_at"])} for r in rows]
    nxt = encode_cursor(rows[-1]["dead_at"].isoformat(), rows[-1]["event_id"]) if more and rows else None
    return out, nxt
