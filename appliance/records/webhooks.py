"""Signed webhooks from the database outbox: ``call.started``, ``call.transcript``, ``call.ended``,
``call.callback_requested`` and ``call.transfer_requested`` (the degradation menu, workers/ai/ivr.py).

The writer inserts outbox rows in the same transaction as the items they describe (``store``), so an
event exists exactly when its record does, and its id (``evt_<item id>``) is stable across re-ships.
This task claims due rows (``FOR UPDATE SKIP LOCKED`` + a lease: several boxes sharing a database
never send one event twice at once), POSTs them concurrently (``records.webhook_concurrency``; each
with the whole-request timeout ``records.webhook_timeout_seconds``), and marks them delivered on any
2xx. Anything else (timeout, refused, 5xx, 4xx) is retried with exponential backoff (2 s doubling,
capped at 1 h, with jitter) until ``records.webhook_max_age_seconds`` (24 h) after the event, then the
row moves to ``webhook_dead_letters`` (visible in the admin API). A slow or broken receiver only
occupies its own deliveries' slots: calls never wait for webhooks, and the writer does not either.

Body: ``{"id", "type", "created_at", "data"}``; ``call.ended``'s data is the whole record (as the
admin API returns it), built at the first attempt (a short grace after the end lets the AI worker's
last items land) and then fixed: every retry sends the same bytes with a fresh signature
(``signing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from prometheus_client import Counter
from psycopg.rows import dict_row

from appliance.compliance.atrest import open_text, pg_store, seal_text, webhook_body_ctx, webhook_text_ctx
from appliance.compliance.envelope import DecryptError, Keyring
from appliance.records import signing, store
from appliance.records.usage import PriceTable
from appliance.records.writer import Database

log = logging.getLogger(__name__)

DELIVERIES = Counter("va_webhook_deliveries_total", "Webhook delivery attempts by result", ["result"])
DEAD = Counter("va_webhook_dead_letters_total", "Webhook events given up on (moved to dead letters)")
LEASE_SECONDS = 60
BACKOFF_BASE = 2.0
BACKOFF_MAX = 3600.0
MAX_RESPONSE_BYTES = 4096


def backoff(attempts: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.0)


class WebhookSender:
    def __init__(self, db: Database, url: str, key: bytes, *, prices: PriceTable, timeout: float = 5.0,
                 max_age_seconds: float = 86400, concurrency: int = 16, poll_seconds: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None, keyring: Keyring | None = None) -> None:
        self.db = db
        self.keyring = keyring  # opens sealed transcript lines for call.ended (compliance/atrest.py)
        self.url = url
        self.key = key
        self.prices = prices
        self.timeout = timeout
        self.max_age = max_age_seconds
        self.concurrency = concurrency
        self.poll = poll_seconds
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False, transport=transport,
                                         headers={"user-agent": "voice-appliance-webhooks"})
        self._sem = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            try:
                rows = await self._claim()
            except (psycopg.Error, OSError):
                await asyncio.sleep(2.0)
                continue
            for row in rows:
                task = asyncio.create_task(self._deliver(row))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            await asyncio.sleep(self.poll if len(rows) < self.concurrency else 0)

    async def _claim(self) -> list[dict[str, Any]]:
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return []
        async with self.db.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "UPDATE webhook_outbox SET next_attempt_at = now() + make_interval(secs => %s)"
                " WHERE event_id IN (SELECT event_id FROM webhook_outbox WHERE delivered_at IS NULL"
                " AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING event_id, call_id, type, payload, body, created_at, attempts",
                (LEASE_SECONDS, free))
            return list(await cur.fetchall())

    async def _body(self, row: dict[str, Any]) -> bytes:
        """The event's bytes: fixed at the first attempt and kept sealed (compliance/atrest.py)."""
        eid = row["event_id"]
        if row["body"]:
            async with self.db.connection() as conn:
                if self.keyring is not None:
                    await pg_store(self.keyring).load(conn)
            return open_text(self.keyring, str(row["body"]), webhook_body_ctx(eid)).encode()
        data = dict(row["payload"])
        async with self.db.connection() as conn:
            if self.keyring is not None:
                await pg_store(self.keyring).load(conn)
            if row["type"] == "call.ended":
                record = await store.get_call(conn, row["call_id"], prices=self.prices,
                                              transcript_limit=100000, keyring=self.keyring)
                data = record or data
            else:
                for k in ("text", "number"):  # sealed at rest (store.apply_items)
                    if isinstance(data.get(k), str):
                        data[k] = open_text(self.keyring, data[k], webhook_text_ctx(eid))
        body = json.dumps({"id": eid, "type": row["type"],
                           "created_at": row["created_at"].isoformat().replace("+00:00", "Z"), "data": data},
                          separators=(",", ":"), default=str)
        async with self.db.connection() as conn, conn.transaction():
            stored = seal_text(self.keyring, body, webhook_body_ctx(eid))
            if self.keyring is not None:
                await pg_store(self.keyring).flush(conn)
            await conn.execute("UPDATE webhook_outbox SET body = %s WHERE event_id = %s AND body IS NULL",
                               (stored, eid))
        row["body"] = stored
        return body.encode()

    async def _deliver(self, row: dict[str, Any]) -> None:
        async with self._sem:
            error = ""
            try:
                body = await self._body(row)
            except (psycopg.Error, OSError):
                return  # the lease expires and the row comes back
            except DecryptError as exc:  # tampered / foreign ciphertext: retried, then dead-lettered
                log.warning("webhook event does not open",
                            extra={"event": row["event_id"], "error": str(exc)})
                with contextlib.suppress(psycopg.Error, OSError):
                    await self._settle(row, b"", False, "undecryptable")
                return
            try:
                async with asyncio.timeout(self.timeout):
                    resp = await self._client.post(self.url, content=body, headers=signing.headers(
                        self.key, body, event_id=row["event_id"], event_type=row["type"]))
                ok = 200 <= resp.status_code < 300
                if not ok:
                    error = f"HTTP {resp.status_code}"
            except (TimeoutError, httpx.TimeoutException):
                ok, error = False, f"timeout after {self.timeout:g} s"
            except httpx.HTTPError as exc:
                ok, error = False, f"{type(exc).__name__}"
            DELIVERIES.labels(result="ok" if ok else "error").inc()
            with contextlib.suppress(psycopg.Error, OSError):
                await self._settle(row, body, ok, error)

    async def _settle(self, row: dict[str, Any], body: bytes, ok: bool, error: str) -> None:
        async with self.db.connection() as conn, conn.transaction():
            if ok:
                await conn.execute("UPDATE webhook_outbox SET delivered_at = now(), attempts = attempts + 1,"
                                   " last_error = NULL WHERE event_id = %s", (row["event_id"],))
                return
            attempts = int(row["attempts"]) + 1
            age = (datetime.now(UTC) - row["created_at"]).total_seconds()
            delay = backoff(attempts)
            if age + delay > self.max_age:
                await conn.execute(
                    "INSERT INTO webhook_dead_letters (event_id, call_id, type, body, attempts, last_error,"
                    " created_at) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (event_id) DO NOTHING",
                    (row["event_id"], row["call_id"], row["type"], str(row.get("body") or ""), attempts,
                     error, row["created_at"]))
                await conn.execute("DELETE FROM webhook_outbox WHERE event_id = %s", (row["event_id"],))
                DEAD.inc()
                log.warning("webhook event dead-lettered",
                            extra={"event": row["event_id"], "type": row["type"], "attempts": attempts,
                                   "error": error})
                return
            await conn.execute("UPDATE webhook_outbox SET attempts = %s, last_error = %s,"
                               " next_attempt_at = now() + make_interval(secs => %s) WHERE event_id = %s",
                               (attempts, error, delay, row["event_id"]))

    async def aclose(self) -> None:
        for t in list(self._inflight):
            t.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._client.aclose()
