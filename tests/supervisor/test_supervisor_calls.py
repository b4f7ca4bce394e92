"""The supervisor as a real process: real Janus (NoSIP, AudioBridge), Redis, media and AI workers, aiortc.

One supervisor per module (one shard, one slot, so capacity is easy to hit); each test ends its calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from appliance.procs import pid_gone
from shm.segment import ShardSegment, SlotState, segment_name
from tests.supervisor.conftest import (
    DEMO_CALL,
    NODE_MODULES,
    SupervisorProc,
    kill_box,
    start_supervisor,
    stop_supervisor,
    wait_until,
)

pytestmark = [pytest.mark.janus, pytest.mark.slow]


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


gone = pid_gone


async def caller() -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    return pc


def agent(sp: SupervisorProc) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", sp.agent_port), 5) as s:
        return s.recv(100).decode()


def metrics(sp: SupervisorProc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{sp.metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def sup(tmp_path_factory, redis_srv, janus):
    # session tokens of the shortest lifetime: the demo page refreshes its token during the call
    sp = start_supervisor(tmp_path_factory.mktemp("sup"), redis_srv.url, janus, slots=1,
                          extra={"auth": {"session_token_ttl_seconds": 60}})
    yield sp
    stop_supervisor(sp)


@pytest.fixture
def seg(sup):
    s = ShardSegment.attach(segment_name(sup.instance, 0))
    yield s
    # a test's last call frees its slot a moment after DELETE returns: the next test needs it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and s.slot(0).state != SlotState.FREE:
        time.sleep(0.05)
    s.close()


async def create(http: httpx.AsyncClient, token: str, pc: RTCPeerConnection, **extra) -> httpx.Response:
    return await http.post("/v1/sessions", json={"type": "offer", "sdp": pc.localDescription.sdp, **extra},
                           headers={"Authorization": f"Bearer {token}"})


async def test_call_capacity_worker_restart_and_delete(sup, seg, sub):
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
        pc = await caller()
        r = await create(http, token, pc)
        assert r.status_code == 201, (r.text, sup.log_tail())
        body = r.json()
        sid = body["session_id"]
        assert body["type"] == "answer" and "opus/48000" in body["sdp"] and body["resume_token"]
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
        # trickle goes to Janus (aiortc put its candidates in the offer; re-sending one is harmless)
        cand = next(ln[2:] for ln in pc.localDescription.sdp.splitlines() if ln.startswith("a=candidate"))
        r = await http.post(f"/v1/sessions/{sid}/ice", headers=auth,
                            json={"candidate": cand, "sdpMid": "0", "sdpMLineIndex": 0})
        assert r.status_code == 204, r.text
        r = await http.post(f"/v1/sessions/{sid}/ice", headers=auth, json={"completed": True})
        assert r.status_code == 204, r.text

        async def state(want: str) -> bool:
            return (await http.get(f"/v1/sessions/{sid}", headers=auth)).json().get("state") == want

        await wait_until(lambda: state("active"), what="webrtcup")
        info = seg.slot(0).snapshot()
        assert info is not None and info.session_id == sid and info.local_rtp_port == sup.rtp_port_min
        slot = seg.slot(0)
        await wait_until(lambda: slot.counters.get("rx_packets") > 20, what="caller RTP at the media worker")

        # full: the one slot is taken
        pc2 = await caller()
        r2 = await create(http, sup.token(sub), pc2)
        assert r2.status_code == 503 and int(r2.headers["Retry-After"]) >= 1, r2.text
        await pc2.close()
        assert agent(sup) == "up 0%\n"
        text = metrics(sup)
        assert "va_sessions_active 1.0" in text and 'va_admissions_total{result="full"} 1.0' in text

        # kill -9 the media worker: restarted on the same CPU, the call keeps flowing
        old_pid, _ = seg.heartbeat_age("media")
        cpu = cpus_allowed(old_pid)
        rx_before = slot.counters.get("rx_packets")
        t0 = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)

        def new_beat():
            pid, age = seg.heartbeat_age("media")
            return pid if pid != old_pid and age is not None and age < 1 else None

        new_pid = await wait_until(new_beat, what="media worker restarted")
        restart_s = time.monotonic() - t0
        print(f"media worker restart to first heartbeat: {restart_s * 1000:.0f} ms")
        assert cpus_allowed(new_pid) == cpu
        await wait_until(lambda: slot.counters.get("rx_packets") > rx_before + 25, what="RTP after restart")
        assert gone(old_pid)
        assert 'va_worker_restarts_total{reason="signal",role="media"} 1.0' in metrics(sup)

        # DELETE ends it: slot freed, capacity back
        r = await http.delete(f"/v1/sessions/{sid}", headers=auth)
        assert r.status_code == 204
        assert (await http.get(f"/v1/sessions/{sid}", headers=auth)).status_code == 404
        await wait_until(lambda: slot.state == SlotState.FREE, what="slot freed")
        assert agent(sup) == "up 100%\n"
        await pc.close()


async def test_hangup_keeps_resumable_state_and_resume_continues(sup, seg, sub):
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
        pc = await caller()
        r = await create(http, token, pc, voice="Kore")
        assert r.status_code == 201, r.text
        body = r.json()
        sid, resume = body["session_id"], body["resume_token"]
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))

        async def state(want: str) -> bool:
            return (await http.get(f"/v1/sessions/{sid}", headers=auth)).json().get("state") == want

        await wait_until(lambda: state("active"), what="webrtcup")
        await pc.close()  # the caller goes away: Janus hangup → teardown, record kept as disconnected
        await wait_until(lambda: state("disconnected"), what="disconnected")
        await wait_until(lambda: seg.slot(0).state == SlotState.FREE, what="slot freed")
        # a candidate for the gone leg is refused out loud, not dropped
        ice = await http.post(f"/v1/sessions/{sid}/ice", headers=auth, json={
            "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host", "sdpMid": "0"})
        assert ice.status_code == 409 and ice.json()["error"] == "not_connected", ice.text

        # a resume refused for capacity does not spend the token
        blocker_pc = await caller()
        blocker = await create(http, token, blocker_pc)
        assert blocker.status_code == 201, blocker.text
        pc_full = await caller()
        r_full = await create(http, token, pc_full, resume_token=resume)
        assert r_full.status_code == 503, r_full.text
        await pc_full.close()
        blocker_id = blocker.json()["session_id"]
        assert (await http.delete(f"/v1/sessions/{blocker_id}", headers=auth)).status_code == 204
        await blocker_pc.close()
        await wait_until(lambda: seg.slot(0).state == SlotState.FREE, what="blocker's slot freed")

        # someone else cannot use the token
        pc_x = await caller()
        rx = await create(http, sup.token("mallory"), pc_x, resume_token=resume)
        assert rx.status_code == 400 and rx.json()["error"] == "invalid_resume"
        await pc_x.close()

        pc2 = await caller()
        r2 = await create(http, token, pc2, resume_token=resume)
        assert r2.status_code == 201, r2.text
        body2 = r2.json()
        assert body2["session_id"] == sid and body2["resume_token"] != resume
        info = seg.slot(0).snapshot()
        assert info is not None and info.session_id == sid and info.options.get("voice") == "Kore"
        await pc2.setRemoteDescription(RTCSessionDescription(body2["sdp"], "answer"))
        await wait_until(lambda: state("active"), what="webrtcup after resume")
        # a spent token does not work twice
        pc3 = await caller()
        r3 = await create(http, token, pc3, resume_token=resume)
        assert r3.status_code == 400
        await pc3.close()
        assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        await pc2.close()


async def test_room_mode_through_audiobridge(sup, seg, sub):
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
        pc = await caller()
        r = await create(http, token, pc, mode="room")
        assert r.status_code == 201, (r.text, sup.log_tail())
        body = r.json()
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
        info = seg.slot(0).snapshot()
        assert info is not None and info.mode == "room" and info.remote_rtp_port > 0
        sid = body["session_id"]
        slot = seg.slot(0)
        # the AudioBridge mix reaches the media worker once the worker has sent its first packet
        await wait_until(lambda: slot.counters.get("rx_packets") > 10, limit=30, what="room RTP")
        assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        await pc.close()


async def test_drain_signals_and_rolling_restart_keep_the_call(sup, seg, sub):
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=sup.api, timeout=20) as http:
        pc = await caller()
        r = await create(http, token, pc)
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
        slot = seg.slot(0)
        await wait_until(lambda: slot.counters.get("rx_packets") > 20, what="caller RTP")

        # SIGUSR1: drain (agent says drain, new calls get 503, the live call stays); SIGUSR2: back
        sup.proc.send_signal(signal.SIGUSR1)
        await wait_until(lambda: agent(sup) == "drain\n", what="agent drain")
        pc2 = await caller()
        r2 = await create(http, sup.token(sub), pc2)
        assert r2.status_code == 503 and "Retry-After" in r2.headers
        await pc2.close()
        assert (await http.get("/readyz")).status_code == 503
        sup.proc.send_signal(signal.SIGUSR2)
        await wait_until(lambda: agent(sup) == "ready up 0%\n", what="agent ready")

        # SIGHUP: workers replaced one by one, the call keeps flowing through the new media worker
        old_media, _ = seg.heartbeat_age("media")
        sup.proc.send_signal(signal.SIGHUP)

        def replaced():
            pid, age = seg.heartbeat_age("media")
            return pid if pid != old_media and age is not None and age < 1 else None

        await wait_until(replaced, limit=30, what="media worker replaced")
        rx = slot.counters.get("rx_packets")
        await wait_until(lambda: slot.counters.get("rx_packets") > rx + 25, what="RTP after reload")
        assert (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()["state"] == "active"
        assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        await pc.close()


def test_sd_notify_ready_status_and_stopping(tmp_path, redis_srv, janus):
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    sp = start_supervisor(tmp_path, redis_srv.url, janus,
                          env_extra={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    try:
        seen = []
        while not any(m.startswith(b"READY=1") for m in seen):
            seen.append(sock.recv(4096))
        ready = next(m for m in seen if m.startswith(b"READY=1"))
        assert b"STATUS=serving: 0/1 sessions on 1 shard(s)" in ready
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b"WATCHDOG=1" not in seen:
            seen.append(sock.recv(4096))
        assert b"WATCHDOG=1" in seen
    finally:
        assert stop_supervisor(sp) == 0, sp.log_tail()
    rest = []
    sock.settimeout(1)
    try:
        while True:
            rest.append(sock.recv(4096))
    except TimeoutError:
        pass
    sock.close()
    assert b"STOPPING=1" in rest


async def test_redis_outage_does_not_stop_calls(sup, seg, redis_srv, sub):
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
        redis_srv.pause()  # port open, nothing answers: timeouts, the worst kind of outage
        try:
            pc = await caller()
            r = await create(http, token, pc)
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
            slot = seg.slot(0)
            await wait_until(lambda: slot.counters.get("rx_packets") > 20, what="caller RTP during outage")
            info = await http.get(f"/v1/sessions/{sid}", headers=auth)
            assert info.status_code == 200 and info.json()["state"] in ("connecting", "active")
        finally:
            redis_srv.resume()
        # the supervisor catches up: the record reaches Redis once it answers again
        import redis as redis_sync

        client = redis_sync.Redis.from_url(redis_srv.url, socket_timeout=2, socket_connect_timeout=2)
        await wait_until(lambda: client.exists(f"va:session:{sid}"), what="record written after outage")
        client.close()
        assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        await pc.close()


async def test_box_loss_resume_on_another_box(tmp_path, redis_srv, janus, sub):
    from shm.segment import cleanup_stale
    from tests.supervisor.conftest import rtp_base

    box_a = start_supervisor(tmp_path / "a", redis_srv.url, janus, rtp_port_min=rtp_base() + 8000)
    keys = {"jwt_public_key_file": str(tmp_path / "a" / "keys" / "jwt-public.pem"),
            "jwt_private_key_file": str(tmp_path / "a" / "keys" / "jwt-private.pem")}  # one fleet, one key
    box_b = start_supervisor(tmp_path / "b", redis_srv.url, janus, rtp_port_min=rtp_base() + 8100,
                             extra={"auth": keys})
    token = box_a.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            pc = await caller()
            r = await http.post(box_a.api + "/v1/sessions", headers=auth,
                                json={"type": "offer", "sdp": pc.localDescription.sdp, "voice": "Puck"})
            assert r.status_code == 201, r.text
            sid, resume = r.json()["session_id"], r.json()["resume_token"]
            await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
            a_workers = _children(box_a.proc.pid)
            kill_box(box_a)  # the box is gone: no teardown, no state update
            await wait_until(lambda: all(gone(p) for p in a_workers), what="box A workers gone")
            await pc.close()

            pc2 = await caller()
            r2 = await http.post(box_b.api + "/v1/sessions", headers=auth, json={
                "type": "offer", "sdp": pc2.localDescription.sdp, "resume_token": resume})
            assert r2.status_code == 201, (r2.text, box_b.log_tail())
            # the session continues under an id that names box B; the response links the old one
            new_sid = r2.json()["session_id"]
            assert new_sid.startswith(box_b.instance + ".") and r2.json()["resumed_from"] == sid
            await pc2.setRemoteDescription(RTCSessionDescription(r2.json()["sdp"], "answer"))
            old = await http.get(f"{box_b.api}/v1/sessions/{sid}", headers=auth)
            assert old.status_code == 404 and old.json()["error"] == "wrong_box", old.text
            sid = new_sid
            seg_b = ShardSegment.attach(segment_name(box_b.instance, 0))
            try:
                slot = seg_b.slot(0)
                info = slot.snapshot()
                assert info is not None and info.session_id == sid and info.options.get("voice") == "Puck"
                await wait_until(lambda: slot.counters.get("rx_packets") > 20, what="RTP on box B")
            finally:
                seg_b.close()
            got = await http.get(f"{box_b.api}/v1/sessions/{sid}", headers=auth)
            assert got.json()["state"] == "active"
            assert (await http.delete(f"{box_b.api}/v1/sessions/{sid}", headers=auth)).status_code == 204
            await pc2.close()
    finally:
        stop_supervisor(box_b)
        if box_a.proc.poll() is None:
            box_a.proc.kill()
        cleanup_stale(box_a.instance)


async def test_janus_down_gives_502_and_frees_the_slot(tmp_path, redis_srv, janus, sub):
    from tests.harness.redis import free_port

    dead = f"http://127.0.0.1:{free_port()}/janus"
    # also a production-like auth config: public key only, so no dev token endpoint
    sp = start_supervisor(tmp_path, redis_srv.url, janus,
                          extra={"janus": {"url": dead}, "auth": {"jwt_private_key_file": ""}})
    try:
        async with httpx.AsyncClient(base_url=sp.api, timeout=30) as http:
            assert (await http.post("/dev/token")).status_code == 404
            assert (await http.get("/")).status_code == 200  # the page itself stays (api.demo_page)
            for _ in range(2):  # twice: the first failure must not leak the only slot
                pc = await caller()
                r = await create(http, sp.token(sub), pc)
                await pc.close()
                assert r.status_code == 502 and r.json()["error"] == "upstream", r.text
            assert agent(sp) == "up 100%\n"
            assert 'va_admissions_total{result="error"} 2.0' in metrics(sp)
    finally:
        assert stop_supervisor(sp) == 0, sp.log_tail()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (FileNotFoundError, IndexError, ValueError):
                continue
    return out


async def test_sigterm_drains_live_calls_before_stopping(tmp_path, redis_srv, janus, sub):
    sp = start_supervisor(tmp_path, redis_srv.url, janus, slots=2,
                          extra={"api": {"drain_timeout_seconds": 60}})
    token = sp.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=sp.api, timeout=20) as http:
            pc = await caller()
            r = await create(http, token, pc)
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
            sp.proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: agent(sp) == "drain\n", what="draining")
            pc2 = await caller()
            assert (await create(http, token, pc2)).status_code == 503  # no new calls
            await pc2.close()
            await asyncio.sleep(1.0)
            assert sp.proc.poll() is None  # the live call keeps the box up (drain timeout 60 s)
            assert (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()["state"] == "active"
            t0 = time.monotonic()
            assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
            await wait_until(lambda: sp.proc.poll() is not None, limit=10, what="exit after the last call")
            assert sp.proc.returncode == 0 and time.monotonic() - t0 < 20, sp.log_tail()  # not the 60 s
            await pc.close()
    finally:
        stop_supervisor(sp)


def test_sigterm_stops_workers_and_removes_segments(tmp_path, redis_srv, janus):
    sp = start_supervisor(tmp_path, redis_srv.url, janus)
    try:
        seg = ShardSegment.attach(segment_name(sp.instance, 0))
        deadline = time.monotonic() + 30
        media = None
        while time.monotonic() < deadline and media is None:
            pid, age = seg.heartbeat_age("media")
            media = pid if pid and age is not None and age < 1 else None
            time.sleep(0.1)
        seg.close()
        assert media, sp.log_tail()
        workers = _children(sp.proc.pid)
        assert media in workers
    finally:
        rc = stop_supervisor(sp)
    assert rc == 0, sp.log_tail()
    assert all(gone(p) for p in workers)
    assert not Path(f"/dev/shm{segment_name(sp.instance, 0)}").exists()


# -- the demo page ----------------------------------------------------------------------------------
def test_demo_page_and_dev_token(sup):
    from appliance.auth import JwtVerifier
    from appliance.config import load_config

    with urllib.request.urlopen(sup.api + "/", timeout=5) as r:
        html = r.read().decode()
    assert '<button id="call"' in html and "/static/demo.js" in html
    with urllib.request.urlopen(sup.api + "/static/demo.js", timeout=5) as r:
        js = r.read().decode()
    assert "jitterBufferTarget" in js and "/v1/sessions" in js
    req = urllib.request.Request(sup.api + "/dev/token", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        token = __import__("json").loads(r.read())["token"]
    principal = JwtVerifier.from_config(load_config(sup.config, env={}).auth).verify(token)
    assert principal.sub.startswith("demo-")  # each dev token its own sub




@pytest.mark.skipif(not (NODE_MODULES / "playwright-core").exists(), reason="npm install in tests/e2e first")
async def test_demo_page_call_in_chromium(sup, seg):
    import json
    import subprocess

    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    proc = await asyncio.create_subprocess_exec(
        "node", str(DEMO_CALL), sup.api + "/", "4000",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, (await proc.stderr.read()).decode()[-3000:] + sup.log_tail()
        connected = json.loads(line)
        assert connected["event"] == "connected" and 40 <= connected["jitterBufferTarget"] <= 60
        slot = seg.slot(0)
        info = slot.snapshot()
        assert info is not None and info.session_id == connected["session_id"]
        # Chromium's fake microphone reaches the media worker through Janus
        await wait_until(lambda: slot.counters.get("rx_packets") > 50, what="browser RTP at the worker")
        heard = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert heard["event"] == "heard"
        hung = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert hung["event"] == "hungup"
        # the page swapped its session token (60 s, refreshable at once) and hung up with the new one
        assert hung["refreshes"] >= 1 and hung["deleted"] == 204, hung
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await wait_until(lambda: slot.state == SlotState.FREE, what="slot freed after hang-up")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_drain_cli_force_migrates_calls_to_another_box(tmp_path, redis_srv, janus, sub):
    """`voice-appliance drain --wait --timeout 1 --migrate` on box A with a call up: after the wait the
    call is told to move (``migrating`` + a fresh token, shown to its owner only), the caller resumes on
    box B, A ends its leg on its own (ownership lost), and the CLI returns 0 with A empty."""
    import subprocess
    import sys

    from tests.supervisor.conftest import rtp_base

    box_a = start_supervisor(tmp_path / "a", redis_srv.url, janus, rtp_port_min=rtp_base() + 8200)
    keys = {"jwt_public_key_file": str(tmp_path / "a" / "keys" / "jwt-public.pem"),
            "jwt_private_key_file": str(tmp_path / "a" / "keys" / "jwt-private.pem")}
    box_b = start_supervisor(tmp_path / "b", redis_srv.url, janus, rtp_port_min=rtp_base() + 8300,
                             extra={"auth": keys})
    auth = {"Authorization": f"Bearer {box_a.token(sub)}"}
    drain = None
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            pc = await caller()
            r = await http.post(box_a.api + "/v1/sessions", headers=auth,
                                json={"type": "offer", "sdp": pc.localDescription.sdp, "voice": "Puck"})
            assert r.status_code == 201, r.text
            sid, first_token = r.json()["session_id"], r.json()["resume_token"]
            await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
            drain = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "appliance", "drain", "--config", str(box_a.config), "--wait",
                "--timeout", "1", "--migrate", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            await wait_until(lambda: agent(box_a) == "drain\n", what="box A draining")

            async def migrating():
                got = await http.get(f"{box_a.api}/v1/sessions/{sid}", headers=auth)
                return got.json() if got.json().get("state") == "migrating" else None

            info = await wait_until(migrating, what="state migrating")
            fresh = info["details"]["resume_token"]
            assert fresh != first_token
            eve = await http.get(f"{box_a.api}/v1/sessions/{sid}",
                                 headers={"Authorization": f"Bearer {box_a.token('eve')}"})
            assert eve.status_code == 404 and fresh not in eve.text  # only the owner sees the token
            pc2 = await caller()
            r2 = await http.post(box_b.api + "/v1/sessions", headers=auth, json={
                "type": "offer", "sdp": pc2.localDescription.sdp, "resume_token": fresh})
            assert r2.status_code == 201, (r2.text, box_b.log_tail())
            new_sid = r2.json()["session_id"]
            assert r2.json()["resumed_from"] == sid and new_sid.startswith(box_b.instance + ".")
            await pc2.setRemoteDescription(RTCSessionDescription(r2.json()["sdp"], "answer"))
            out, err = await asyncio.wait_for(drain.communicate(), 60)
            assert drain.returncode == 0, (out, err, box_a.log_tail())
            assert '"active": 0' in out.decode()
            moved = (await http.get(f"{box_a.api}/v1/sessions/{sid}", headers=auth)).json()
            assert moved["state"] == "moved" and moved["details"]["moved_to"] == new_sid
            assert "taken over by another box" in box_a.log.read_text()  # A learnt it and ended the leg
            for spent in (first_token, fresh):  # neither token resumes anything again
                pc3 = await caller()
                r3 = await http.post(box_b.api + "/v1/sessions", headers=auth, json={
                    "type": "offer", "sdp": pc3.localDescription.sdp, "resume_token": spent})
                assert r3.status_code == 400 and r3.json()["error"] == "invalid_resume", r3.text
                await pc3.close()
            assert (await http.delete(f"{box_b.api}/v1/sessions/{new_sid}", headers=auth)).status_code == 204
            await pc.close()
            await pc2.close()
    finally:
        if drain is not None and drain.returncode is None:
            drain.kill()
            await drain.wait()
        stop_supervisor(box_b)
        stop_supervisor(box_a)


async def test_demo_page_resumes_by_itself_when_told_to_migrate(tmp_path, redis_srv, janus):
    """The demo page in Chromium sees ``migrating`` (force-migrate over the control socket), re-offers
    with the fresh token through its own origin, retries while every box refuses (503: this one is
    draining), and is connected again once a box takes it (here: the same box, undrained)."""
    import json
    import subprocess

    from appliance.config import load_config
    from appliance.control import request, socket_path

    sp = start_supervisor(tmp_path, redis_srv.url, janus, slots=2)
    ctl = socket_path(load_config(sp.config))
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    proc = await asyncio.create_subprocess_exec(
        "node", str(Path(__file__).with_name("demo_resume.js")), sp.api + "/",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 90)
        assert line, (await proc.stderr.read()).decode()[-3000:] + sp.log_tail()
        connected = json.loads(line)
        assert (await request(ctl, "drain"))["draining"]
        status = await request(ctl, "migrate")
        assert status["migrating"] == 1 and status["active"] == 1
        await asyncio.sleep(2.5)  # the page polls, sees migrating, and is refused (draining) meanwhile
        assert (await request(ctl, "undrain"))["draining"] is False
        line = await asyncio.wait_for(proc.stdout.readline(), 90)
        assert line, (await proc.stderr.read()).decode()[-3000:] + sp.log_tail()
        resumed = json.loads(line)
        assert resumed["event"] == "resumed" and resumed["resumes"] == 1
        assert resumed["session_id"] == connected["session_id"]  # same box: the id stays
        async def one_call() -> bool:  # the old leg's slot is freed 0.3 s after its teardown
            status = await request(ctl, "status")
            return status["migrating"] == 0 and status["active"] == 1

        await wait_until(one_call, what="old leg gone, one call left")
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["event"] == "hungup"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stop_supervisor(sp)


async def test_agent_check_and_metrics_listen_on_the_private_host(tmp_path, redis_srv, janus):
    """``api.private_host`` is where the load balancer's agent check and /metrics are served (not the
    API's address); the agent keeps saying free capacity, and ``drain`` while draining."""
    import socket

    from appliance.config import load_config
    from appliance.control import request, socket_path

    sp = start_supervisor(tmp_path, redis_srv.url, janus, slots=2,
                          extra={"api": {"private_host": "127.0.0.3"}})
    try:
        def ask(host: str) -> str:
            with socket.create_connection((host, sp.agent_port), 5) as s:
                return s.recv(100).decode()

        assert ask("127.0.0.3") == "up 100%\n"
        ctl = socket_path(load_config(sp.config))
        # a fresh process (e.g. after an upgrade) never said drain: an explicit undrain still says ready,
        # or HAProxy would keep the drain it remembers from the previous process
        await request(ctl, "undrain")
        assert ask("127.0.0.3") == "ready up 100%\n"
        with pytest.raises(ConnectionRefusedError):
            ask("127.0.0.1")
        async with httpx.AsyncClient(timeout=5) as http:
            assert "va_sessions_capacity" in (await http.get(f"http://127.0.0.3:{sp.metrics_port}/metrics")).text
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{sp.metrics_port}/metrics")
        await request(ctl, "drain")
        assert ask("127.0.0.3") == "drain\n"
        await request(ctl, "undrain")
        assert ask("127.0.0.3") == "ready up 100%\n"
    finally:
        stop_supervisor(sp)


