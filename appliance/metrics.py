"""Prometheus metrics of the supervisor (control plane), served on a loopback-only port.

Base units (seconds, bytes), ``va_`` prefix, and no per-session labels: labels are bounded sets
(``role`` = media/ai, ``shard`` = a small integer, ``result``/``reason`` = fixed words), so the series
count never grows with traffic. Shared-memory counters that workers maintain (ring drops, frames) are
read at scrape time by a custom collector from a callback, so the hot path never touches Prometheus.

prometheus-client is the reference implementation; its ``start_http_server`` runs a small threaded
WSGI server on its own registry, which keeps /metrics off the public API port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Shard counters summed over a shard's slots: name -> help. Provided by a callback returning
# {shard: {name: value}} of monotonically growing totals (see CounterAccumulator).
SHM_COUNTERS: dict[str, str] = {
    "uplink_dropped_frames": "Uplink ring writes dropped because the ring was full (media -> AI)",
    "downlink_dropped_frames": "Downlink ring writes dropped because the ring was full (AI -> media)",
    "rtp_received_packets": "RTP packets received by media workers",
    "rtp_sent_packets": "RTP packets sent by media workers",
    "concealed_frames": "Audio frames concealed (PLC/FEC) by media workers",
    "model_reconnects": "Live API reconnections by AI workers",
    "model_tool_calls": "Function calls made by the model (each answered unless the model cancels it)",
    "model_tool_errors": "Function calls answered with an error result (timeout, HTTP error, bad JSON, ...)",
    "dtmf_digits_sent": "Keypad digits sent to the model as text",
    "playback_pauses": "Model playback paused by media workers on a loud caller frame (provisional barge-in)",
    "playback_pauses_confirmed": "Playback pauses the AI worker confirmed as speech (model audio flushed)",
    "playback_pauses_released": "Playback pauses released without speech (false alarms: playback resumed)",
    "playback_pause_timeouts": "Playback pauses no AI worker settled in time (the media worker resumed)",
}


class CounterAccumulator:
    """Turns per-slot counters that restart at 0 (a slot is reset when reused) into monotonic totals.

    ``observe(shard, slot, name, value)`` adds the growth since the last observation of that slot; a
    smaller value means the slot was reset, so all of it is new.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[int, int, str], int] = {}
        self.totals: dict[int, dict[str, float]] = {}

    def observe(self, shard: int, slot: int, name: str, value: int) -> None:
        key = (shard, slot, name)
        last = self._last.get(key, 0)
        delta = value - last if value >= last else value
        self._last[key] = value
        bucket = self.totals.setdefault(shard, {})
        bucket[name] = bucket.get(name, 0.0) + delta


class _DefaultRegistryProxy(Collector):
    """Re-exports the process-wide default registry (modules such as api/state register there)."""

    def collect(self) -> Iterable[Any]:
        from prometheus_client import REGISTRY

        return list(REGISTRY.collect())


