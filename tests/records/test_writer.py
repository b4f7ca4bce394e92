"""The record writer: batches reach PostgreSQL, a database outage mid-run loses nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg

from appliance.records.spool import Spool
from appliance.records.writer import SPOOL_DROPPED, Database, RecordWriter
from tests.records.conftest import Db


def _call_items(sp: Spool, cid: str) -> int:
    sp.append("call.created", cid, box="b", sub=f"user{cid[-1]}", mode="direct", model="m")
    for k in range(5):
        sp.append("transcript", cid, speaker="user" if k % 2 == 0 else "model", offset_ms=k * 1000,
                  text=f"{cid} line {k}")
    sp.append("event", cid, type="turn", offset_ms=0, data={"response_ms": 200})
    sp.append("usage", cid, prompt_tokens=10, response_tokens=20, total_tokens=30)
    sp.append("call.ended", cid, reason="deleted", box="b", sub="u", quality={})
    return 9


async def _count(db: Db, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(db.dsn, password=db.password) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_postgres_outage_mid_run_loses_nothing(pg_db: Db, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    shards = [Spool(root / f"shard-{k}", segment_bytes=4096) for k in range(2)]
    sup = Spool(root / "supervisor", segment_bytes=4096)
    writer = RecordWriter(Database(pg_db.dsn, pg_db.password), root, batch_items=100, idle_seconds=0.05)
    task = asyncio.create_task(writer.run())
    expected = 0
    try:
        for i in range(40):  # 40 calls; PostgreSQL is down for calls 15..29
            if i == 15:
                await asyncio.to_thread(pg_db.pg.server.stop)
            if i == 30:
                assert writer.errors > 0  # the writer noticed the outage
                await asyncio.to_thread(pg_db.pg.server.start)
            cid = f"b.call{i:02d}"
            sp = shards[i % 2]
            expected += _call_items(sp, cid)
            sup.append("call.created", cid, box="b", sub="u", mode="direct")
            sup.append("call.ended", cid, reason="hangup", box="b", sub="u", quality={})
            expected += 2
            await asyncio.sleep(0.05)
        for sp in (*shards, sup):
            sp.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(root.rglob("*")) and any(  # noqa: ASYNC110 - polls files
                p.is_file() for p in root.rglob("*")):
            await asyncio.sleep(0.1)
    finally:
        done = task.done()
        task.cancel()
        res = await asyncio.gather(task, return_exceptions=True)
        await writer.db.close()
    assert not done, res  # the writer never dies
    left = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("seg-*")}
    assert writer.written >= expected, (writer.errors, left, [r.corrupt_records for r in writer.readers()])
    assert await _count(pg_db, "calls") == 40
    async with await psycopg.AsyncConnection.connect(pg_db.dsn, password=pg_db.password) as conn:
        cur = await conn.execute("SELECT call_id, count(*) FROM transcript_lines GROUP BY call_id"
                                 " HAVING count(*) <> 5")
        short = await cur.fetchall()
    assert not short, (short, writer.errors)
    assert await _count(pg_db, "transcript_lines") == 200
    assert await _count(pg_db, "usage_reports") == 40
    # every spooled item is in: nothing left in the spool, every segment deleted after commit
    assert not [p for p in root.rglob("*") if p.is_file()]


async def test_reshipping_after_a_lost_ack_is_harmless(pg_db: Db, tmp_path: Path) -> None:
    sp = Spool(tmp_path / "shard-0")
    _call_items(sp, "b.dup")
    sp.close()
    w1 = RecordWriter(Database(pg_db.dsn, pg_db.password), tmp_path)
    batch_reader = w1.readers()[0]
    batch = batch_reader.read_batch(100)
    async with w1.db.connection() as conn:  # commit, then "crash" before the ack
        from appliance.records import store
        await store.migrate(conn)
        async with conn.transaction():
            await store.apply_items(conn, batch.items, webhooks=False)
    await w1.db.close()
    w2 = RecordWriter(Database(pg_db.dsn, pg_db.password), tmp_path)  # a restarted supervisor
    assert await w2.drain(10)
    await w2.db.close()
    assert await _count(pg_db, "transcript_lines") == 5
    assert await _count(pg_db, "calls") == 1


async def test_dropped_items_reach_the_metric(pg_db: Db, tmp_path: Path) -> None:
    sp = Spool(tmp_path / "shard-0", max_bytes=1 << 16)
    while sp.append("transcript", "b.full", speaker="user", offset_ms=0, text="z" * 500):
        pass
    for _ in range(9):
        sp.append("transcript", "b.full", speaker="user", offset_ms=0, text="z" * 500)
    assert sp.dropped == 10
    before = SPOOL_DROPPED._value.get()
    w = RecordWriter(Database(pg_db.dsn, pg_db.password), tmp_path)
    await w.drain(10)
    sp._scanned = 0.0
    assert sp.append("event", "b.full", type="x")
    sp.close()
    await w.drain(10)
    await w.db.close()
    assert SPOOL_DROPPED._value.get() - before == 10
