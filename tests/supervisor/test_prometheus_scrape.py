"""A real Prometheus (Debian's, ephemeral port, own data dir) scrapes a running supervisor with the
shipped alert rules: the worker histograms and multiprocess metrics arrive through /metrics, and
killing the AI worker makes VaWorkerRestarted fire."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from shm.segment import ShardSegment, segment_name
from tests.harness.prometheus import api, prometheus, query, wait_for
from tests.supervisor.conftest import start_supervisor, stop_supervisor

pytestmark = [pytest.mark.janus, pytest.mark.slow]

RULES = Path(__file__).resolve().parents[2] / "packaging" / "monitoring" / "voice-appliance.rules.yml"


def test_prometheus_scrapes_the_supervisor_and_an_alert_fires(tmp_path, redis_srv, janus):
    sup = start_supervisor(tmp_path / "sup", redis_srv.url, janus, slots=2)
    try:
        with prometheus(tmp_path / "prom", {"voice-appliance": [f"127.0.0.1:{sup.metrics_port}"]},
                        rule_files=[str(RULES)]) as port:
            _scrape_and_alert(sup, port)
    finally:
        stop_supervisor(sup)


def _scrape_and_alert(sup, port: int) -> None:
    def series(q: str) -> list:
        return query(port, q)

    wait_for(lambda: series('up{job="voice-appliance"} == 1'), 60, "target up")
    # the workers' histograms (segment) and the AI worker's own metrics (multiprocess dir) arrive
    stages = wait_for(lambda: series("va_turn_latency_seconds_count"), 30, "turn latency series")
    assert {s["metric"]["stage"] for s in stages} == {"turn_end", "model_first_audio", "playout",
                                                      "barge_in"}
    assert all(s["metric"]["shard"] == "0" for s in stages)
    assert series("va_turn_e2e_seconds_bucket")
    wait_for(lambda: series("va_live_degraded_total"), 30, "AI worker metrics (multiprocess)")
    # the supervisor's probe of the real Janus (appliance/probes.py); coturn is not configured here
    wait_for(lambda: series('va_component_up{component="janus"} == 1'), 30, "Janus probe up")
    assert series('va_component_probe_seconds{component="janus"} > 0')
    assert not series('va_component_up{component="turn"}')
    assert not series("va_worker_restarts_total > 0")
    # the AI worker dies: the arbiter restarts it, the counter moves, the rule fires
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    try:
        ai_pid, _ = seg.heartbeat_age("ai")
    finally:
        seg.close()
    assert ai_pid
    os.kill(ai_pid, signal.SIGKILL)

    def firing() -> list:
        alerts = api(port, "/api/v1/alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "VaWorkerRestarted"
                and a["labels"].get("role") == "ai" and a["state"] == "firing"]

    alert = wait_for(firing, 60, "VaWorkerRestarted firing")[0]
    assert alert["labels"]["severity"] == "warning"
    assert "ai worker restarted" in alert["annotations"]["summary"]
    # nothing else pages on an idle, healthy box
    others = [a["labels"]["alertname"] for a in api(port, "/api/v1/alerts")["alerts"]
              if a["labels"]["alertname"] not in ("VaWorkerRestarted",)]
    assert not others, others
