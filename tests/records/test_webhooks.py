"""Signed webhooks from the outbox to a real local HTTP receiver: signatures, exactly-once event ids,
retries, dead letters, and a slow/500/garbage receiver that blocks nobody else."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from appliance.records import signing, store
from appliance.records.usage import BUILTIN_PRICES
from appliance.records.webhooks import WebhookSender
from appliance.records.writer import Database
from tests.records.conftest import Db

KEY = b"whsec-test-key"


class Receiver:
    """A real HTTP server; ``mode`` per path: ok | fail (500) | slow (sleeps) | garbage (2xx, junk body)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                mode = self.path.strip("/")
                rec.got.append((mode, dict(self.headers), body))
                if mode == "slow":
                    time.sleep(3)
                code = 500 if mode == "fail" else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"\x00\xffnot json" if mode == "garbage" else b"{}")

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mode}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


async def _seed(pg_db: Db, n_calls: int = 2) -> None:
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    await store.migrate(conn)
    t = time.time()
    items = []
    for i in range(n_calls):
        cid = f"box.w{i}"
        items += [{"id": f"c{i}", "kind": "call.created", "call": cid, "at": t, "box": "box", "sub": "s",
                   "mode": "direct", "model": "gemini-2.5-flash-native-audio-preview-09-2025"},
                  {"id": f"t{i}a", "kind": "transcript", "call": cid, "at": t, "speaker": "user",
                   "offset_ms": 100, "text": "hi"},
                  {"id": f"t{i}b", "kind": "transcript", "call": cid, "at": t, "speaker": "model",
                   "offset_ms": 900, "text": "hello"},
                  {"id": f"e{i}", "kind": "call.ended", "call": cid, "at": t, "reason": "hangup",
                   "box": "box", "sub": "s", "quality": {"loss_ratio": 0.0}}]
    async with conn.transaction():
        await store.apply_items(conn, items, webhooks=True, ended_grace_seconds=0.0)
        await store.apply_items(conn, items, webhooks=True, ended_grace_seconds=0.0)  # a re-ship: no dupes
    await conn.close()