async def test_demo_page_resumes_on_another_box_when_its_box_dies(tmp_path, redis_srv, janus):
    """Two boxes behind a real HAProxy (http mode, /v1/sessions/<box>.… routed to that box, new calls to
    the first box up). The demo page calls, its box is SIGKILLed; the page notices (polls fail), re-offers
    with its resume token through the same origin and is connected again on the other box, under a
    session id that names it."""
    import json
    import shutil
    import subprocess

    from tests.harness.redis import free_port
    from tests.supervisor.conftest import rtp_base

    box_a = start_supervisor(tmp_path / "a", redis_srv.url, janus, rtp_port_min=rtp_base() + 8400)
    keys = {"jwt_public_key_file": str(tmp_path / "a" / "keys" / "jwt-public.pem"),
            "jwt_private_key_file": str(tmp_path / "a" / "keys" / "jwt-private.pem")}
    box_b = start_supervisor(tmp_path / "b", redis_srv.url, janus, rtp_port_min=rtp_base() + 8500,
                             extra={"auth": keys})
    lb_port = free_port()
    pa, pb = (int(b.api.rsplit(":", 1)[1]) for b in (box_a, box_b))
    srv = "check inter 300ms fall 2 rise 2"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
defaults
  mode http
  timeout check 1s
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{lb_port}
  option forwardfor
  use_backend be_a if {{ path_beg /v1/sessions/{box_a.instance}. }}
  use_backend be_b if {{ path_beg /v1/sessions/{box_b.instance}. }}
  default_backend be_all
