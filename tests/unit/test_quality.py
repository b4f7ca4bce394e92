"""appliance/quality.py: the E-model, Janus event parsing, window deltas and the receiver's input checks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from appliance.quality import CallQuality, JanusEventReceiver, emodel, parse_janus_events


def test_emodel_reference_points() -> None:
    # d = 10 ms/2 + 0 + 10 ms = 15 ms -> Id 0.375; R 92.825; MOS from the G.107 mapping
    r, mos = emodel(0.010, 0.0, 0.0)
    assert r == pytest.approx(92.825)
    assert mos == pytest.approx(1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r))
    assert 4.3 < mos <= 4.5
    # above 160 ms one-way the delay term steepens: (d - 120)/10
    r2, _ = emodel(0.300, 0.0, 0.0)
    assert r2 == pytest.approx(93.2 - (160 - 120) / 10)
    # 2.5 R points per % loss
    assert emodel(0.010, 0.0, 0.02)[0] == pytest.approx(r - 5.0)
    assert emodel(0.0, 0.0, 1.0)[1] == 1.0  # floor
    assert emodel(0.01, 0.0, 0.0)[1] > emodel(0.01, 0.03, 0.03)[1] > emodel(0.01, 0.08, 0.1)[1]


def _event(hid: int, **ev: object) -> dict[str, object]:
    return {"type": 32, "handle_id": hid, "session_id": 1, "event": {"media": "audio", **ev}}


def test_parse_keeps_only_audio_statistics() -> None:
    stats = {"rtt": 40, "lost": 3, "lost-by-remote": 5, "jitter-local": 12, "jitter-remote": 7,
             "packets-received": 100, "packets-sent": 200}
    events = [_event(7, **stats), {"type": 32, "handle_id": 7, "event": {"media": "audio", "receiving": 1}},
              {"type": 1, "handle_id": 7}, _event(8, media="video", **stats), "junk", {"type": 32}]
    out = parse_janus_events(events, now=5.0)
    assert len(out) == 1
    s = out[0]
    assert (s.handle_id, s.rtt_s, s.lost_in, s.lost_out) == (7, 0.04, 3, 5)
    assert (s.jitter_in_s, s.jitter_out_s, s.packets_in, s.packets_out) == (0.012, 0.007, 100, 200)


def test_window_deltas_not_totals() -> None:
    cq = CallQuality()
    base = dict(rtt=20, lost=50, **{"lost-by-remote": 0, "jitter-local": 5, "jitter-remote": 5,
                                    "packets-received": 950, "packets-sent": 1000})
    first = parse_janus_events(_event(1, **base), now=0.0)[0]
    assert cq.update(first, None, now=0.0).loss_up_ratio == pytest.approx(0.05)  # first sample: totals
    nxt = parse_janus_events(_event(1, **{**base, "lost": 50, "packets-received": 1200,
                                          "lost-by-remote": 25, "packets-sent": 1250}), now=5.0)[0]
    q = cq.update(nxt, None, now=5.0)
    assert q.loss_up_ratio == 0.0 and q.loss_down_ratio == pytest.approx(0.1)
    # the media worker's counters count too (the larger uplink loss wins)
    cq.update(None, {"lost": 0, "rx_packets": 100, "jitter_us": 1000}, now=6.0)
    q2 = cq.update(None, {"lost": 10, "rx_packets": 190, "jitter_us": 4000}, now=7.0)
    assert q2.loss_up_ratio == pytest.approx(0.1) and q2.jitter_up_seconds == pytest.approx(0.004)
    assert cq.update(None, None, now=8.0) is None  # nothing new: no sample


def test_receiver_rejects_bad_bodies_and_keeps_latest() -> None:
    rx = JanusEventReceiver()
    port = rx.serve("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/janus-events"
    try:
        body = json.dumps([_event(3, rtt=1, lost=0, **{"packets-received": 10})]).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as r:
            assert r.status == 200
        assert rx.latest(3) is not None and rx.latest(3).packets_in == 10
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{nope"), timeout=5)
        assert err.value.code == 400
        assert rx.rejected == 1
        rx.forget([])
        assert rx.latest(3) is None
    finally:
        rx.stop()


def test_summary_of_a_call() -> None:
    from appliance.quality import QualitySample, QualitySummary

    s = QualitySummary()
    assert s.public() == {"samples": 0}
    s.add(QualitySample(4.4, 92.0, 0.0, 0.01, 0.002, 0.004, 0.02, 0.0))
    s.add(QualitySample(3.6, 70.0, 0.05, 0.0, 0.03, 0.001, 0.05, 5.0))
    p = s.public()
    assert p["samples"] == 2 and p["mos_mean"] == pytest.approx(4.0) and p["mos_min"] == 3.6
    assert p["loss_up_max_ratio"] == 0.05 and p["loss_down_max_ratio"] == 0.01
    assert p["jitter_max_seconds"] == 0.03 and p["rtt_max_seconds"] == 0.05
