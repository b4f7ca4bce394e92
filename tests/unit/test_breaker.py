"""The model circuit breaker: the seed's rules, one probe per reset period across processes, Redis or not."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from appliance.breaker import Breaker, BreakerSettings, Decision
from tests.harness.redis import redis_server

S = BreakerSettings(failure_threshold=3, reset_seconds=30, success_threshold=2, probe_timeout_seconds=15)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["redis", "local"])
def make(request, tmp_path):
    if request.param == "local":
        yield lambda clock: Breaker("m", S, None, clock=clock)
        return
    with redis_server(tmp_path) as srv:
        client = aioredis.from_url(srv.url)
        yield lambda clock: Breaker("m", S, client, clock=clock)


async def fail(b: Breaker, n: int = 1) -> None:
    for _ in range(n):
        await b.record(False)


async def test_consecutive_failures_open_and_a_success_resets_the_count(make) -> None:
    clock = Clock()
    b = make(clock)
    await fail(b, 2)
    await b.record(True)
    await fail(b, 2)
    assert (await b.allow())[0] is Decision.ALLOW
    await fail(b)
    assert b.state == "open"
    assert (await b.allow())[0] is Decision.DENY


async def test_one_probe_per_reset_period_among_many_workers(make) -> None:
    clock = Clock()
    workers = [make(clock) for _ in range(6)]  # six AI workers (on one Redis: the fleet)
    shared = workers[0].redis is not None
    for w in workers if not shared else workers[:1]:  # local breakers each see their own failures
        await fail(w, 3)
    clock.t += 29
    assert [(await w.allow())[0] for w in workers] == [Decision.DENY] * 6
    clock.t += 1
    decisions = [await w.allow() for w in workers]
    probes = [(w, pid) for w, (d, pid) in zip(workers, decisions, strict=True) if d is Decision.PROBE]
    if shared:
        assert len(probes) == 1  # shared: one probe fleet-wide
    else:
        assert len(probes) == 6  # local breakers are per process: each makes its own probe
    w, pid = probes[0]
    await w.record(True, pid)
    assert w.state == "half_open"  # two successes are needed
    d, pid2 = await w.allow()
    assert d is Decision.PROBE
    await w.record(True, pid2)
    assert w.state == "closed"
    assert (await w.allow())[0] is Decision.ALLOW


async def test_failed_probe_reopens_for_a_full_period(make) -> None:
    clock = Clock()
    b = make(clock)
    await fail(b, 3)
    clock.t += 30
    d, pid = await b.allow()
    assert d is Decision.PROBE
    await b.record(False, pid)
    assert b.state == "open"
    clock.t += 29
    assert (await b.allow())[0] is Decision.DENY
    clock.t += 1
    assert (await b.allow())[0] is Decision.PROBE


async def test_a_probe_that_never_reports_expires(make) -> None:
    clock = Clock()
    b = make(clock)
    await fail(b, 3)
    clock.t += 30
    assert (await b.allow())[0] is Decision.PROBE  # its worker died before reporting
    assert (await b.allow())[0] is Decision.DENY
    clock.t += 15
    assert (await b.allow())[0] is Decision.PROBE


async def test_redis_down_falls_back_to_a_local_breaker(tmp_path) -> None:
    clock = Clock()
    with redis_server(tmp_path) as srv:
        client = aioredis.from_url(srv.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        b = Breaker("m", S, client, clock=clock)
        await fail(b, 1)
        srv.stop()
        await fail(b, 3)  # never raises
        assert b.state == "open"
        assert (await b.allow())[0] is Decision.DENY


async def test_breaker_cuts_attempts_in_a_60_s_outage(tmp_path) -> None:
    """40 live calls retrying every 10 s through a 60 s outage: 240 attempts without the breaker; with it,
    the 3 that open it plus one probe per reset period (30 s)."""
    clock = Clock()
    with redis_server(tmp_path) as srv:
        client = aioredis.from_url(srv.url)
        workers = [Breaker("m", S, client, clock=clock) for _ in range(4)]  # 4 AI workers, 10 calls each
        attempts = 0
        for _step in range(6):  # t = 0, 10, ..., 50 s: every call retries once per step
            for i in range(40):
                w = workers[i % 4]
                d, pid = await w.allow()
                if d is Decision.DENY:
                    continue
                attempts += 1
                await w.record(False, pid)  # the model is down
            clock.t += 10
        await asyncio.sleep(0)
    assert attempts == 3 + 1  # opened at t=0; t=30 one probe (fails, reopens); t=60 is past the window
