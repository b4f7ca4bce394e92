"""Redis session store against a real redis-server: TTLs, hashed resume tokens, outage catch-up,
ownership compare-and-set between boxes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import pytest

from appliance.config import RedisConfig
from appliance.state import (
    DISCONNECTED,
    SessionRecord,
    SessionStore,
    StateUnavailable,
    box_of,
    new_session_id,
    redis_client,
)
from tests.harness.redis import TcpLink, redis_server


def store_for(client, prefix) -> SessionStore:
    return SessionStore(client, active_ttl=3600, disconnected_ttl=300, prefix=prefix)


async def test_create_update_ttl_and_hashed_token(aredis, prefix):
    store = store_for(aredis, prefix)
    sid = new_session_id("a")
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
    sid = new_session_id("a")
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
        sid = new_session_id("a")
        await store.create(SessionRecord(session_id=sid, sub="carol"))
        srv.stop()  # Redis gone (data lost too: a restarted, empty Redis)
        await store.update(sid, resume_handle="h-during-outage", last_transcript="still talking")
        other = new_session_id("a")
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
        sid = new_session_id("a")
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
        sid = new_session_id("a")
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


async def _settled(store: SessionStore, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.02)):  # catch-up backs off, and CI boxes are loaded
        if store.pending == 0 and not store.degraded:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"store never caught up: pending={store.pending} degraded={store.degraded}")


async def test_old_box_write_back_cannot_undo_a_takeover(redis_srv, aredis, prefix):
    """The race: box A is cut off from Redis with writes queued for a call; the caller resumes on box B;
    A's link heals and it replays its queue. Before ownership CAS that replay flipped the record back to
    A ("disconnected") and re-indexed the spent resume token, so the old token worked a second time.

    Only APIs that exist before the fix are used up to the marked line, so this fails on the old code.
    """
    link = TcpLink(redis_srv.host, redis_srv.port)
    await link.start()
    client_a = redis_client(RedisConfig(url=link.url), timeout=0.3)
    box_a = SessionStore(client_a, prefix=prefix, max_backoff=0.1)
    box_b = SessionStore(aredis, prefix=prefix)
    try:
        sid = "a." + secrets.token_urlsafe(16)
        token = await box_a.create(SessionRecord(session_id=sid, sub="zoe", box="a", resume_handle="h-1"))
        await link.cut()  # A is partitioned from Redis (Redis itself is fine)
        await box_a.update(sid, last_transcript="A's stale line")
        await box_a.mark_disconnected(sid)
        assert box_a.degraded and box_a.pending == 1
        claimed = await box_b.claim(token, "b")  # the caller resumes on B meanwhile
        assert claimed is not None
        _, new_token = claimed
        await link.restore()
        await _settled(box_a)  # A replays what it queued
        now = SessionRecord.from_json(await aredis.get(f"{prefix}:session:{sid}"))
        assert now.box == "b" and now.state == "active", "A's replay flipped the record back"
        assert now.last_transcript != "A's stale line"
        assert await box_b.find_by_resume_token(token) is None, "the spent token came back"
        assert await box_b.claim(token, "c") is None, "the spent token resumed the call a second time"
        assert (await box_b.find_by_resume_token(new_token)).box == "b"
        # --- from here on: the fix's own API
        assert not box_a.owns(sid)  # A dropped its queued/cached writes for the call
        try:
            await box_a.update(sid, last_transcript="A again")
            raise AssertionError("A could still write a session it lost")
        except KeyError:
            pass
        assert SessionRecord.from_json(await aredis.get(f"{prefix}:session:{sid}")).box == "b"
    finally:
        await box_a.close()
        await client_a.aclose()
        await link.stop()


async def test_takeover_on_another_box_moves_the_id_and_tells_the_old_box(aredis, prefix):
    """Sessions' cross-box resume: new id naming the new box, old record a ``moved`` tombstone the old
    box can no longer write; the old box learns it in one round trip (``lost_of``) and hears ``on_lost``."""
    box_a, box_b = store_for(aredis, prefix), store_for(aredis, prefix)
    lost: list[tuple[str, str]] = []
    box_a.on_lost = lambda sid, owner: lost.append((sid, owner))
    old = new_session_id("a")
    token = await box_a.create(SessionRecord(session_id=old, sub="yan", box="a", resume_handle="h-2",
                                             last_transcript="hello"))
    assert box_of(old) == "a" and box_of("s_legacy") is None
    new = new_session_id("b")
    record, new_token = await box_b.claim(token, "b", new)
    assert (record.session_id, record.box, record.resumed_from) == (new, "b", old)
    assert record.resume_handle == "h-2" and record.last_transcript == "hello"
    tomb = await box_b.get(old)
    assert (tomb.state, tomb.moved_to, tomb.box, tomb.resume_token_hash) == ("moved", new, "b", "")
    assert await box_a.lost_of([old]) == [old] and lost == [(old, "?")]
    assert not box_a.owns(old)
    with contextlib.suppress(KeyError):
        await box_a.update(old, last_transcript="late")
        raise AssertionError("the old box wrote a moved session")
    assert await box_b.lost_of([new]) == []  # B still owns the new id
    assert await box_a.find_by_resume_token(token) is None
    assert (await box_a.find_by_resume_token(new_token)).session_id == new
    # force-migrate on B: a fresh token, the previous one spent for good
    migrate_token = await box_b.begin_migration(new)
    assert (await box_b.get(new)).state == "migrating"
    assert await box_a.find_by_resume_token(new_token) is None
    again, _ = await box_a.claim(migrate_token, "a", new_session_id("a"))
    assert again.resumed_from == new and await box_b.lost_of([new]) == [new]
    await box_a.close()
    await box_b.close()


async def test_takeover_needs_redis_but_own_resume_does_not(tmp_path):
    with redis_server(tmp_path) as srv:
        client = redis_client(RedisConfig(url=srv.url), timeout=0.2)
        store = SessionStore(client, prefix="u", max_backoff=0.2)
        token = await store.create(SessionRecord(session_id=new_session_id("a"), sub="x", box="a"))
        srv.pause()
        try:
            with pytest.raises(StateUnavailable):
                await store.claim(token, "a", new_session_id("a"))
        finally:
            srv.resume()
        await store.close()
        await client.aclose()
