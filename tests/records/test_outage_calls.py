"""PostgreSQL stopped in the middle of a 40-call run of real calls (issue 12, "done when").

The pipeline harness (bench/pipeline.py: the real media and AI workers, the real SDK against the emulator,
40 RTP callers talking in turns) runs with records on, so every AI worker spools its calls' items; the
record writer (as the supervisor runs it) ships them into a real PostgreSQL that is stopped for the
middle of the run. The calls keep their deadlines while the database is away (no drops, no worker
restart), the writer notices the outage, and afterwards every call's record is in the database — items
spooled during the outage included — and the spool is empty (segments are deleted only after commit).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time

import psycopg
import pytest

from appliance.compliance.atrest import load_master
from appliance.records.spool import spool_root
from appliance.records.writer import Database, RecordWriter
from bench import pipeline
from tests.records.conftest import Db

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CALLS = 40


def _args(dsn: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pipeline.add_arguments(p)
    args = p.parse_args([])
    args.sessions = CALLS
    args.set = [f'records.dsn="{dsn}"']
    return args


async def test_postgres_stopped_mid_run_of_40_calls_loses_no_record(pg_db: Db) -> None:
    with pipeline.Bench(_args(pg_db.dsn), CALLS) as b:
        await asyncio.to_thread(b.add_sessions, CALLS)
        root = spool_root(b.cfg.paths.state_dir, b.cfg.records.spool_dir)
        writer = RecordWriter(Database(pg_db.dsn, pg_db.password), root, batch_items=200,
                              idle_seconds=0.1, master=load_master(b.cfg, create=False))
        task = asyncio.create_task(writer.run())
        try:
            before = await asyncio.to_thread(b.measure, 4.0)
            await asyncio.to_thread(pg_db.pg.server.stop)
            down_from = dt.datetime.now(dt.UTC)
            during = await asyncio.to_thread(b.measure, 10.0)  # the calls go on; the workers spool
            down_until = dt.datetime.now(dt.UTC)
            assert writer.errors > 0  # the writer noticed
            await asyncio.to_thread(pg_db.pg.server.start)
            after = await asyncio.to_thread(b.measure, 4.0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (len(await _events_per_call(pg_db)) == CALLS
                        and await _spooled_during(pg_db, down_from, down_until) == CALLS):
                    break
                await asyncio.sleep(0.5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await writer.db.close()
    print(f"answered turns before/during/after the outage: {before['turn_e2e_n']}/{during['turn_e2e_n']}/"
          f"{after['turn_e2e_n']}; drops {before['drops']}/{during['drops']}/{after['drops']}; "
          f"writer errors {writer.errors}, items written {writer.written}")
    # nothing on the audio path waited for the database: the calls were answered all along
    for window in (before, during, after):
        assert window["worker_restarts"] == 0, window
    assert during["turn_e2e_n"] >= CALLS // 2, during
    per_call = await _events_per_call(pg_db)
    assert len(per_call) == CALLS, sorted(per_call)
    # items the workers spooled while PostgreSQL was down arrived, for every call
    assert await _spooled_during(pg_db, down_from, down_until) == CALLS


async def _events_per_call(db: Db) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(db.dsn, password=db.password) as conn:
        cur = await conn.execute("SELECT call_id, count(*) FROM call_events GROUP BY call_id")
        return {str(cid): int(n) for cid, n in await cur.fetchall()}


async def _spooled_during(db: Db, start: dt.datetime, end: dt.datetime) -> int:
    """Calls with at least one event stamped inside the outage."""
    try:
        async with await psycopg.AsyncConnection.connect(db.dsn, password=db.password) as conn:
            cur = await conn.execute("SELECT count(DISTINCT call_id) FROM call_events"
                                     " WHERE at BETWEEN %s AND %s",
                                     (start, end))
            row = await cur.fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return 0
