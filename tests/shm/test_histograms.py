"""Shard latency histograms (shm/histograms.py): bucket placement, cross-process visibility, quantiles,
slot answer words, and the observation's cost (it runs inside worker ticks)."""

from __future__ import annotations

import time

import pytest

from shm import histograms as H
from shm.segment import ShardSegment


def test_observe_places_values_in_le_buckets(seg: ShardSegment) -> None:
    h = seg.histograms("ai")
    h.observe("turn_end", 0.005)  # exactly on a bound: le="0.005"
    h.observe("turn_end", 0.0051)
    h.observe("turn_end", 99.0)  # +Inf
    h.observe("turn_end", -1.0)  # clamped to 0 → first bucket
    buckets, total = h.snapshot("turn_end")
    assert len(buckets) == len(H.BOUNDS) + 1
    assert buckets[0] == 2 and buckets[1] == 1 and buckets[-1] == 1 and sum(buckets) == 4
    assert total == pytest.approx(0.005 + 0.0051 + 99.0, abs=1e-6)
    assert sum(h.snapshot("barge_in")[0]) == 0  # other histograms untouched
    assert sum(seg.histograms("media").snapshot("e2e")[0]) == 0
    with pytest.raises(KeyError):
        h.observe("playout", 0.1)  # the media worker's, not the AI worker's


def test_another_mapping_sees_the_counts(seg: ShardSegment) -> None:
    seg.histograms("media").observe("playout", 0.012)
    other = ShardSegment.attach(seg.name)
    try:
        assert other.histograms("media").snapshot("playout")[0][H.BOUNDS.index(0.015)] == 1
    finally:
        other.close()


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [0] * H.NB
    i = H.BOUNDS.index(0.05)  # (0.04, 0.05]
    buckets[i] = 100
    assert H.quantile(0.5, buckets) == pytest.approx(0.045)
    assert H.quantile(0.99, buckets) == pytest.approx(0.0499)
    assert H.quantile(0.5, [0] * H.NB) is None
    buckets[-1] = 1000
    assert H.quantile(0.99, buckets) == H.BOUNDS[-1]
    before = {"e2e": ([0] * H.NB, 0.0)}
    after = {"e2e": (buckets, 1.0)}
    assert H.diff(after, before)["e2e"][0] == buckets


ACT = dict(local_rtp_port=40000, remote_rtp_ip="127.0.0.1", remote_rtp_port=5000, payload_type=111,
           channels=1, dtmf_payload_type=-1, mode="direct")


def test_answer_words_reset_on_activate(seg: ShardSegment) -> None:
    slot = seg.slot(1)
    slot.activate(session_id="b.x", **ACT)
    slot.set_answer(111, 222)
    assert slot.answer() == (111, 222)
    slot.begin_close()
    slot.free()
    slot.activate(session_id="b.y", **ACT)
    assert slot.answer() == (0, 0)


def test_observe_cost(seg: ShardSegment) -> None:
    """Per-observation cost (a few per turn, never per frame). Measured 0.37-0.66 µs on an idle-ish
    2-vCPU VM; bound 5 µs on the best of 7 rounds (a shared machine's load inflates single rounds)."""
    h = seg.histograms("ai")
    n, best = 10_000, float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            h.observe("turn_end", 0.033)
        best = min(best, (time.perf_counter() - t0) / n)
    print(f"observe: {best * 1e6:.2f} µs")
    assert best < 5e-6
