"""The call's quality summary: what the media worker's counters and the turn timings say.

At teardown the supervisor reads the slot's media counters (``shm.segment.MEDIA_COUNTERS``) and turns
them into ratios and times (``from_counters``); the record adds latency percentiles from the AI
worker's ``turn`` events (``summarize_latencies``): ``response_ms`` = the caller's end of speech
(``activityEnd`` sent) → the model's first audio. A MOS estimate belongs here once the observability
work provides one (it can add keys; readers ignore unknown ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def from_counters(c: Mapping[str, int]) -> dict[str, Any]:
    rx = int(c.get("rx_packets", 0))
    lost = int(c.get("lost", 0))
    frames_up = int(c.get("frames_up", 0))
    concealed = int(c.get("concealed", 0))
    expected = rx + lost
    return {
        "rtp_received_packets": rx,
        "rtp_sent_packets": int(c.get("tx_packets", 0)),
        "rtp_lost_packets": lost,
        "loss_ratio": round(lost / expected, 4) if expected else 0.0,
        "late_packets": int(c.get("late", 0)),
        "jitter_ms": round(int(c.get("jitter_us", 0)) / 1000.0, 2),
        "concealed_frames": concealed,
        "concealment_ratio": round(concealed / frames_up, 4) if frames_up else 0.0,
        "playback_pauses": int(c.get("pauses", 0)),
    }


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def summarize_latencies(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    vals = [float(e["data"]["response_ms"]) for e in events
            if e.get("type") == "turn" and isinstance(e.get("data"), dict)
            and isinstance(e["data"].get("response_ms"), int | float)]
    if not vals:
        return {"response_ms": None}
    return {"response_ms": {"p50": _pct(vals, 0.5), "p90": _pct(vals, 0.9), "max": max(vals),
                            "turns": len(vals)}}
