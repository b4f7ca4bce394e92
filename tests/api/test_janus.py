"""appliance/janus.py against the REAL Janus 1.1.2 (in its own network namespace, tests.harness.janus).

An aiortc caller in the root namespace reaches Janus over the veth; the "media worker" is a plain UDP
socket on the root side of the veth.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from appliance.janus import AUDIOBRIDGE, NOSIP, JanusClient, JanusError, JanusEvent, plain_rtp_answer
from appliance.sdp import validate_offer
from tests.harness.janus import janus_available, janus_in_netns

pytestmark = [
    pytest.mark.janus,
    pytest.mark.skipif(not janus_available(), reason="needs root, janus and ip (network namespaces)"),
]

# Janus reaps sessions without keepalives after this long (checked every ~2 s). 5 s with 1 s keepalives
# tolerates a ~4 s scheduling stall on a loaded 2-core CI box (3 s did not: a kept session was reaped).
SESSION_TIMEOUT = 5


@pytest.fixture(scope="module")
def janus():
    # reclaim 0 (Janus's default): the timeout event of an idle session reaches its long poll at once;
    # with the appliance's reclaim_session_timeout Janus sends it to the session's first connection,
    # and the client learns of the expiry only from its next poll (up to 30 s later)
    with janus_in_netns(session_timeout=SESSION_TIMEOUT, reclaim_session_timeout=0) as j:
        yield j


def client(j, **kw) -> JanusClient:
    args = {"api_secret": j.api_secret, "admin_url": j.admin_url, "admin_secret": j.admin_secret,
            "keepalive_seconds": 1.0}
    args.update(kw)
    return JanusClient(j.url, **args)


def udp_socket(ip: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    s.setblocking(False)
    return s


async def recv_rtp(sock: socket.socket, wait: float) -> bytes:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(wait):
        return await loop.sock_recv(sock, 2048)


async def caller() -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_nosip_call_setup_media_and_hangup(janus):
    events: list[JanusEvent] = []
    worker = udp_socket(janus.host_ip)
    pc = await caller()
    async with client(janus) as jc:
        session = await jc.create_session(on_event=events.append)
        handle = await session.attach(NOSIP, opaque_id="s_test")
        t0 = time.perf_counter()
        side = await handle.nosip_generate(pc.localDescription.sdp, info="s_test")
        assert side.ip == janus.ns_ip and 30000 <= side.port <= 34999
        assert side.payload_type > 95 and side.channels == 2
        worker_port = worker.getsockname()[1]
        answer = await handle.nosip_process_answer(
            plain_rtp_answer(janus.host_ip, worker_port, side.payload_type, channels=side.channels))
        signalling_ms = (time.perf_counter() - t0) * 1000
        assert "a=setup:" in answer and "opus/48000" in answer
        validate_offer(answer)  # the answer has the WebRTC essentials we require of callers
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        up = await handle.wait_for("webrtcup", 15)
        assert up.handle_id == handle.id and up.session_id == session.id
        # the caller's RTP arrives at the worker port we announced, with the caller's payload type
        packet = await recv_rtp(worker, 10)
        assert packet[0] >> 6 == 2 and packet[1] & 0x7F == side.payload_type
        # trickle is accepted (candidates and end-of-candidates)
        lines = pc.localDescription.sdp.splitlines()
        cand = next(line[2:] for line in lines if line.startswith("a=candidate"))
        await handle.trickle({"candidate": cand, "sdpMid": "0", "sdpMLineIndex": 0})
        await handle.trickle(None)
        await handle.hangup()
        hung = await handle.wait_for("hangup", 10)
        assert hung.reason
        await handle.detach()
        await pc.close()
        assert any(e.kind == "webrtcup" for e in events) and any(e.kind == "hangup" for e in events)
        assert signalling_ms < 2000  # loopback signalling is ~ms; generous for a loaded CI box
    worker.close()


async def test_caller_going_away_gives_hangup(janus):
    pc = await caller()
    async with client(janus) as jc:
        session = await jc.create_session()
        handle = await session.attach(NOSIP)
        side = await handle.nosip_generate(pc.localDescription.sdp)
        answer = await handle.nosip_process_answer(plain_rtp_answer(janus.host_ip, 40998, side.payload_type))
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await handle.wait_for("webrtcup", 15)
        await pc.close()  # DTLS close_notify: Janus tears the PeerConnection down
        assert (await handle.wait_for("hangup", 15)).reason


async def test_audiobridge_room_with_plain_rtp_participant(janus):
    worker = udp_socket(janus.host_ip)
    async with client(janus) as jc:
        session = await jc.create_session()
        handle = await session.attach(AUDIOBRIDGE)
        with pytest.raises(JanusError) as err:
            await handle.audiobridge_create_room(admin_key="wrong-key")
        assert err.value.code != 0 and err.value.reason
        room = await handle.audiobridge_create_room(admin_key=janus.audiobridge_admin_key, prebuffer=2)
        side, participant = await handle.audiobridge_join_rtp(room, janus.host_ip, worker.getsockname()[1])
        assert side.ip == janus.ns_ip and 35000 <= side.port <= 39999 and participant > 0
        other = await session.attach(AUDIOBRIDGE)
        with pytest.raises(JanusError):
            await other.audiobridge_join_rtp(room + 1, janus.host_ip, 40996)  # no such room
        await other.audiobridge_destroy_room(room)
        await other.detach()
        await handle.detach()
    worker.close()


async def test_wrong_secrets_are_clear_errors(janus):
    async with client(janus, api_secret="wrong") as jc:
        with pytest.raises(JanusError) as err:
            await jc.create_session()
        assert err.value.code == 403 and "secret" in err.value.reason
    async with client(janus, admin_secret="wrong") as jc:
        with pytest.raises(JanusError) as err:
            await jc.admin("list_sessions")
        assert err.value.code == 403
    async with client(janus) as jc:
        assert isinstance((await jc.admin("list_sessions"))["sessions"], list)
    unreachable = JanusClient(f"http://{janus.host_ip}:1/janus", request_timeout=1)
    with pytest.raises(JanusError) as err:
        await unreachable.create_session()
    assert "unreachable" in str(err.value) or "Connect" in str(err.value)
    await unreachable.aclose()


async def test_keepalives_keep_sessions_alive(janus):
    async with client(janus) as kept, client(janus, keepalive_seconds=0) as idle:
        a = await kept.create_session()
        b = await idle.create_session()
        hb = await b.attach(NOSIP)
        # Janus reaps b after SESSION_TIMEOUT: it detaches b's handles and sends "timeout", in either
        # order. Timeout first: the handle gets session_lost; detached first: the handle gets "detached"
        # (and is forgotten), then the session closes on the "timeout" event, or, when Janus destroyed the
        # session before that event reached the long poll, on the next poll's "session not found". Either
        # way the owner learns the leg and the session are gone, within seconds.
        async with asyncio.timeout(30):
            while (ev := await hb.next_event()).kind not in ("session_lost", "detached"):
                pass
            await b.closed.wait()
        reason = b.close_reason or ""
        assert ("timed out" in reason or "not found" in reason) and not b.alive, (ev, reason)
        listed = (await kept.admin("list_sessions"))["sessions"]
        assert a.id in listed and b.id not in listed
        assert a.alive and time.monotonic() - a.last_keepalive_ok < SESSION_TIMEOUT
        await a.attach(NOSIP)  # still usable
        with pytest.raises(JanusError):
            await hb.hangup()


async def test_close_without_destroy_leaves_calls_in_janus(janus):
    jc = client(janus)
    session = await jc.create_session()
    await session.attach(NOSIP)
    await jc.aclose(destroy_sessions=False)  # supervisor restarting in place
    async with client(janus) as admin:
        assert session.id in (await admin.admin("list_sessions"))["sessions"]
        handles = (await admin.admin("list_handles", session_id=session.id))["handles"]
        assert len(handles) == 1


async def test_audiobridge_webrtc_caller_joins_room(janus):
    pc = await caller()
    async with client(janus) as jc:
        session = await jc.create_session()
        room_handle = await session.attach(AUDIOBRIDGE)
        room = await room_handle.audiobridge_create_room(admin_key=janus.audiobridge_admin_key)
        worker = udp_socket(janus.host_ip)
        side, _ = await room_handle.audiobridge_join_rtp(room, janus.host_ip, worker.getsockname()[1])
        handle = await session.attach(AUDIOBRIDGE)
        answer = await handle.audiobridge_join_webrtc(room, pc.localDescription.sdp, display="caller")
        assert "opus/48000" in answer and "a=fingerprint" in answer
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await handle.wait_for("webrtcup", 15)
        # the mixer sends to the worker only after the worker's first RTP packet (FACTS)
        rtp = bytes([0x80, side.payload_type, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7]) + b"\xf8\xff\xfe"
        worker.sendto(rtp, (side.ip, side.port))
        packet = await recv_rtp(worker, 10)
        assert packet[0] >> 6 == 2 and packet[1] & 0x7F == side.payload_type
        await pc.close()
        await room_handle.audiobridge_destroy_room(room)
        worker.close()


async def test_janus_dying_gives_session_lost():
    with janus_in_netns() as j:
        async with client(j, session_lost_after=1.0, request_timeout=1.0) as jc:
            session = await jc.create_session()
            handle = await session.attach(NOSIP)
            os.kill(j.pid, signal.SIGKILL)
            lost = await handle.wait_for("session_lost", 15)
            assert lost.reason == "janus unreachable" and not session.alive
            with pytest.raises(JanusError):
                await session.attach(NOSIP)
