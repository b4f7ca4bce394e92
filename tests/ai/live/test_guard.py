"""The model circuit breaker on the Live connect path (workers/ai/live/guard.py, session.py +
appliance/breaker.py), against
the real emulator refusing connections (HTTP 503) and a real Redis holding the breaker state.

Asserts what the issue counts: while the model is down the breaker cuts attempts from one per call per
retry to none (a new call degrades without a connection attempt, by the emulator's own count), one
half-open probe after the reset period, and the model back → calls go live and the breaker closes.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from appliance.breaker import Breaker, BreakerSettings
from tests.harness.emulator import start_emulator
from tests.harness.redis import redis_server
from workers.ai.live import guard
from workers.ai.live.session import LiveSession
from workers.ai.live.settings import LiveOptions, LiveUnavailable


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with start_emulator(tmp_path_factory.mktemp("emu")) as e:
        yield e


@pytest.fixture
def redis_url(tmp_path):
    with redis_server(tmp_path) as srv:
        yield srv.url


def session(emu, name: str) -> LiveSession:
    cfg = emu.model_config(max_retries=5, retry_base_seconds=0.05, retry_max_seconds=0.1)
    return LiveSession(cfg, name, LiveOptions("Puck", "en-US", "x"), lambda _ev: None,
                       ssl_context=emu.ssl_context())


async def test_breaker_opens_new_calls_skip_the_model_one_probe_then_closes(emu, redis_url):
    client = aioredis.Redis.from_url(redis_url)
    breaker = Breaker("model-test", BreakerSettings(failure_threshold=3, reset_seconds=1.5,
                                                    success_threshold=2, probe_timeout_seconds=5), client)
    guard.install_breaker(breaker)
    emu.configure(refuse=True)
    try:
        refused0 = emu.health()["refused"]
        first = session(emu, "b1")
        with pytest.raises(LiveUnavailable, match="breaker open"):
            await first.start()  # 3 refused attempts open it; the 4th and 5th are never made
        assert emu.health()["refused"] - refused0 == 3
        assert breaker.state == "open"
        # a second worker process / box sees the same state through Redis: a fresh Breaker object
        other = Breaker("model-test", breaker.settings, client)
        guard.install_breaker(other)
        for i in range(3):  # new calls degrade at once: no connection attempt at all
            with pytest.raises(LiveUnavailable, match="breaker open"):
                await session(emu, f"b-new-{i}").start()
        assert emu.health()["refused"] - refused0 == 3
        # model back; after the reset period exactly one caller probes, the others still degrade
        # (the model answers setup slowly, so the probe is surely still in flight when the other tries)
        emu.configure(refuse=False, setup_delay_ms=800)
        await asyncio.sleep(1.6)
        probe = session(emu, "probe")
        blocked = session(emu, "blocked")
        probing = asyncio.ensure_future(probe.start())
        await asyncio.sleep(0.3)
        with pytest.raises(LiveUnavailable, match="breaker open"):
            await blocked.start()
        await probing
        emu.configure(setup_delay_ms=0)
        assert other.state == "half_open"
        second = session(emu, "probe-2")
        await second.start()  # the second good probe closes it
        assert other.state == "closed"
        third = session(emu, "after")
        await third.start()
        assert third.state == "live"
        for s in (probe, blocked, second, third):
            await s.close()
    finally:
        guard.install_breaker(None)
        emu.configure(refuse=False, setup_delay_ms=0)
        await client.aclose()


async def test_a_1011_close_counts_as_a_failure(emu, redis_url):
    """A live session closed with 1011 (server error) counts toward opening the breaker: with the model
    then refusing, the 1011 + 2 refused reconnects open it and the remaining retries are never made."""
    client = aioredis.Redis.from_url(redis_url)
    breaker = Breaker("model-1011", BreakerSettings(failure_threshold=3, reset_seconds=60), client)
    guard.install_breaker(breaker)
    s = session(emu, "c1011")
    try:
        await s.start()
        sid = s.server_session_id
        assert sid
        emu.configure(refuse=True)
        refused0 = emu.health()["refused"]
        emu.fault(sid, "close", code=1011)
        deadline = asyncio.get_running_loop().time() + 20
        while s.state != "degraded" and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert s.state == "degraded" and breaker.state == "open"
        assert emu.health()["refused"] - refused0 == 2  # not max_retries (5): the breaker stopped them
    finally:
        guard.install_breaker(None)
        emu.configure(refuse=False)
        await s.close()
        await client.aclose()


async def test_worker_failures_open_the_breaker_that_routing_reads(emu, redis_url):
    """The worker's breakers are per model (model_breakers), so routing's peek at the primary's breaker sees
    what the workers recorded and sends new calls to the fallback."""
    from appliance.breaker import model_breaker_name, model_breakers, peek
    from appliance.config import load_config, replace

    cfg = replace(load_config(None, env={}), redis={"url": redis_url},
                  breaker={"failure_threshold": 2, "reset_seconds": 60})
    for_model = model_breakers(cfg)
    assert for_model is not None
    guard.install(for_model)
    emu.configure(refuse=True)
    try:
        live = session(emu, "routing-feed")
        with pytest.raises(LiveUnavailable):
            await live.start()
        await live.close()
    finally:
        emu.configure(refuse=False)
        guard.install(None)
    model = emu.model_config().model
    client = aioredis.Redis.from_url(redis_url)
    supervisor_view = Breaker(model_breaker_name(model), BreakerSettings(reset_seconds=60), client)
    assert await peek(supervisor_view) == "open"
    other = Breaker(model_breaker_name("some-other-model"), BreakerSettings(), client)
    assert await peek(other) == "closed"  # one model's outage does not close the door to the fallback
