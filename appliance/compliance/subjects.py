"""GDPR data-subject requests: everything stored about one ``sub`` (the caller's token subject), exported
(art. 15) or deleted (art. 17) in one step.

What "about a subject" means here: the subject's calls (``calls.sub``) and everything keyed by those
call ids — transcript lines, events, usage, webhook outbox rows and dead letters — plus the Redis
session records (``<prefix>:session:*`` whose ``sub`` matches, with their resume index). The audit trail
holds no personal data (call ids, names, timings: ``compliance.trail``), so it stays; the deletion adds a
tombstone entry (who, when, which classes and how many rows, the receipt id — never the ``sub``).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from appliance.compliance.atrest import open_text, webhook_body_ctx
from appliance.compliance.envelope import DecryptError, Keyring

CLASSES = (("transcript_lines", "transcripts"), ("call_events", "events"), ("usage_reports", "usage"),
           ("webhook_outbox", "webhook_outbox"), ("webhook_dead_letters", "webhook_dead_letters"))


async def call_ids(conn: Any, sub: str) -> list[str]:
    cur = await conn.execute("SELECT id FROM calls WHERE sub = %s ORDER BY created_at, id", (sub,))
    return [r[0] for r in await cur.fetchall()]


async def delete_records(conn: Any, sub: str) -> dict[str, int]:
    """Delete the subject's records in one transaction; rows deleted per class."""
    counts: dict[str, int] = {}
    async with conn.transaction():
        ids = await call_ids(conn, sub)
        for table, name in CLASSES:
            cur = await conn.execute(f"DELETE FROM {table} WHERE call_id = ANY(%s)", (ids,))
            counts[name] = cur.rowcount
        cur = await conn.execute("DELETE FROM calls WHERE id = ANY(%s)", (ids,))
        counts["calls"] = cur.rowcount
    return counts


async def export_records(conn: Any, sub: str, *, keyring: Keyring | None,
                         prices: Any) -> list[dict[str, Any]]:
    from appliance.records import store

    out = []
    for cid in await call_ids(conn, sub):
        record = await store.get_call(conn, cid, prices=prices, transcript_limit=10**6, keyring=keyring)
        if record is None:
            continue
        cur = await conn.execute("SELECT event_id, type, body, attempts, last_error, dead_at"
                                 " FROM webhook_dead_letters WHERE call_id = %s", (cid,))
        record["webhook_dead_letters"] = [
            {"event_id": r[0], "type": r[1], "body": _open_body(keyring, r[0], r[2]), "attempts": r[3],
             "last_error": r[4], "dead_at": r[5].isoformat()} for r in await cur.fetchall()]
        out.append(record)
    return out


def _open_body(keyring: Keyring | None, event_id: str, body: str) -> str | None:
    try:
        return open_text(keyring, body, webhook_body_ctx(event_id))
    except DecryptError:
        return None


async def redis_sessions(client: Any, prefix: str, sub: str) -> list[dict[str, Any]]:
    """The subject's session records in Redis (SCAN: sessions expire, so the key space stays small)."""
    out = []
    async for key in client.scan_iter(match=f"{prefix}:session:*", count=500):
        raw = await client.get(key)
        if raw is None:
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("sub") == sub:
            out.append(data)
    return out


async def delete_redis_sessions(client: Any, prefix: str, sub: str) -> int:
    n = 0
    for data in await redis_sessions(client, prefix, sub):
        keys = [f"{prefix}:session:{data.get('session_id')}"]
        if data.get("resume_token_hash"):
            keys.append(f"{prefix}:resume:{data['resume_token_hash']}")
        n += int(await client.delete(*keys))
    return n


def receipt(counts: dict[str, int], *, by: str) -> dict[str, Any]:
    return {"receipt_id": "del_" + secrets.token_urlsafe(12), "completed_at": time.time(), "by": by,
            "deleted": counts}
