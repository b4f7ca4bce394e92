"""Call quality of the caller's real network leg: Janus's RTCP statistics + the media worker's counters
→ every 5 s per call an E-model MOS estimate, exported as per-shard histograms (no per-call label) and
shown in ``GET /v1/sessions/{id}`` (``details.quality``).

Where the numbers come from (docs/architecture.md "Call quality"):
* Janus's sample event handler (``janus.eventhandler.sampleevh``, rendered by appliance/janus_conf.py and
  the janus Ansible role) POSTs its ``media`` events (type 32, every ``events.stats_period`` = 5 s per
  handle) to :class:`JanusEventReceiver` on loopback: ``rtt`` (ms, from RTCP SR/RR with the browser),
  ``lost`` (caller → Janus, cumulative, Janus's own sequence accounting), ``lost-by-remote`` (Janus →
  caller, cumulative, from the browser's receiver reports), ``jitter-local`` / ``jitter-remote`` (ms,
  RFC 3550 interarrival jitter of the two directions), ``packets-received`` / ``packets-sent``.
* the media worker's slot counters (``lost``, ``rx_packets``, ``jitter_us``): the caller's packets as
  they reach the worker (NoSIP passes them unchanged, so loss on the caller's leg shows up there too).

Per window the uplink loss ratio is the larger of Janus's and the worker's, the downlink loss ratio is
the browser's report; jitter is the larger of the two directions' latest values; the MOS uses the worse
direction. :func:`emodel` is the simplified ITU-T G.107 E-model as LiveKit and Twilio publish it.

A threaded ``http.server`` is enough for a few POSTs per second on loopback and keeps this off the
supervisor's event loop (the samples are handed over under a lock).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

PERIOD_SECONDS = 5.0
MAX_BODY_BYTES = 1 << 20
JANUS_MEDIA_EVENT = 32  # Janus event type of media events (stats are the ones carrying "rtt"/"lost")
STALE_SECONDS = 15.0  # Janus stats older than this are not used (handle gone quiet)

# E-model constants (simplified G.107; see docs/architecture.md "Call quality")
R0 = 93.2  # basic signal-to-noise ratio with the default G.107 parameters
CODEC_DELAY_S = 0.010  # codec/packetisation delay added to the network delay (Opus 20 ms frames: look-ahead)
JITTER_WEIGHT = 2.0  # a jitter buffer holds ~2x the jitter: it counts as delay
LOSS_WEIGHT = 2.5  # R points per % of packet loss (Ie,eff slope for a PLC-capable codec)


def emodel(rtt_s: float, jitter_s: float, loss_ratio: float) -> tuple[float, float]:
    """(R factor, MOS) of the simplified E-model: one-way delay d = rtt/2 + 2·jitter + 10 ms;
    Id = d/40 ms below 160 ms, (d - 120 ms)/10 ms above; Ie = 2.5 · loss %; R = 93.2 - Id - Ie;
    MOS = 1 + 0.035 R + 7e-6 R (R - 60)(100 - R), clamped to 1..4.5."""
    d_ms = 1000.0 * (max(rtt_s, 0.0) / 2 + JITTER_WEIGHT * max(jitter_s, 0.0) + CODEC_DELAY_S)
    i_d = d_ms / 40.0 if d_ms < 160.0 else (d_ms - 120.0) / 10.0
    r = R0 - i_d - LOSS_WEIGHT * 100.0 * min(max(loss_ratio, 0.0), 1.0)
    r = min(max(r, 0.0), 100.0)
    mos = 1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r)
    return r, min(max(mos, 1.0), 4.5)


@dataclass(frozen=True)
class JanusStats:
    """One Janus audio ``media`` statistics event (cumulative counters, latest gauges)."""

    handle_id: int
    at: float  # time.monotonic() when it arrived
    rtt_s: float
    lost_in: int
    lost_out: int
    jitter_in_s: float
    jitter_out_s: float
    packets_in: int
    packets_out: int


def parse_janus_events(payload: Any, now: float) -> list[JanusStats]:
    """The audio statistics events of a sampleevh POST (one object or a grouped array); others ignored."""
    items = payload if isinstance(payload, list) else [payload]
    out = []
    for item in items:
        if not isinstance(item, dict) or item.get("type") != JANUS_MEDIA_EVENT:
            continue
        ev, hid = item.get("event"), item.get("handle_id")
        if not isinstance(ev, dict) or not isinstance(hid, int) or ev.get("media", "audio") != "audio":
            continue
        if "lost" not in ev or "packets-received" not in ev:
            continue  # a "receiving"/"slow_link" media event, not statistics
        try:
            out.append(JanusStats(
                handle_id=hid, at=now, rtt_s=float(ev.get("rtt", 0) or 0) / 1000.0,
                lost_in=int(ev.get("lost", 0) or 0), lost_out=int(ev.get("lost-by-remote", 0) or 0),
                jitter_in_s=float(ev.get("jitter-local", 0) or 0) / 1000.0,
                jitter_out_s=float(ev.get("jitter-remote", 0) or 0) / 1000.0,
                packets_in=int(ev.get("packets-received", 0) or 0),
                packets_out=int(ev.get("packets-sent", 0) or 0)))
        except (TypeError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class QualitySample:
    """One call's quality over the last window (what the API shows and the histograms get)."""

    mos: float
    r_factor: float
    loss_up_ratio: float
    loss_down_ratio: float
    jitter_up_seconds: float
    jitter_down_seconds: float
    rtt_seconds: float
    at: float  # unix time

    def public(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass
class QualitySummary:
    """A whole call's quality, from its samples (for the call record: ``summary_of(session)``)."""

    samples: int = 0
    mos_sum: float = 0.0
    mos_min: float = 5.0
    loss_up_max: float = 0.0
    loss_down_max: float = 0.0
    jitter_max_seconds: float = 0.0
    rtt_max_seconds: float = 0.0

    def add(self, q: QualitySample) -> None:
        self.samples += 1
        self.mos_sum += q.mos
        self.mos_min = min(self.mos_min, q.mos)
        self.loss_up_max = max(self.loss_up_max, q.loss_up_ratio)
        self.loss_down_max = max(self.loss_down_max, q.loss_down_ratio)
        self.jitter_max_seconds = max(self.jitter_max_seconds, q.jitter_up_seconds, q.jitter_down_seconds)
        self.rtt_max_seconds = max(self.rtt_max_seconds, q.rtt_seconds)

    def public(self) -> dict[str, float | int]:
        if not self.samples:
            return {"samples": 0}
        return {"samples": self.samples, "mos_mean": round(self.mos_sum / self.samples, 3),
                "mos_min": round(self.mos_min, 3), "loss_up_max_ratio": round(self.loss_up_max, 4),
                "loss_down_max_ratio": round(self.loss_down_max, 4),
                "jitter_max_seconds": round(self.jitter_max_seconds, 4),
                "rtt_max_seconds": round(self.rtt_max_seconds, 4)}


def _ratio(lost: int, got: int) -> float:
    total = lost + got
    return max(0.0, lost / total) if total > 0 and lost > 0 else 0.0


class CallQuality:
    """Window deltas of one call's cumulative counters (Janus and the media worker)."""

    def __init__(self) -> None:
        self._janus: JanusStats | None = None
        self._worker: tuple[int, int] | None = None  # (lost, rx_packets)

    def update(self, janus: JanusStats | None, worker: Mapping[str, int] | None,
               now: float) -> QualitySample | None:
        """A sample from what changed since the previous call; None before there is anything to say."""
        loss_up = loss_down = jit_up = jit_down = rtt = 0.0
        have = False
        if janus is not None and now - janus.at < STALE_SECONDS:
            prev = self._janus
            if prev is not None and janus.at > prev.at and janus.packets_in >= prev.packets_in:
                loss_up = _ratio(janus.lost_in - prev.lost_in, janus.packets_in - prev.packets_in)
                loss_down = min(1.0, max(0.0, (janus.lost_out - prev.lost_out)
                                         / max(janus.packets_out - prev.packets_out, 1)))
                have = True
            elif prev is None:
                loss_up = _ratio(janus.lost_in, janus.packets_in)
                loss_down = min(1.0, janus.lost_out / janus.packets_out) if janus.packets_out else 0.0
                have = True
            if have or prev is None or janus.at > prev.at:
                self._janus = janus
            jit_up, jit_down, rtt = janus.jitter_in_s, janus.jitter_out_s, janus.rtt_s
        if worker is not None:
            cur = (int(worker.get("lost", 0)), int(worker.get("rx_packets", 0)))
            prev_w = self._worker
            if prev_w is not None and cur[1] > prev_w[1] and cur[0] >= prev_w[0]:
                loss_up = max(loss_up, _ratio(cur[0] - prev_w[0], cur[1] - prev_w[1]))
                jit_up = max(jit_up, int(worker.get("jitter_us", 0)) / 1e6)
                have = True
            self._worker = cur
        if not have:
            return None
        r, mos = emodel(rtt, max(jit_up, jit_down), max(loss_up, loss_down))
        return QualitySample(mos, r, loss_up, loss_down, jit_up, jit_down, rtt, time.time())


class JanusEventReceiver:
    """Loopback HTTP endpoint for Janus's sampleevh POSTs; keeps the latest stats per Janus handle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[int, JanusStats] = {}
        self.received = 0
        self.rejected = 0
        self._server: ThreadingHTTPServer | None = None

    def ingest(self, payload: Any) -> int:
        stats = parse_janus_events(payload, time.monotonic())
        with self._lock:
            for s in stats:
                self._latest[s.handle_id] = s
            self.received += len(stats)
        return len(stats)

    def latest(self, handle_id: int) -> JanusStats | None:
        with self._lock:
            return self._latest.get(handle_id)

    def forget(self, keep: Iterable[int]) -> None:
        """Drop the stats of handles that are gone."""
        keep_set = set(keep)
        with self._lock:
            for hid in [h for h in self._latest if h not in keep_set]:
                del self._latest[hid]

    def serve(self, host: str, port: int) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY_BYTES:
                    receiver.rejected += 1
                    self.send_error(413 if length else 411, "body must be 1 B .. 1 MiB of JSON")
                    return
                try:
                    payload = json.loads(self.rfile.read(length))
                except ValueError:
                    receiver.rejected += 1
                    self.send_error(400, "body is not JSON")
                    return
                receiver.ingest(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="janus-events", daemon=True).start()
        bound = int(self._server.server_address[1])
        log.info("janus event receiver listening", extra={"host": host, "port": bound})
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class CallRef:
    """What the sampler needs of a live call (kept small so sessions.py stays the owner of calls)."""

    session_id: str
    shard: int
    handle_id: int | None
    counters: Callable[[], Mapping[str, int] | None]  # the media worker's slot counters, None if gone
    publish: Callable[[QualitySample], None]  # store the sample with the call (API details, records)


class QualitySampler:
    """Every ``PERIOD_SECONDS``: one :class:`QualitySample` per call → histograms and the call."""

    def __init__(self, receiver: JanusEventReceiver, observe: Callable[[int, QualitySample], None]) -> None:
        self.receiver = receiver
        self.observe = observe
        self._calls: dict[str, CallQuality] = {}

    def sample(self, calls: Iterable[CallRef]) -> int:
        now, n, seen = time.monotonic(), 0, set()
        for ref in calls:
            seen.add(ref.session_id)
            state = self._calls.setdefault(ref.session_id, CallQuality())
            janus = self.receiver.latest(ref.handle_id) if ref.handle_id is not None else None
            try:
                counters = ref.counters()
            except Exception:
                counters = None
            q = state.update(janus, counters, now)
            if q is None:
                continue
            self.observe(ref.shard, q)
            ref.publish(q)
            n += 1
        for sid in [s for s in self._calls if s not in seen]:
            del self._calls[sid]
        return n

    async def run(self, calls: Callable[[], list[CallRef]], period: float = PERIOD_SECONDS) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                refs = calls()
                self.sample(refs)
                self.receiver.forget(r.handle_id for r in refs if r.handle_id is not None)
            except Exception:
                log.exception("call quality sampling failed")
