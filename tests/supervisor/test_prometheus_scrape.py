"""A real Prometheus (Debian's, ephemeral port, own data dir) scrapes a running supervisor with the
shipped alert rules: the worker histograms and multiprocess metrics arrive through /metrics, and
killing the AI worker makes VaWorkerRestarted fire."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from shm.segment import ShardSegment, segment_name
from tests.harness.redis import free_port
from tests.supervisor.conftest import start_supervisor, stop_supervisor

pytestmark = [pytest.mark.janus, pytest.mark.slow]

RULES = Path(__file__).resolve().parents[2] / "packaging" / "monitoring" / "voice-appliance.rules.yml"


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for(fn, limit: float, what: str):
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"{what} not met within {limit} s (last: {last})")


@pytest.fixture
def prometheus(tmp_path: Path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed")

    def start(target_port: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "voice-appliance",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        log = open(tmp_path / "prometheus.log", "wb")  # closed at teardown
        proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        return proc, port

    procs: list = []
    yield start
    for proc, log in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def test_prometheus_scrapes_the_supervisor_and_an_alert_fires(tmp_path, redis_srv, janus, prometheus):
    sup = start_supervisor(tmp_path / "sup", redis_srv.url, janus, slots=2)
    try:
        _proc, port = prometheus(sup.metrics_port)

        def series(query: str) -> list:
            return api(port, "/api/v1/query", query=query)["data"]["result"]

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
            alerts = api(port, "/api/v1/alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "VaWorkerRestarted"
                    and a["labels"].get("role") == "ai" and a["state"] == "firing"]

        alert = wait_for(firing, 60, "VaWorkerRestarted firing")[0]
        assert alert["labels"]["severity"] == "warning"
        assert "ai worker restarted" in alert["annotations"]["summary"]
        # nothing else pages on an idle, healthy box
        others = [a["labels"]["alertname"] for a in api(port, "/api/v1/alerts")["data"]["alerts"]
                  if a["labels"]["alertname"] not in ("VaWorkerRestarted",)]
        assert not others, others
    finally:
        stop_supervisor(sup)
