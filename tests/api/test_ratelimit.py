"""GCRA rate limits against a real redis-server; fail-open when Redis is down."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from appliance.config import LimitsConfig, RedisConfig
from appliance.ratelimit import ANON, CREATE, SIGNAL, RateLimiter, client_key
from appliance.state import redis_client
from tests.harness.redis import redis_server


async def test_burst_then_refused_with_retry_after(aredis, prefix):
    rl = RateLimiter(aredis, LimitsConfig(session_creates_per_minute=10, signalling_per_minute=60), prefix)
    results = [await rl.check(CREATE, "192.0.2.7") for _ in range(12)]
    assert [r.allowed for r in results] == [True] * 10 + [False, False]
    # one new token every 6 s: the refusal says to wait (0, 6] s
    assert 0 < results[10].retry_after <= 6.0
    assert results[10].retry_after_header in {str(n) for n in range(1, 7)}
    # other clients and the other bucket are independent
    assert (await rl.check(CREATE, "192.0.2.8")).allowed
    assert all([(await rl.check(SIGNAL, "192.0.2.7")).allowed for _ in range(60)])
    assert not (await rl.check(SIGNAL, "192.0.2.7")).allowed


async def test_refusals_do_not_consume_quota(aredis, prefix):
    rl = RateLimiter(aredis, LimitsConfig(session_creates_per_minute=2, signalling_per_minute=60), prefix)
    assert (await rl.check(CREATE, "192.0.2.9")).allowed
    assert (await rl.check(CREATE, "192.0.2.9")).allowed
    first = await rl.check(CREATE, "192.0.2.9")
    for _ in range(20):
        later = await rl.check(CREATE, "192.0.2.9")
    # hammering while refused does not push the next allowed time further out
    assert not later.allowed and later.retry_after <= first.retry_after


async def test_ipv6_limited_per_64(aredis, prefix):
    rl = RateLimiter(aredis, LimitsConfig(unauthenticated_per_minute=3), prefix)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
        assert (await rl.check(ANON, host)).allowed
    assert not (await rl.check(ANON, "2001:db8:1:2::77")).allowed
    assert (await rl.check(ANON, "2001:db8:1:3::1")).allowed
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"


async def test_redis_down_fails_open_and_counts(tmp_path):
    with redis_server(tmp_path) as srv:
        client = redis_client(RedisConfig(url=srv.url), timeout=0.3)
        rl = RateLimiter(client, LimitsConfig(session_creates_per_minute=1, signalling_per_minute=1))
        assert (await rl.check(CREATE, "192.0.2.1")).allowed
        assert not (await rl.check(CREATE, "192.0.2.1")).allowed
        srv.stop()
        errors = REGISTRY.get_sample_value("va_ratelimit_redis_errors_total") or 0.0
        opened = REGISTRY.get_sample_value("va_ratelimit_fail_open_total") or 0.0
        assert (await rl.check(CREATE, "192.0.2.1")).allowed
        assert REGISTRY.get_sample_value("va_ratelimit_redis_errors_total") == pytest.approx(errors + 1)
        # for a moment after a failure Redis is not asked at all (no timeout per request)
        for _ in range(5):
            assert (await rl.check(CREATE, "192.0.2.1")).allowed
        assert REGISTRY.get_sample_value("va_ratelimit_redis_errors_total") == pytest.approx(errors + 1)
        assert REGISTRY.get_sample_value("va_ratelimit_fail_open_total") == pytest.approx(opened + 6)
        srv.start()
        rl._skip_until = 0.0  # (instead of waiting open_seconds)
        # back in business: limits apply again (the restarted, empty Redis allows one, then refuses)
        assert (await rl.check(CREATE, "192.0.2.1")).allowed
        assert not (await rl.check(CREATE, "192.0.2.1")).allowed
        await client.aclose()
