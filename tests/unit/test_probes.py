"""The box's components reach Prometheus: a real Prometheus (Debian's) scrapes a real redis-server through
Debian's prometheus-redis-exporter, both configured from the redis role's own templates (the ACL user
"metrics" and the exporter's environment file), and the supervisor's probe gauges (appliance/probes.py)
of a real coturn answering STUN. Stopping coturn and Redis turns the samples to 0 and puts the shipped
VaTurnDown / VaRedisDown rules into their ``for`` wait (pending; firing needs the rule's full minute,
which the promtool unit tests cover)."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, start_http_server

from appliance.config import ConfigError, load_config, replace
from appliance.probes import ComponentProbes, parse_address, stun_binding
from tests.harness import ansible_render
from tests.harness.coturn import coturn_server
from tests.harness.prometheus import api, prometheus, query, wait_for
from tests.harness.redis import RedisServer, free_port

RULES = Path(__file__).resolve().parents[2] / "packaging" / "monitoring" / "voice-appliance.rules.yml"
EXPORTER = "/usr/bin/prometheus-redis-exporter"  # Debian's prometheus-redis-exporter (APT_TEST)
PASSWORD = "metrics-password-1234"


def env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (what the exporter's unit reads)."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def test_parse_address_and_config_check() -> None:
    assert parse_address("127.0.0.1:3478") == ("127.0.0.1", 3478)
    assert parse_address("[::1]:3478") == ("::1", 3478)
    for bad in ("127.0.0.1", "host:", ":3478", "host:70000", "host:x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_address(bad)
    with pytest.raises(ConfigError, match=r"turn\.probe_address: expected host:port"):
        replace(load_config(None, env={}), turn={"probe_address": "localhost"})


async def test_stun_probe_of_a_port_nobody_listens_on_fails_fast() -> None:
    t0 = time.monotonic()
    with pytest.raises((OSError, TimeoutError)):
        async with asyncio.timeout(1.0):
            await stun_binding("127.0.0.1", free_port())  # ICMP port unreachable: refused
    assert time.monotonic() - t0 < 1.5


@pytest.mark.slow
def test_prometheus_scrapes_redis_exporter_and_component_probes(tmp_path: Path) -> None:
    assert os.path.exists(EXPORTER), "prometheus-redis-exporter not installed (APT_TEST)"
    redis_port, exporter_port, metrics_port = free_port(), free_port(), free_port()
    role = {"redis_acl_password": "a" * 16, "redis_replication_password": "b" * 16,
            "redis_sentinel_password": "c" * 16, "redis_exporter_password": PASSWORD, "redis_acl": True,
            "redis_exporter": True, "redis_port": redis_port,
            "redis_exporter_listen": f"127.0.0.1:{exporter_port}"}
    acl = tmp_path / "users.acl"
    acl.write_text(ansible_render.render("redis", "users.acl.j2", role))
    env = env_file(ansible_render.render("redis", "redis-exporter.default.j2", role))
    assert env["REDIS_USER"] == "metrics" and env["REDIS_ADDR"] == f"redis://127.0.0.1:{redis_port}"
    redis = RedisServer(tmp_path / "redis", port=redis_port, extra_args=["--aclfile", str(acl)])
    redis.start()
    exporter_log = open(tmp_path / "exporter.log", "wb")  # closed below
    exporter = subprocess.Popen([EXPORTER, *shlex.split(env.pop("ARGS"))], env={**env, "PATH": "/usr/bin"},
                                stdout=exporter_log, stderr=subprocess.STDOUT)
    server, _thread = start_http_server(metrics_port, "127.0.0.1", registry=REGISTRY)
    stop = threading.Event()
    probe_thread = None
    try:
        with coturn_server(tmp_path / "turn", secret="s3cret-for-tests") as turn:
            probes = ComponentProbes(None, f"127.0.0.1:{turn.port}")

            async def loop() -> None:
                while not stop.is_set():
                    await probes.probe_once()
                    await asyncio.sleep(0.3)

            probe_thread = threading.Thread(target=asyncio.run, args=(loop(),), daemon=True)
            probe_thread.start()
            jobs = {"voice-appliance": [f"127.0.0.1:{metrics_port}"], "redis": [f"127.0.0.1:{exporter_port}"]}
            with prometheus(tmp_path / "prom", jobs, [str(RULES)]) as port:
                wait_for(lambda: query(port, 'redis_up{job="redis"} == 1'), 30, "redis_up 1")
                assert query(port, "redis_connected_clients > 0")  # the ACL user may read INFO
                errors = query(port, "redis_exporter_last_scrape_error == 1")
                assert not errors, errors
                wait_for(lambda: query(port, 'va_component_up{component="turn"} == 1'), 30, "turn up")
                (rtt,) = query(port, 'va_component_probe_seconds{component="turn"}')
                assert 0 < float(rtt["value"][1]) < 1.0, rtt
                assert not query(port, 'va_component_up{component="janus"}')  # not probed here

                def pending(name: str) -> list:
                    return [a for a in api(port, "/api/v1/alerts")["alerts"]
                            if a["labels"]["alertname"] == name and a["state"] == "pending"]

                assert not pending("VaTurnDown") and not pending("VaRedisDown")
                turn.stop()
                wait_for(lambda: query(port, 'va_component_up{component="turn"} == 0'), 30, "turn down")
                wait_for(lambda: pending("VaTurnDown"), 30, "VaTurnDown pending")
                redis.stop()
                wait_for(lambda: query(port, 'redis_up{job="redis"} == 0'), 30, "redis_up 0")
                (alert,) = wait_for(lambda: pending("VaRedisDown"), 30, "VaRedisDown pending")
                assert alert["labels"]["severity"] == "critical"
    finally:
        stop.set()
        if probe_thread is not None:
            probe_thread.join(5)
        server.shutdown()
        server.server_close()
        exporter.terminate()
        exporter.wait(10)
        exporter_log.close()
        redis.stop()
