"""`bench media`'s downlink pacing figures: the arithmetic on known arrivals, and a short real scale run."""

from __future__ import annotations

import pytest

from bench.media_bench import _pacing, _scale

TICK = 20_000_000


def test_pacing_and_tick_spread_of_known_arrivals() -> None:
    # 3 calls, 50 ticks; call k's packet leaves k x 0.3 ms after the deadline; call 2 is 4 ms late once
    arrivals = []
    for t in range(50):
        for k in range(3):
            late = 4_000_000 if (k == 2 and t == 30) else 0
            arrivals.append((k, (1000 * k + t * 960) % (1 << 32), 5 * TICK + t * TICK + k * 300_000 + late))
    r = _pacing(arrivals, 3, skip_ns=0)
    assert r["tick_spread_p50_ms"] == pytest.approx(0.6, abs=1e-6)  # first to last call of a tick
    assert r["tick_spread_p99_ms"] > 0.6  # the late tick
    assert r["pacing_p50_ms"] == pytest.approx(0.0, abs=1e-3)  # each stream against its own earliest
    assert r["pacing_max_ms"] == pytest.approx(4.0, abs=1e-3)


def test_timestamps_wrap_and_warmup_is_skipped() -> None:
    start = (1 << 32) - 960 * 3  # the RTP timestamp wraps after 3 packets
    arrivals = [(0, (start + t * 960) % (1 << 32), t * TICK + (50_000_000 if t < 5 else 0))
                for t in range(40)]
    assert _pacing(arrivals, 1, skip_ns=0)["pacing_max_ms"] == pytest.approx(50.0, abs=1e-3)
    assert _pacing(arrivals, 1, skip_ns=5 * TICK + 1)["pacing_max_ms"] == pytest.approx(0.0, abs=1e-3)
    assert _pacing([], 1, skip_ns=0) == {}


def test_scale_run_reports_pacing_from_the_real_worker() -> None:
    r = _scale(4, 1.5)
    assert r["packets_received_per_call_second"] > 40
    # 4 calls' packets are sent back to back at the deadline: far less than a tick apart
    assert 0 <= r["tick_spread_p50_ms"] < 5.0
    assert 0 <= r["pacing_p50_ms"] <= r["pacing_p99_ms"] <= r["pacing_max_ms"]
