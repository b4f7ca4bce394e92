"""Fixtures for the supervisor tests: real Redis, real Janus (netns), and a running supervisor process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.runner import dumps_toml
from appliance.token import generate_keys, mint
from tests.harness.emulator import Emulator, start_emulator
from tests.harness.janus import JanusInstance, janus_available, janus_in_netns
from tests.harness.redis import RedisServer, free_port, redis_server
from tests.harness.shm import unique_instance_id


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """The Live emulator answering each turn with the caller's own speech (a module may override it)."""
    with start_emulator(tmp_path_factory.mktemp("emu"), reply="echo") as emu:
        yield emu


@pytest.fixture(scope="module")
def janus() -> Iterator[JanusInstance]:
    if not janus_available():
        pytest.skip("janus or network namespaces not available")
    with janus_in_netns() as j:
        yield j


@dataclass
class SupervisorProc:
    """A `voice-appliance supervisor` subprocess and how to reach it."""

    proc: subprocess.Popen[bytes]
    config: Path
    api: str
    metrics_port: int
    agent_port: int
    instance: str
    private_key: bytes
    log: Path
    rtp_port_min: int
    tls_ca: str | None = None  # the API serves TLS verified by this CA

    def token(self, sub: str = "alice") -> str:
        return mint(self.private_key, sub=sub, audience="voice-appliance", scope="voice:session",
                    ttl_seconds=600)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def rtp_base() -> int:
    """A per-run RTP port base (even), below the kernel's ephemeral range (32768+) and Janus's ranges."""
    return 12000 + (os.getpid() % 200) * 40


def start_supervisor(tmp: Path, redis_url: str, janus: JanusInstance, *, slots: int = 1,
                     extra: dict[str, dict] | None = None, env_extra: dict[str, str] | None = None,
                     rtp_port_min: int | None = None, tls_ca: str | None = None) -> SupervisorProc:
    """``tls_ca``: the API serves TLS (``extra["api"]`` names the certificate) and this CA verifies it."""
    priv, pub = generate_keys(tmp / "keys")
    instance = unique_instance_id("sup")
    api_port, metrics_port, agent_port, admin_port = free_port(), free_port(), free_port(), free_port()
    base = rtp_port_min or rtp_base()
    sections: dict[str, dict] = {
        "api": {"host": "127.0.0.1", "port": api_port, "metrics_port": metrics_port,
                "agent_check_port": agent_port, "admin_port": admin_port, "drain_timeout_seconds": 5,
                "box_id": instance},  # boxes of one test share a hostname: name each one
        "auth": {"jwt_public_key_file": str(pub), "jwt_private_key_file": str(priv)},
        "janus": {"events_port": free_port(),  # never the fixed default 7089: tests run in parallel
                  "url": janus.url, "admin_url": janus.admin_url, "api_secret": janus.api_secret,
                  "admin_secret": janus.admin_secret, "audiobridge_admin_key": janus.audiobridge_admin_key,
                  "keepalive_seconds": 5.0},
        "redis": {"url": redis_url},
        "media": {"rtp_host": janus.host_ip, "rtp_port_min": base,
                  "rtp_port_max": base + max(39, 2 * slots + 1)},
        "shards": {"count": 1, "slots": slots, "heartbeat_timeout_seconds": 3.0},
        "paths": {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run"), "instance_id": instance},
        "limits": {"session_creates_per_minute": 1000, "signalling_per_minute": 10000},
        # no emulator here: the AI worker runs degraded; these tests are about the control plane
        "model": {"base_url": "https://127.0.0.1:9", "max_retries": 0},
        # ... holding with the plain hold prompt these tests were written for (the degradation menu:
        # tests/ai/test_ivr.py, tests/supervisor/test_degrade_end.py)
        "degrade": {"enabled": False},
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    cfg = tmp / "appliance.toml"
    cfg.write_text(dumps_toml(sections))
    log = tmp / "supervisor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VA_")}
    env["VA_LOG_LEVEL"] = "info"
    env.update(env_extra or {})
    scheme = "https" if tls_ca else "http"
    sp = SupervisorProc(None, cfg, f"{scheme}://127.0.0.1:{api_port}", metrics_port,  # type: ignore[arg-type]
                        agent_port, instance, priv.read_bytes(), log, base, tls_ca)
    return relaunch_supervisor(sp, env)


