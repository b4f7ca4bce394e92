"""Schema migrations (from empty and from the previous version) and idempotent item writes."""

from __future__ import annotations

import time

import psycopg

from appliance.records import store
from appliance.records.usage import BUILTIN_PRICES


async def _tables(conn: psycopg.AsyncConnection) -> set[str]:
    cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in await cur.fetchall()}


async def test_migrate_from_empty(aconn: psycopg.AsyncConnection) -> None:
    assert await store.schema_version(aconn) == 0
    applied = await store.migrate(aconn)
    assert applied == [v for v, _, _ in store.migrations()]
    assert await store.schema_version(aconn) == store.LATEST
    assert {"calls", "call_events", "transcript_lines", "usage_reports", "webhook_outbox",
            "webhook_dead_letters", "schema_version"} <= await _tables(aconn)
    assert await store.migrate(aconn) == []  # idempotent


async def test_migrate_from_previous_version_keeps_data(aconn: psycopg.AsyncConnection) -> None:
    previous = store.migrations()[-2][0]
    assert await store.migrate(aconn, target=previous) == list(range(1, previous + 1))
    assert "webhook_outbox" not in await _tables(aconn)
    async with aconn.transaction():
        await store.apply_items(aconn, [_created("box.a")], webhooks=False)
    assert await store.migrate(aconn) == [store.LATEST]
    cur = await aconn.execute("SELECT id FROM calls")
    assert [r[0] for r in await cur.fetchall()] == ["box.a"]


async def test_newer_schema_is_refused(aconn: psycopg.AsyncConnection) -> None:
    await store.migrate(aconn)
    await aconn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'future')",
                        (store.LATEST + 1,))
    await aconn.commit()
    try:
        await store.migrate(aconn)
    except store.SchemaError as exc:
        assert str(store.LATEST + 1) in str(exc)
    else:
        raise AssertionError("a newer schema must be refused")


def _created(cid: str, at: float | None = None) -> dict:
    return {"id": f"c-{cid}", "kind": "call.created", "call": cid, "at": at or time.time(), "box": "box",
            "sub": "alice", "mode": "direct", "model": "gemini-2.5-flash-native-audio-preview-09-2025",
            "voice": "Puck", "language": "en-US"}


async def test_items_are_idempotent_and_make_a_record(aconn: psycopg.AsyncConnection) -> None:
    await store.migrate(aconn)
    t = time.time()
    items = [
        _created("box.x", t),
        {"id": "i1", "kind": "call.connected", "call": "box.x", "at": t + 0.1},
        {"id": "i2", "kind": "transcript", "call": "box.x", "at": t + 1, "speaker": "user", "offset_ms": 500,
         "text": "hello"},
        {"id": "i3", "kind": "transcript", "call": "box.x", "at": t + 2, "speaker": "model",
         "offset_ms": 1800, "text": "hi there"},
        {"id": "i4", "kind": "event", "call": "box.x", "at": t + 1, "type": "turn", "offset_ms": 500,
         "data": {"speech_ms": 900, "response_ms": 310}},
        {"id": "i5", "kind": "usage", "call": "box.x", "at": t + 2, "prompt_tokens": 1000,
         "response_tokens": 2000, "total_tokens": 3000,
         "details": {"input": {"AUDIO": 900, "TEXT": 100}, "output": {"AUDIO": 2000}}},
        {"id": "i6", "kind": "call.ended", "call": "box.x", "at": t + 3, "reason": "deleted", "box": "box",
         "sub": "alice", "quality": {"loss_ratio": 0.01, "jitter_ms": 3.5}},
    ]
    for _ in range(2):  # the same batch twice (a crash between commit and ack)
        async with aconn.transaction():
            await store.apply_items(aconn, items, webhooks=True)
    rec = await store.get_call(aconn, "box.x", prices=BUILTIN_PRICES)
    assert rec is not None
    assert rec["state"] == "ended" and rec["end_reason"] == "deleted" and rec["sub"] == "alice"
    assert rec["connected_at"] is not None
    assert rec["transcript"] == [{"offset_ms": 500, "speaker": "caller", "text": "hello"},
                                 {"offset_ms": 1800, "speaker": "assistant", "text": "hi there"}]
    u = rec["usage"]
    assert (u["prompt_tokens"], u["response_tokens"], u["reports"]) == (1000, 2000, 1)
    # 900 audio in at $3/M + 100 text in at $0.5/M + 2000 audio out at $12/M
    assert abs(u["cost_usd"] - (900 * 3 + 100 * 0.5 + 2000 * 12) / 1e6) < 1e-9
    assert rec["quality"]["loss_ratio"] == 0.01 and rec["quality"]["response_ms"]["p50"] == 310
    assert [e["type"] for e in rec["events"]] == ["connected", "turn", "ended"]
    cur = await aconn.execute("SELECT type, count(*) FROM webhook_outbox GROUP BY type ORDER BY type")
    assert await cur.fetchall() == [("call.ended", 1), ("call.started", 1), ("call.transcript", 2)]


async def test_transcript_is_paged(aconn: psycopg.AsyncConnection) -> None:
    await store.migrate(aconn)
    n = 2500  # a caller talking for an hour: stored in full, returned page by page
    items = [_created("box.long")] + [
        {"id": f"l{i}", "kind": "transcript", "call": "box.long", "at": time.time(), "speaker": "user",
         "offset_ms": i * 1000, "text": f"line {i}"} for i in range(n)]
    async with aconn.transaction():
        await store.apply_items(aconn, items, webhooks=False)
    seen, cursor = [], None
    while True:
        rec = await store.get_call(aconn, "box.long", prices={}, transcript_limit=1000,
                                   transcript_cursor=cursor)
        assert rec is not None
        seen += [t["text"] for t in rec["transcript"]]
        cursor = rec["transcript_next"]
        if cursor is None:
            break
    assert seen == [f"line {i}" for i in range(n)]


async def test_unknown_call_is_none_and_delete(aconn: psycopg.AsyncConnection) -> None:
    await store.migrate(aconn)
    assert await store.get_call(aconn, "nope", prices={}) is None
    async with aconn.transaction():
        await store.apply_items(aconn, [_created("box.d")], webhooks=False)
    assert await store.delete_call(aconn, "box.d")
    assert await store.get_call(aconn, "box.d", prices={}) is None