class _ShmCollector(Collector):
    def __init__(self, source: Callable[[], Mapping[int, Mapping[str, float]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Any]:
        try:
            per_shard = self._source()
        except Exception:  # a scrape must never fail because one segment is mid-restart
            log.exception("reading shard counters failed")
            return []
        out = []
        for name, help_text in SHM_COUNTERS.items():
            fam = CounterMetricFamily(f"va_{name}", help_text, labels=["shard"])
            for shard, values in sorted(per_shard.items()):
                if name in values:
                    fam.add_metric([str(shard)], float(values[name]))
            out.append(fam)
        return out


# Worker histograms in the shard segments (shm/histograms.py): histogram name -> exported stage
# (None: its own metric, va_turn_e2e_seconds).
TURN_STAGES: dict[str, str | None] = {
    "turn_end": "turn_end", "model_first_audio": "model_first_audio", "playout": "playout",
    "barge_in": "barge_in", "e2e": None,
}
HistSource = Callable[[], Mapping[int, Mapping[str, tuple[list[int], float]]]]


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    from shm.histograms import BOUNDS

    out, cum = [], 0
    for bound, n in zip((*map(str, BOUNDS), "+Inf"), buckets, strict=True):
        cum += n
        out.append((bound, float(cum)))
    return out


class _HistCollector(Collector):
    """The workers' latency histograms, read from the segments at scrape time (labels: shard, stage)."""

    def __init__(self, source: HistSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Any]:
        try:
            per_shard = self._source()
        except Exception:
            log.exception("reading shard histograms failed")
            return []
        turn = HistogramMetricFamily(
            "va_turn_latency_seconds",
            "Turn stage latency: turn_end (caller's last speech -> activityEnd sent), model_first_audio "
            "(activityEnd -> first model audio), playout (first model audio -> first RTP), barge_in "
            "(caller onset -> model audio stopped)", labels=["shard", "stage"])
        e2e = HistogramMetricFamily(
            "va_turn_e2e_seconds", "Caller's last speech -> first answer RTP packet out", labels=["shard"])
        for shard, hists in sorted(per_shard.items()):
            for name, stage in TURN_STAGES.items():
                if name not in hists:
                    continue
                buckets, total = hists[name]
                if stage is None:
                    e2e.add_metric([str(shard)], _cumulative(buckets), total)
                else:
                    turn.add_metric([str(shard), stage], _cumulative(buckets), total)
        return [turn, e2e]


class Metrics:
    """The supervisor's metrics on a private registry (tests create as many as they like)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("va_sessions_active", "Sessions currently admitted", registry=r)
        self.sessions_capacity = Gauge(
            "va_sessions_capacity", "Session slots on shards that accept sessions", registry=r
        )
        self.admissions = Counter(
            "va_admissions", "Session admission attempts by result", ["result"], registry=r
        )
        # tenant: a [tenants.<name>] name or "default"; model: a configured model or fallback_model;
        # route: primary | weighted | breaker_open (appliance/routing.py) — all bounded by the config
        self.tenant_sessions = Counter(
            "va_tenant_sessions", "Sessions created per tenant and the model routing chose",
            ["tenant", "model", "route"], registry=r)
        self.tenant_refused = Counter(
            "va_tenant_refused", "Session creates refused by a tenant's max_sessions", ["tenant"], registry=r)
        self.sessions_ended = Counter("va_sessions_ended", "Sessions ended by reason", ["reason"], registry=r)
        self.session_setup_seconds = Histogram(
            "va_session_setup_seconds",
            "POST /v1/sessions to SDP answer (Janus generate+process, slot activation)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.worker_restarts = Counter(
            "va_worker_restarts", "Worker restarts by role and reason", ["role", "reason"], registry=r
        )
        self.worker_up = Gauge("va_worker_up", "1 when the worker process is running", ["role", "shard"],
                               registry=r)
        self.heartbeat_age = Gauge(
            "va_worker_heartbeat_age_seconds", "Age of the worker's shared-memory heartbeat",
            ["role", "shard"], registry=r,
        )
        self.draining = Gauge("va_draining", "1 while the box refuses new sessions to drain", registry=r)
        self.redis_errors = Counter("va_redis_errors", "Failed Redis operations (retried later)", registry=r)
        # caller-leg quality, one observation per call every 5 s (appliance/quality.py)
        self.call_mos = Histogram(
            "va_call_mos", "E-model MOS estimate (1-4.5) of a call over the last 5 s window", ["shard"],
            buckets=(1.0, 1.5, 2.0, 2.5, 3.0, 3.25, 3.5, 3.75, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5), registry=r)
        self.rtp_loss = Histogram(
            "va_rtp_loss_ratio", "RTP packet loss ratio of a call over the last 5 s window "
            "(uplink: caller -> box; downlink: box -> caller, from the caller's RTCP reports)",
            ["shard", "direction"],
            buckets=(0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
            registry=r)
        self.rtp_jitter = Histogram(
            "va_rtp_jitter_seconds", "RTP interarrival jitter (RFC 3550) of a call, sampled every 5 s",
            ["shard", "direction"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5),
            registry=r)
        self.rtt = Histogram(
            "va_rtt_seconds", "Round-trip time between Janus and the caller (RTCP), sampled every 5 s",
            ["shard"], buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0),
            registry=r)
        self._http: Any = None

    @staticmethod
    def worker_overloaded_init(role: str) -> None:
        """Create ``va_worker_overloaded_total{role}`` at 0 (the arbiter's counter, default registry)."""
        from appliance.arbiter import OVERLOADED

        OVERLOADED.labels(role=role)

    def observe_quality(self, shard: int, q: Any) -> None:
        """One call's ``appliance.quality.QualitySample`` into the per-shard histograms."""
        sh = str(shard)
        self.call_mos.labels(shard=sh).observe(q.mos)
        self.rtp_loss.labels(shard=sh, direction="uplink").observe(q.loss_up_ratio)
        self.rtp_loss.labels(shard=sh, direction="downlink").observe(q.loss_down_ratio)
        self.rtp_jitter.labels(shard=sh, direction="uplink").observe(q.jitter_up_seconds)
        self.rtp_jitter.labels(shard=sh, direction="downlink").observe(q.jitter_down_seconds)
        if q.rtt_seconds > 0:
            self.rtt.labels(shard=sh).observe(q.rtt_seconds)

    def include_default_registry(self) -> None:
        """Also serve what other modules registered on prometheus_client's default registry."""
        self.registry.register(_DefaultRegistryProxy())

    def add_shard_counters(self, source: Callable[[], Mapping[int, Mapping[str, float]]]) -> None:
        """Export the workers' shared-memory counters, read at scrape time from ``source()``."""
        self.registry.register(_ShmCollector(source))

    def add_shard_histograms(self, source: HistSource) -> None:
        """Export the workers' latency histograms, read at scrape time from ``source()``."""
        self.registry.register(_HistCollector(source))

    def add_worker_registry(self, directory: str) -> None:
        """Export what worker processes record with prometheus_client in multiprocess mode
        (``PROMETHEUS_MULTIPROC_DIR=directory`` in their environment: the AI worker's Live-layer counters
        and connect histogram). Event-rate metrics only, never per frame: an ``inc`` there is an mmap'd
        store under a lock (~1-2 µs). Files of dead workers stay and keep their counts (monotonic)."""
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(self.registry, path=directory)

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on host:port (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = int(server.server_address[1])
        log.info("metrics listening", extra={"host": host, "port": bound})
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