def relaunch_supervisor(sp: SupervisorProc, env: dict[str, str] | None = None) -> SupervisorProc:
    """Start (again) a supervisor process with ``sp``'s config (its log is appended to); wait for ready."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VA_")}
        env["VA_LOG_LEVEL"] = "info"
    with open(sp.log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "supervisor", "--config", str(sp.config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    sp.proc = proc
    wait_ready(sp)
    return sp


def wait_ready(sp: SupervisorProc, limit: float = 60) -> None:
    proc = sp.proc
    ctx = ssl.create_default_context(cafile=sp.tls_ca) if sp.tls_ca else None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"supervisor exited {proc.returncode}:\n{sp.log_tail()}")
        try:
            with urllib.request.urlopen(sp.api + "/readyz", timeout=1, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    stop_supervisor(sp)
    raise RuntimeError(f"supervisor not ready:\n{sp.log_tail()}")


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (a supervisor's workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (FileNotFoundError, IndexError, ValueError):
                continue
    return out


def kill_box(sp: SupervisorProc) -> None:
    """The whole box dies: SIGKILL the supervisor AND its workers (workers outlive a supervisor alone)."""
    workers = children(sp.proc.pid)
    sp.proc.kill()
    sp.proc.wait(10)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_supervisor(sp: SupervisorProc, sig: int = signal.SIGTERM, wait: float = 30) -> int:
    if sp.proc.poll() is None:
        sp.proc.send_signal(sig)
        try:
            sp.proc.wait(wait)
        except subprocess.TimeoutExpired:
            sp.proc.kill()
            sp.proc.wait(5)
            raise
    return sp.proc.returncode


@pytest.fixture
def sub() -> str:
    return "user-" + secrets.token_hex(3)


async def wait_until(pred, limit: float = 20.0, step: float = 0.05, what: str = "condition"):
    """Poll ``pred`` (sync or async) until it returns a truthy value, or fail naming ``what``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"{what} not met within {limit} s")


NODE_MODULES = Path(__file__).resolve().parents[1] / "e2e" / "node_modules"
DEMO_CALL = Path(__file__).with_name("demo_call.js")


async def demo_page_call(page_url: str, talk_ms: int, wav: Path, log_tail, *,
                         wait_quality: bool = False) -> dict[str, dict]:
    """Call from the demo page in Chromium (tests/supervisor/demo_call.js) with ``wav`` as the fake
    microphone; returns the page's events by name, after checking the page ran and heard the answer.
    ``wait_quality``: also wait until the page shows the line quality and a measured round trip."""
    import json

    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    if wait_quality:
        env["DEMO_WAIT_QUALITY"] = "1"
    proc = await asyncio.create_subprocess_exec(
        "node", str(DEMO_CALL), page_url, str(talk_ms), str(wav),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 200)  # Chromium is slow on a loaded box
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = {e["event"]: e for e in map(json.loads, out.decode().splitlines())}
    assert proc.returncode == 0 and "heard" in events, err.decode()[-3000:] + log_tail()
    heard = events["heard"]
    assert heard["transcript"] and heard["maxRms"] > 0.02, events
    return events


async def open_call(http, auth: dict[str, str], pc, sup, *, mode: str | None = None,
                    active: bool = True, what: str = "call up and model live") -> str:
    """POST the caller's offer, apply the answer, wait until the model is live (and, with ``active``,
    the session is ``active``: Janus reported webrtcup). Returns the session id."""
    from aiortc import RTCSessionDescription

    body = {"type": "offer", "sdp": pc.localDescription.sdp, **({"mode": mode} if mode else {})}
    r = await http.post("/v1/sessions", headers=auth, json=body)
    assert r.status_code == 201, (r.text, sup.log_tail())
    sid = r.json()["session_id"]
    await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))

    async def model_live() -> bool:
        info = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
        return (not active or info["state"] == "active") and info["details"].get("model_state") == "live"

    await wait_until(model_live, limit=30, what=what)
    return sid
