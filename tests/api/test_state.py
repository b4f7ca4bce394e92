"""Redis session store against a real redis-server: TTLs, hashed resume tokens, outage catch-up."""

from __future__ import annotations

import asyncio

from appliance.config import RedisConfig
from appliance.state import DISCONNECTED, SessionRecord, SessionStore, new_session_id, redis_client
from tests.harness.redis import redis_server


def store_for(client, prefix) -> SessionStore:
    return SessionStore(client, active_ttl=3600, disconnected_ttl=300, prefix=prefix)


async def test_create_update_ttl_and_hashed_token(aredis, prefix):
    store = store_for(aredis, prefix)
    sid = new_session_id()
    token = await store.create(SessionRecord(session_id=sid, sub="alice", shard=1, slot=7, voice="Puck"))
    await store.update(sid, janus_session_id=123, janus_handle_id=456, resume_handle="h-1",
                       last_transcript="hello there")
    got = await store.get(sid)
    assert got and (got.shard, got.slot, got.janus_handle_id, got.resume_handle) == (1, 7, 456, "h-1")
    assert got.last_transcript == "hello there"
    assert 3590 <= await aredis.ttl(f"{prefix}:session:{sid}") <= 3600
    # the token itself is nowhere in Redis, only its hash
    for key in await aredis.keys(f"{prefix}:*"):
        assert token.encode() not in key
        if await aredis.type(key) == b"string":
            assert token.encode() not in await aredis.get(key)
    await store.mark_disconnected(sid)
    assert 290 <= await aredis.ttl(f"{prefix}:session:{sid}") <= 300
    assert (await store.get(sid)).state == DISCONNECTED
    await store.delete(sid)
    assert await store.get(sid) is None
    assert await aredis.keys(f"{prefix}:*") == []


async def test_resume_token_claimed_once(aredis, prefix):
    box_a, box_b = store_for(aredis, prefix), store_for(aredis, prefix)
    try:
        await _claimed_once(aredis, prefix, box_a, box_b)
    finally:  # a slow Redis makes a store start its catch-up task: never leak it past the test
        await asyncio.wait_for(asyncio.gather(box_a.close(), box_b.close()), 10)


async def _claimed_once(aredis, prefix, box_a: SessionStore, box_b: SessionStore) -> None:
    sid = new_session_id()
    token = await box_a.create(SessionRecord(session_id=sid, sub="bob", box="a", resume_handle="h-9"))
    await box_a.mark_disconnected(sid)
    assert (await box_b.find_by_resume_token(token)).session_id == sid
    assert await box_b.find_by_resume_token("not-a-token") is None
    results = await asyncio.wait_for(asyncio.gather(box_b.claim(token, "b"), box_a.claim(token, "a2")), 10)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    record, new_token = winners[0]
    assert record.state == "active" and record.resume_handle == "h-9" and new_token != token
    assert await box_b.claim(token, "b") is None  # old token is dead
    assert (await box_b.find_by_resume_token(new_token)).box == record.box
    assert 3590 <= await aredis.ttl(f"{prefix}:session:{sid}") <= 3600


async def test_redis_outage_queues_and_catches_up(tmp_path):
    with redis_server(tmp_path) as srv:
        client = redis_client(RedisConfig(url=srv.url), timeout=0.3)
        store = SessionStore(client, prefix="o", max_backoff=0.2)
        await store.start()
        sid = new_session_id()
        await store.create(SessionRecord(session_id=sid, sub="carol"))
        srv.stop()  # Redis gone (data lost too: a restarted, empty Redis)
        await store.update(sid, resume_handle="h-during-outage", last_transcript="still talking")
        other = new_session_id()
        token = await store.create(SessionRecord(session_id=other, sub="dave"))
        assert store.degraded and store.pending == 2
        # reads keep working from this box's cache
        assert (await store.get(sid)).resume_handle == "h-during-outage"
        # while degraded, writes queue instead of each waiting for a timeout
        for i in range(20):
            await asyncio.wait_for(store.update(sid, last_transcript=f"line {i}"), 0.1)
        assert store.pending == 2
        srv.start()
        for _ in range(1000):  # up to 20 s: catch-up backs off, and CI boxes are loaded
            if store.pending == 0 and not store.degraded:
                break
            await asyncio.sleep(0.02)
        assert store.pending == 0 and not store.degraded
        fresh = SessionStore(client, prefix="o")
        assert (await fresh.get(sid)).last_transcript == "line 19"
        assert (await fresh.find_by_resume_token(token)).session_id == other
        await store.close()
        await client.aclose()


async def test_hung_redis_does_not_block_calls(tmp_path):
    with redis_server(tmp_path) as srv:
        client = redis_client(RedisConfig(url=srv.url), timeout=0.2)
        store = SessionStore(client, prefix="h", max_backoff=0.2)
        sid = new_session_id()
        await store.create(SessionRecord(session_id=sid, sub="erin"))
        srv.pause()  # SIGSTOP: connections hang rather than being refused
        try:
            await asyncio.wait_for(store.update(sid, resume_handle="h2"), 2.0)
            assert store.degraded
            assert (await asyncio.wait_for(store.get(sid), 0.1)).resume_handle == "h2"
        finally:
            srv.resume()
        for _ in range(1000):  # up to 20 s: catch-up backs off, and CI boxes are loaded
            if store.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert store.pending == 0
        assert (await SessionStore(client, prefix="h").get(sid)).resume_handle == "h2"
        await store.close()
        await client.aclose()


async def test_resume_on_same_box_during_outage(tmp_path):
    with redis_server(tmp_path) as srv:
        client = redis_client(RedisConfig(url=srv.url), timeout=0.3)
        store = SessionStore(client, prefix="r", max_backoff=0.2)
        sid = new_session_id()
        token = await store.create(SessionRecord(session_id=sid, sub="frank", resume_handle="h-7"))
        await store.mark_disconnected(sid)
        srv.pause()
        try:
            assert (await store.find_by_resume_token(token)).session_id == sid
            record, new_token = await store.claim(token, "box-a")
            assert record.state == "active" and record.resume_handle == "h-7"
            assert await store.claim(token, "box-a") is None  # spent, even offline
        finally:
            srv.resume()
        for _ in range(1000):  # up to 20 s: catch-up backs off, and CI boxes are loaded
            if store.pending == 0 and not store.degraded:
                break
            await asyncio.sleep(0.02)
        other_box = SessionStore(client, prefix="r")
        assert await other_box.find_by_resume_token(token) is None
        assert (await other_box.find_by_resume_token(new_token)).state == "active"
        await store.close()
        await client.aclose()