backend be_all
  balance first
  option httpchk GET /readyz
  server a 127.0.0.1:{pa} {srv}
  server b 127.0.0.1:{pb} {srv}
backend be_a
  option httpchk GET /readyz
  server a 127.0.0.1:{pa} {srv}
backend be_b
  option httpchk GET /readyz
  server b 127.0.0.1:{pb} {srv}
""")
    lb = await asyncio.create_subprocess_exec(shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f",
                                              str(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    proc = None
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            async def lb_up() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{lb_port}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(lb_up, what="HAProxy up")
        proc = await asyncio.create_subprocess_exec(
            "node", str(Path(__file__).with_name("demo_resume.js")), f"http://127.0.0.1:{lb_port}/",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        line = await asyncio.wait_for(proc.stdout.readline(), 90)
        assert line, (await proc.stderr.read()).decode()[-3000:] + box_a.log_tail()
        connected = json.loads(line)
        # "first" balancing takes box A unless a slow health check just took it out: either way
        dead, alive = (box_a, box_b) if connected["session_id"].startswith(box_a.instance + ".") \
            else (box_b, box_a)
        assert connected["session_id"].startswith(dead.instance + ".")
        kill_box(dead)  # the box dies with the call up: no teardown, no state update
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line, (await proc.stderr.read()).decode()[-3000:] + alive.log_tail()
        resumed = json.loads(line)
        assert resumed["event"] == "resumed" and resumed["resumes"] == 1
        assert resumed["session_id"].startswith(alive.instance + ".")
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["event"] == "hungup"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        lb.terminate()
        await asyncio.wait_for(lb.wait(), 10)
        from shm.segment import cleanup_stale

        for box in (box_a, box_b):
            if box.proc.poll() is None:
                stop_supervisor(box)
            else:
                cleanup_stale(box.instance)
