"""Model routing at session creation (appliance/routing.py through ``Sessions._route``): the weighted
split with a seeded RNG, the primary's breaker state read from a real redis-server (open → fallback,
probe in flight → fallback, half-open with no probe → primary, closed → primary), resumes keeping their
model, and a tenant's ``max_sessions``."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from appliance.api import ClientInfo, InvalidRequest
from appliance.breaker import Breaker, BreakerSettings, model_breaker_name, peek
from appliance.config import load_config, replace
from appliance.metrics import Metrics
from appliance.placement import Placed
from appliance.sessions import LiveSession, Sessions
from appliance.state import SessionRecord
from tests.harness.redis import redis_server

PRIMARY = "gemini-2.5-flash-native-audio-preview-09-2025"
FLASH = "gemini-3.1-flash-live-preview"
TENANTS = {"split": {"model": PRIMARY, "fallback_model": FLASH, "fallback_weight": 0.8},
           "safe": {"model": PRIMARY, "fallback_model": FLASH, "max_sessions": 2},
           "solo": {"model": PRIMARY}}


@pytest.fixture
async def redis(tmp_path):
    with redis_server(tmp_path) as srv:
        client = aioredis.from_url(srv.url)
        yield client
        await client.aclose()


def sessions(redis, seed: int = 7) -> Sessions:
    cfg = replace(load_config(None, env={}), tenants=TENANTS)
    # placement/segments/Janus are not reached by routing; the store only gets its on_lost hook set
    return Sessions(cfg, placement=None, segments={}, store=SimpleNamespace(), metrics=Metrics(),
                    box="b1", redis=redis, rng=random.Random(seed))


def who(tenant: str) -> ClientInfo:
    return ClientInfo(sub="alice", ip="192.0.2.1", tenant=tenant)


async def routes(s: Sessions, tenant: str, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        _, model, reason = await s._route(who(tenant), None)
        out.append((model, reason))
    return out


async def test_weighted_split_is_seeded_and_near_the_weight(redis) -> None:
    a = await routes(sessions(redis, seed=7), "split", 1000)
    assert a == await routes(sessions(redis, seed=7), "split", 1000)  # same seed, same choices
    assert a != await routes(sessions(redis, seed=8), "split", 1000)
    flash = [m for m, _ in a].count(FLASH)
    assert 760 <= flash <= 840, flash  # 80 % +- 4 standard deviations (12.6 at n=1000)
    assert {r for m, r in a if m == FLASH} == {"weighted"}
    assert {r for m, r in a if m == PRIMARY} == {"primary"}
    # the default tenant (no fallback configured) and a tenant without fallback: always the primary
    assert {m for m, _ in await routes(sessions(redis), "", 50)} == {load_config(None, env={}).model.model}
    assert set(await routes(sessions(redis), "solo", 50)) == {(PRIMARY, "primary")}


async def test_open_breaker_of_the_primary_sends_new_calls_to_the_fallback(redis) -> None:
    s = sessions(redis)
    assert set(await routes(s, "safe", 5)) == {(PRIMARY, "primary")}
    # the AI workers' breaker for the primary (same Redis key) sees three failures: open
    t = [time.time()]
    worker = Breaker(model_breaker_name(PRIMARY), BreakerSettings(), redis, clock=lambda: t[0])
    for _ in range(3):
        await worker.record(False)
    assert worker.state == "open"
    assert set(await routes(s, "safe", 5)) == {(FLASH, "breaker_open")}
    assert set(await routes(s, "solo", 3)) == {(PRIMARY, "primary")}  # no fallback: nowhere else to go
    assert await redis.hget(f"va:breaker:{model_breaker_name(PRIMARY)}", "state") == b"open"  # untouched
    # reset period over, a worker holds the probe lease: still the fallback
    t[0] += 31
    s._breakers[PRIMARY].clock = lambda: t[0]
    assert await peek(s._breakers[PRIMARY]) == "half_open"  # no probe yet: the next call may be it
    decision, probe = await worker.allow()
    assert decision.value == "probe"
    assert set(await routes(s, "safe", 3)) == {(FLASH, "breaker_open")}
    await worker.record(True, probe)
    decision, probe = await worker.allow()
    await worker.record(True, probe)
    assert worker.state == "closed"
    assert set(await routes(s, "safe", 5)) == {(PRIMARY, "primary")}


async def test_breaker_unreachable_routes_to_the_primary(tmp_path) -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    assert set(await routes(sessions(dead), "safe", 3)) == {(PRIMARY, "primary")}
    await dead.aclose()


async def test_resume_keeps_its_model_and_tenant_limits_hold(redis) -> None:
    s = sessions(redis)
    rec = SessionRecord(session_id="b1.x", sub="alice", tenant="safe", model=FLASH)
    assert (await s._route(who("safe"), rec))[1:] == (FLASH, "resumed")
    with pytest.raises(InvalidRequest, match="another tenant"):
        await s._route(who("split"), rec)
    t, model, _ = await s._route(who(""), rec)  # a session token (no claim): the record's tenant holds
    assert (t.name, model) == ("safe", FLASH)
    placed = Placed(shard=0, slot=0, rtp_port=40000)
    for i in range(2):
        s.live[f"b1.{i}"] = LiveSession(f"b1.{i}", "alice", "direct", placed, 1, 0.0, 0.0, tenant="safe")
    with pytest.raises(InvalidRequest) as exc:
        await s._route(who("safe"), None)
    assert exc.value.status == 429 and exc.value.code == "tenant_limit"
    assert "maximum of 2 concurrent calls" in exc.value.detail
    await s._route(who("split"), None)  # another tenant is not limited by it
