"""sd_notify over a real unix datagram socket, the agent check against a real HAProxy, /metrics over HTTP."""

import asyncio
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from appliance.agentcheck import AgentCheckServer, agent_reply
from appliance.metrics import Metrics
from appliance.sdnotify import Notifier


def test_notify_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.watchdog_seconds == 3.0
    assert n.ready("2 shards up")
    assert srv.recv(4096) == b"READY=1\nSTATUS=2 shards up"
    assert n.watchdog()
    assert srv.recv(4096) == b"WATCHDOG=1"
    n.close()
    srv.close()


def test_notify_abstract_socket():
    name = f"va-test-{os.getpid()}-{time.monotonic_ns()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(b"\0" + name.encode())
    srv.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert n.stopping()
    assert srv.recv(4096) == b"STOPPING=1"
    srv.close()


def test_notify_disabled_and_watchdog_for_other_pid():
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_seconds is None
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_seconds is None
    assert not n.ready()  # send error is swallowed


def test_agent_reply_words():
    assert agent_reply(0.5, False) == "up 50%\n"
    assert agent_reply(1.7, False) == "up 100%\n"
    assert agent_reply(0.0, True) == "drain\n"
    assert agent_reply(0.25, False, was_drained=True) == "ready up 25%\n"


async def _read_agent(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = await reader.read()
    writer.close()
    return data.decode()


async def test_agent_server_follows_state():
    state = {"free": 0.75, "drain": False}
    srv = AgentCheckServer(lambda: (state["free"], state["drain"]), "127.0.0.1", 0)
    await srv.start()
    try:
        assert await _read_agent(srv.port) == "up 75%\n"
        state["drain"] = True
        assert await _read_agent(srv.port) == "drain\n"
        state["drain"] = False
        assert await _read_agent(srv.port) == "ready up 75%\n"
    finally:
        await srv.stop()


def _free_port() -> int:
    from tests.harness.redis import free_port  # never the same port twice in a run

    return free_port()


def _haproxy_servers_state(sock_path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(b"show servers state be\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
async def test_real_haproxy_drains_and_weights(tmp_path):
    state = {"free": 0.5, "drain": False}
    agent = AgentCheckServer(lambda: (state["free"], state["drain"]), "127.0.0.1", 0)
    await agent.start()
    sock = str(tmp_path / "stats.sock")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""global
    stats socket {sock} level admin
defaults
    mode tcp
    timeout connect 1s
    timeout client 5s
    timeout server 5s
backend be
    server app 127.0.0.1:{_free_port()} weight 100 agent-check agent-port {agent.port} agent-inter 100ms
frontend fe
    bind 127.0.0.1:{_free_port()}
    default_backend be
"""
    )
    proc = await asyncio.create_subprocess_exec(
        "haproxy", "-f", str(cfg), "-db", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    async def wait_for(pred, limit=10.0):
        deadline = time.monotonic() + limit
        last = ""
        while time.monotonic() < deadline:
            try:
                last = await asyncio.to_thread(_haproxy_servers_state, sock)
            except OSError:  # not listening yet
                last = ""
            if last:
                fields = [ln.split() for ln in last.splitlines() if " app " in f" {ln} "]
                if fields and pred(fields[0]):
                    return fields[0]
            await asyncio.sleep(0.1)
        raise AssertionError(f"haproxy state never matched: {last}")

    try:
        # show servers state columns: 5 srv_op_state 6 srv_admin_state 7 srv_uweight 8 srv_iweight
        await wait_for(lambda f: f[7] == "50")
        state["drain"] = True
        await wait_for(lambda f: int(f[6]) & 0x08)  # SRV_ADMF_DRAIN set by the agent
        state["drain"] = False
        state["free"] = 0.2
        await wait_for(lambda f: f[7] == "20" and not int(f[6]) & 0x08)  # "ready" cleared the drain
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 5)
        await agent.stop()


def test_metrics_served_with_shard_counters():
    m = Metrics()
    m.sessions_active.set(3)
    m.admissions.labels(result="accepted").inc(2)
    m.worker_restarts.labels(role="ai", reason="exit").inc()
    m.add_shard_counters(lambda: {0: {"uplink_dropped_frames": 4, "rtp_received_packets": 100},
                                  1: {"uplink_dropped_frames": 1}})
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop()
    assert "va_sessions_active 3.0" in body
    assert 'va_admissions_total{result="accepted"} 2.0' in body
    assert 'va_worker_restarts_total{reason="exit",role="ai"} 1.0' in body
    assert 'va_uplink_dropped_frames_total{shard="0"} 4.0' in body
    assert 'va_uplink_dropped_frames_total{shard="1"} 1.0' in body
    assert 'va_rtp_received_packets_total{shard="0"} 100.0' in body


def test_playback_pause_counters_from_slots_are_exported():
    """The workers' pause counters in a real slot reach /metrics as shard totals (no session label)."""
    from types import SimpleNamespace

    from appliance.metrics import CounterAccumulator
    from appliance.supervisor import Supervisor
    from tests.harness.shm import activate_slot, shard_segment

    with shard_segment(slots=2) as seg:
        sup = SimpleNamespace(_counters=CounterAccumulator())
        for i, (pauses, confirmed, released) in enumerate(((3, 2, 1), (1, 0, 1))):
            slot = seg.slot(i)
            activate_slot(slot)
            slot.counters.add("pauses", pauses)
            slot.counters.add("pauses_confirmed", confirmed)
            slot.counters.add("pauses_released", released)
            Supervisor.harvest_counters(sup, 0, slot)  # type: ignore[arg-type]
        m = Metrics()
        m.add_shard_counters(lambda: sup._counters.totals)
        port = m.serve("127.0.0.1", 0)
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        finally:
            m.stop()
    assert 'va_playback_pauses_total{shard="0"} 4.0' in body
    assert 'va_playback_pauses_confirmed_total{shard="0"} 2.0' in body
    assert 'va_playback_pauses_released_total{shard="0"} 2.0' in body
    assert 'va_playback_pause_timeouts_total{shard="0"} 0.0' in body


def test_default_registry_is_included():
    from prometheus_client import REGISTRY, Counter

    name = f"va_test_default_{os.getpid()}"
    c = Counter(name, "test", registry=REGISTRY)
    c.inc(7)
    m = Metrics()
    m.include_default_registry()
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop()
        REGISTRY.unregister(c)
    assert f"{name}_total 7.0" in body


def test_counter_accumulator_survives_slot_reset():
    from appliance.metrics import CounterAccumulator

    acc = CounterAccumulator()
    acc.observe(0, 1, "x", 5)
    acc.observe(0, 1, "x", 8)
    acc.observe(0, 1, "x", 2)  # slot reused: counter restarted
    acc.observe(0, 2, "x", 4)
    assert acc.totals[0]["x"] == 8 + 2 + 4


def test_metrics_source_failure_does_not_break_scrape():
    m = Metrics()
    m.add_shard_counters(lambda: 1 / 0)
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop()
    assert "va_sessions_active" in body


def test_ai_worker_tool_and_keypad_counters_reach_prometheus():
    """AI worker slot counters (tool calls, tool errors, keypad digits) → shard totals → /metrics."""
    from types import SimpleNamespace

    from appliance.metrics import CounterAccumulator
    from appliance.supervisor import Supervisor
    from tests.harness.shm import activate_slot, shard_segment

    owner = SimpleNamespace(_counters=CounterAccumulator())
    with shard_segment(slots=2) as seg:
        for i, (calls, errors, digits) in enumerate(((3, 1, 5), (2, 0, 0))):
            slot = seg.slot(i)
            activate_slot(slot)
            slot.counters.add("tool_calls", calls)
            slot.counters.add("tool_errors", errors)
            slot.counters.add("dtmf_sent", digits)
            Supervisor.harvest_counters(owner, 0, slot)  # type: ignore[arg-type]
    m = Metrics()
    m.add_shard_counters(lambda: owner._counters.totals)
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop()
    assert 'va_model_tool_calls_total{shard="0"} 5.0' in body
    assert 'va_model_tool_errors_total{shard="0"} 1.0' in body
    assert 'va_dtmf_digits_sent_total{shard="0"} 5.0' in body


def test_metrics_served_with_worker_histograms_and_call_quality():
    """Histograms the workers wrote into a real segment and a call-quality sample reach /metrics as
    per-shard histograms (cumulative buckets, sums; no session label)."""
    from appliance.quality import QualitySample
    from tests.harness.shm import shard_segment

    with shard_segment(slots=1) as seg:
        seg.histograms("ai").observe("turn_end", 0.045)
        seg.histograms("ai").observe("turn_end", 0.3)
        seg.histograms("media").observe("e2e", 0.47)
        m = Metrics()
        m.add_shard_histograms(lambda: {0: {**seg.histograms("media").snapshot_all(),
                                            **seg.histograms("ai").snapshot_all()}})
        m.observe_quality(0, QualitySample(4.1, 85.0, 0.02, 0.0, 0.01, 0.002, 0.04, 0.0))
        port = m.serve("127.0.0.1", 0)
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        finally:
            m.stop()
    assert 'va_turn_latency_seconds_bucket{le="0.04",shard="0",stage="turn_end"} 0.0' in body
    assert 'va_turn_latency_seconds_bucket{le="0.05",shard="0",stage="turn_end"} 1.0' in body
    assert 'va_turn_latency_seconds_bucket{le="+Inf",shard="0",stage="turn_end"} 2.0' in body
    assert 'va_turn_latency_seconds_count{shard="0",stage="turn_end"} 2.0' in body
    assert 'va_turn_latency_seconds_sum{shard="0",stage="turn_end"} 0.345' in body
    assert 'va_turn_latency_seconds_count{shard="0",stage="playout"} 0.0' in body
    assert 'va_turn_e2e_seconds_bucket{le="0.48",shard="0"} 1.0' in body
    assert 'va_call_mos_bucket{le="4.2",shard="0"} 1.0' in body
    assert 'va_rtp_loss_ratio_sum{direction="uplink",shard="0"} 0.02' in body
    assert 'va_rtt_seconds_count{shard="0"} 1.0' in body
    assert "session=" not in body and "session_id=" not in body  # no per-session label anywhere
