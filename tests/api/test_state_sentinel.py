"""Session state and rate limits through Redis Sentinel: a real primary + replica + 3 redis-sentinel
processes on loopback. Killing the primary under a stream of session writes loses no record (writes
queue while there is no primary and replay on the promoted one) and never blocks a rate-limit check
(fail open). The appliance's ACL user is limited to ``va:*``."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis as redis_sync
from redis.exceptions import NoPermissionError

from appliance.config import LimitsConfig, RedisConfig
from appliance.ratelimit import ANON, CREATE, RateLimiter
from appliance.state import SessionRecord, SessionStore, new_session_id, redis_client
from tests.harness.redis import sentinel_set

PASSWORD = "s3cret-for-tests"
ACL = [f"va on >{PASSWORD} ~va:* resetchannels +@all -@dangerous"]


def fleet_cfg(sentinels: list[str], pw_file: str) -> RedisConfig:
    return RedisConfig(sentinels=sentinels, sentinel_master="va", username="va", password_file=pw_file)


@pytest.mark.slow
async def test_primary_killed_under_writes_loses_no_record(tmp_path):
    pw = tmp_path / "redis-password"
    pw.write_text(PASSWORD + "\n")
    with sentinel_set(tmp_path / "redis", users=ACL) as rs:
        cfg = fleet_cfg(rs.addresses, str(pw))
        client = redis_client(cfg, timeout=0.3)
        store = SessionStore.from_config(cfg, client)
        store._max_backoff = 0.2
        limiter = RateLimiter(client, LimitsConfig(session_creates_per_minute=100000,
                                                   signalling_per_minute=100000), open_seconds=0.2)
        await store.start()
        old_primary = rs.primary.port
        expected: dict[str, str] = {}
        limiter_results: list[bool] = []
        errors: list[float] = []  # time of each write that found Redis failing (queued instead)
        recovered: list[float] = []
        killed_at = 0.0

        async def writer() -> None:
            sids: list[str] = []
            for i in range(300):  # ~6 s at 20 ms
                if i % 3 == 0 or not sids:
                    sid = new_session_id("box-1")
                    await store.create(SessionRecord(session_id=sid, sub="s", box="box-1"))
                    sids.append(sid)
                    expected[sid] = ""
                else:
                    sid = sids[i % len(sids)]
                    await store.update(sid, last_transcript=f"line {i}")
                    expected[sid] = f"line {i}"
                limiter_results.append((await limiter.check(CREATE, "192.0.2.1")).allowed)
                if store.degraded:
                    errors.append(time.monotonic())
                elif errors and not recovered:
                    recovered.append(time.monotonic())
                await asyncio.sleep(0.02)

        task = asyncio.create_task(writer())
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        rs.kill_primary()
        await asyncio.wait_for(task, 60)
        for _ in range(1000):
            if store.pending == 0 and not store.degraded:
                break
            await asyncio.sleep(0.02)
        assert store.pending == 0 and not store.degraded
        new_primary = rs.master_port()
        assert new_primary == rs.replica.port != old_primary, "Sentinel did not promote the replica"
        assert errors, "the kill was not noticed (test did not exercise the failover)"
        assert all(limiter_results), "a rate-limit check refused a call during the failover"
        # every record, with its latest value, is on the promoted primary
        direct = redis_sync.Redis(port=new_primary, username="va", password=PASSWORD)
        lost = [sid for sid, line in expected.items()
                if (raw := direct.get(f"va:session:{sid}")) is None
                or SessionRecord.from_json(raw).last_transcript != line]
        assert not lost, f"{len(lost)} of {len(expected)} session records lost or stale"
        outage = (recovered[0] if recovered else time.monotonic()) - killed_at
        print(f"failover: writes queued for {outage:.2f} s; {len(expected)} records, 0 lost")
        direct.close()
        await store.close()
        await client.aclose()


async def test_acl_user_is_limited_to_the_appliance_prefix(tmp_path):
    pw = tmp_path / "redis-password"
    pw.write_text(PASSWORD)
    with sentinel_set(tmp_path / "redis", users=ACL) as rs:
        client = redis_client(fleet_cfg(rs.addresses, str(pw)), timeout=1.0)
        store = SessionStore(client)
        sid = new_session_id("box-1")
        await store.create(SessionRecord(session_id=sid, sub="s", box="box-1"))  # Lua + va:* keys work
        assert (await store.get(sid)).box == "box-1"
        assert (await RateLimiter(client, LimitsConfig()).check(ANON, "192.0.2.9")).allowed
        assert await client.exists("va:rl:anon:192.0.2.9")  # the limiter really ran in Redis (per-IP bucket)
        assert await client.acl_whoami() in ("va", b"va")
        with pytest.raises(NoPermissionError):
            await client.set("other:key", "x")
        with pytest.raises(NoPermissionError):
            await client.get("other:key")
        await store.close()
        await client.aclose()
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password")
        bad = redis_client(fleet_cfg(rs.addresses, str(wrong)), timeout=1.0)
        with pytest.raises(redis_sync.exceptions.AuthenticationError):
            await bad.ping()
        await bad.aclose()


async def test_tls_to_redis_is_verified_against_the_ca(tmp_path):
    from appliance.emulator.certs import ensure_certs
    from tests.harness.redis import RedisServer, free_port

    certs = ensure_certs(tmp_path / "ca", ["127.0.0.1"])
    other = ensure_certs(tmp_path / "other-ca", ["127.0.0.1"])  # a CA that did not sign the server
    tls_port = free_port()
    srv = RedisServer(tmp_path / "redis", extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(certs.cert_file),
        "--tls-key-file", str(certs.key_file), "--tls-ca-cert-file", str(certs.ca_file),
        "--tls-auth-clients", "no"])
    srv.start()
    try:
        url = f"redis://127.0.0.1:{tls_port}/0"
        good = redis_client(RedisConfig(url=url, tls=True, ca_file=str(certs.ca_file)), timeout=2.0)
        store = SessionStore(good)
        sid = new_session_id("box-1")
        await store.create(SessionRecord(session_id=sid, sub="s", box="box-1"))
        assert (await store.get(sid)).sub == "s"
        await store.close()
        await good.aclose()
        for cfg in (RedisConfig(url=url, tls=True, ca_file=str(other.ca_file)), RedisConfig(url=url)):
            bad = redis_client(cfg, timeout=2.0)
            with pytest.raises(redis_sync.exceptions.ConnectionError):
                await bad.ping()
            await bad.aclose()
    finally:
        srv.stop()