async def _wait(pred: Any, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_signed_events_exactly_once(pg_db: Db, receiver: Receiver) -> None:
    await _seed(pg_db)
    sender = WebhookSender(Database(pg_db.dsn, pg_db.password), receiver.url("ok"), KEY,
                           prices=BUILTIN_PRICES, poll_seconds=0.05)
    task = asyncio.create_task(sender.run())
    try:
        await _wait(lambda: len(receiver.got) >= 8)
        await asyncio.sleep(1.0)  # nothing more arrives
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sender.aclose()
        await sender.db.close()
    ids = [h["X-VA-Event-Id"] for _, h, _ in receiver.got]
    assert len(ids) == len(set(ids)) == 8
    types = sorted(json.loads(b)["type"] for _, _, b in receiver.got)
    assert types == ["call.ended"] * 2 + ["call.started"] * 2 + ["call.transcript"] * 4
    for _, h, body in receiver.got:
        signing.verify(KEY, body, h["X-VA-Signature"])  # raises if wrong
        ev = json.loads(body)
        assert ev["id"] == h["X-VA-Event-Id"] and ev["type"] == h["X-VA-Event-Type"]
        if ev["type"] == "call.ended":  # the whole record
            assert [t["speaker"] for t in ev["data"]["transcript"]] == ["caller", "assistant"]
            assert ev["data"]["usage"] is not None and ev["data"]["quality"]["loss_ratio"] == 0.0
    with pytest.raises(signing.SignatureError):
        signing.verify(KEY, receiver.got[0][2] + b" ", receiver.got[0][1]["X-VA-Signature"])
    with pytest.raises(signing.SignatureError):  # a replay outside the window
        signing.verify(KEY, receiver.got[0][2], receiver.got[0][1]["X-VA-Signature"], now=time.time() + 3600)


async def test_failing_receiver_retries_then_dead_letters(pg_db: Db, receiver: Receiver) -> None:
    await _seed(pg_db, 1)
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    # one event is almost 24 h old: its next failure dead-letters it; the rest get a backoff
    await conn.execute("UPDATE webhook_outbox SET created_at = %s WHERE event_id = 'evt_c0'",
                       (datetime.now(UTC) - timedelta(seconds=86399),))
    sender = WebhookSender(Database(pg_db.dsn, pg_db.password), receiver.url("fail"), KEY, prices={},
                           poll_seconds=0.05)
    task = asyncio.create_task(sender.run())
    try:
        await _wait(lambda: len({h["X-VA-Event-Id"] for _, h, _ in receiver.got}) >= 4)
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sender.aclose()
        await sender.db.close()
    cur = await conn.execute("SELECT event_id, attempts, last_error FROM webhook_dead_letters")
    assert await cur.fetchall() == [("evt_c0", 1, "HTTP 500")]
    cur = await conn.execute("SELECT count(*), min(attempts), min(next_attempt_at - now())"
                             " FROM webhook_outbox WHERE delivered_at IS NULL")
    n, attempts, wait = await cur.fetchone()
    assert n == 3 and attempts == 1 and wait.total_seconds() > 0.5  # backing off, not hammering
    await conn.close()


async def test_slow_and_garbage_receivers_block_nobody(pg_db: Db, receiver: Receiver) -> None:
    await _seed(pg_db, 1)
    slow = WebhookSender(Database(pg_db.dsn, pg_db.password), receiver.url("slow"), KEY, prices={},
                         timeout=1.0, poll_seconds=0.05)
    t0 = time.monotonic()
    task = asyncio.create_task(slow.run())
    try:
        # all four go out at once (concurrency), each gives up after its 1 s timeout: ~1 s, not 4 x 3 s
        await _wait(lambda: len(receiver.got) >= 4, limit=5)
        assert time.monotonic() - t0 < 2.5
        await asyncio.sleep(1.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await slow.aclose()
        await slow.db.close()
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    cur = await conn.execute("SELECT DISTINCT last_error FROM webhook_outbox")
    assert await cur.fetchall() == [("timeout after 1 s",)]
    await conn.execute("UPDATE webhook_outbox SET next_attempt_at = now()")
    await conn.close()
    receiver.got.clear()
    garbage = WebhookSender(Database(pg_db.dsn, pg_db.password), receiver.url("garbage"), KEY, prices={},
                            poll_seconds=0.05)
    task = asyncio.create_task(garbage.run())
    try:
        await _wait(lambda: len(receiver.got) >= 4)
        await asyncio.sleep(0.5)  # let the deliveries settle in the database
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await garbage.aclose()
        await garbage.db.close()
    # a 2xx is a delivery whatever the body says; retries carried the same body bytes
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    cur = await conn.execute("SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NOT NULL")
    assert (await cur.fetchone())[0] == 4
    await conn.close()


async def test_callback_and_transfer_requests_become_webhooks_with_the_number(pg_db: Db,
                                                                             receiver: Receiver) -> None:
    """The degradation menu's requests (workers/ai/ivr.py → records spool): a ``call.callback_requested``
    event carrying the number the caller keyed in and a ``call.transfer_requested`` one with the target;
    the stored event (admin API record) has the number too."""
    conn = await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password, autocommit=True)
    await store.migrate(conn)
    t, cid = time.time(), "box.cb1"
    items = [{"id": "cb-c", "kind": "call.created", "call": cid, "at": t, "box": "box", "sub": "s",
              "mode": "direct"},
             {"id": "cb-e1", "kind": "event", "call": cid, "at": t, "type": "callback_requested",
              "offset_ms": 4200, "data": {"digits": 7}, "callback_number": "5550123"},
             {"id": "cb-e2", "kind": "event", "call": cid, "at": t, "type": "transfer_requested",
              "offset_ms": 5000, "data": {"target": "+49301234567"}}]
    async with conn.transaction():
        await store.apply_items(conn, items, webhooks=True)
    record = await store.get_call(conn, cid, prices=BUILTIN_PRICES)
    await conn.close()
    assert record is not None
    cb = [e for e in record["events"] if e["type"] == "callback_requested"]
    assert cb and cb[0]["data"] == {"digits": 7, "number": "5550123"}
    sender = WebhookSender(Database(pg_db.dsn, pg_db.password), receiver.url("ok"), KEY,
                           prices=BUILTIN_PRICES, poll_seconds=0.05)
    task = asyncio.create_task(sender.run())
    try:
        await _wait(lambda: len(receiver.got) >= 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sender.aclose()
        await sender.db.close()
    by_type = {json.loads(b)["type"]: json.loads(b)["data"] for _, _, b in receiver.got}
    assert by_type["call.callback_requested"] == {"call_id": cid, "offset_ms": 4200, "digits": 7,
                                                  "number": "5550123"}
    assert by_type["call.transfer_requested"] == {"call_id": cid, "offset_ms": 5000, "target": "+49301234567"}
