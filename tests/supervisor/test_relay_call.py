"""A relay-only call through a real coturn, and expired TURN credentials refused.

Real parts: coturn (``use-auth-secret``), Janus 1.1.2 in its netns, a supervisor process with its media
and AI workers, the Live emulator (echo), and an aiortc caller with ``iceTransportPolicy="relay"``
(aiortc 1.16 / aioice 0.13 honour it: no host or srflx candidates are gathered, only the TURN
allocation's relay candidate, and remote mDNS candidates are ignored).

Addresses (why no ``allow-loopback-peers``): Janus's ICE never uses loopback, so it gathers on its veth
address ``ns_ip``. coturn listens and relays on the root-namespace end of that veth (``host_ip``): the
caller (root namespace) reaches it locally, Janus reaches it over the veth, and the relay's peer is
Janus's ``ns_ip`` — a private address, not loopback — so coturn's default loopback-peer denial stays on.

The caller fetches its ICE servers from ``GET /v1/ice-servers`` *before* making its offer, exactly
what a relay-only browser must do. Proof the media went through the relay: Janus's selected pair
(admin API ``handle_info``) has the caller's side at coturn's relay address, and coturn's log shows
the allocation for that TURN user carrying traffic.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import httpx
import numpy as np
import pytest
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)

from appliance.turn import credential, peer_policy_lines
from tests.harness.audio import speech, write_wav
from tests.harness.coturn import CoturnServer, coturn_server
from tests.harness.janus import JanusInstance
from tests.supervisor.conftest import (
    NODE_MODULES,
    demo_page_call,
    open_call,
    start_supervisor,
    stop_supervisor,
)
from tests.supervisor.rtc import RATE, PcmTrack, Recorder
from tests.supervisor.test_voice_loop import say_and_hear, wait_quiet, wait_until

pytestmark = [pytest.mark.janus, pytest.mark.slow]

TURN_SECRET = "relay-test-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def turn(tmp_path_factory, janus: JanusInstance):
    # the production peer policy: the relay reaches Janus's address and nothing else
    with coturn_server(tmp_path_factory.mktemp("coturn"), TURN_SECRET, listen_ip=janus.host_ip,
                       allow_loopback_peers=False, verbose=True,
                       extra_args=[f"--{ln}" for ln in peer_policy_lines([janus.ns_ip])]) as srv:
        yield srv


@pytest.fixture(scope="module")
def sup(tmp_path_factory, redis_srv, janus, emulator, turn):
    sp = start_supervisor(tmp_path_factory.mktemp("sup"), redis_srv.url, janus, slots=1, extra={
        "model": {"api_key": emulator.api_key, "base_url": emulator.base_url, "ca_file": emulator.ca_file,
                  "max_retries": 5},
        "turn": {"secret": TURN_SECRET, "uris": [turn.uri], "ttl_seconds": 600},
    })
    yield sp
    stop_supervisor(sp)


async def relay_caller(ice_servers: list[dict[str, Any]]) -> tuple[RTCPeerConnection, PcmTrack, Recorder]:
    """An aiortc caller that may only use relay candidates; its offer is made (candidates gathered)."""
    config = RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers],
                              iceTransportPolicy=RTCIceTransportPolicy.RELAY)
    pc = RTCPeerConnection(config)
    track, rec = PcmTrack(), Recorder()
    pc.addTrack(track)
    pc.on("track", rec.attach)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, track, rec


def candidates(sdp: str) -> list[list[str]]:
    return [ln.split()[:8] for ln in sdp.splitlines() if ln.startswith("a=candidate:")]


def in_relay_range(turn: CoturnServer, addr: str) -> bool:
    ip, _, port = addr.rpartition(":")
    return ip == turn.listen_ip and turn.relay_min_port <= int(port) <= turn.relay_max_port


async def janus_selected_pairs(janus: JanusInstance) -> list[str]:
    """Every handle's ICE selected pair, from Janus's admin API."""
    async with httpx.AsyncClient(timeout=5) as http:
        async def admin(path: str, request: str) -> dict[str, Any]:
            body = {"janus": request, "transaction": secrets.token_hex(6), "admin_secret": janus.admin_secret}
            r = await http.post(janus.admin_url + path, json=body)
            return r.json()

        pairs = []
        for sid in (await admin("", "list_sessions")).get("sessions", []):
            for hid in (await admin(f"/{sid}", "list_handles")).get("handles", []):
                info = (await admin(f"/{sid}/{hid}", "handle_info")).get("info", {})
                pair = info.get("webrtc", {}).get("ice", {}).get("selected-pair")
                if pair:
                    pairs.append(pair)
        return pairs


async def test_relay_only_call_hears_its_echo_through_coturn(sup, janus, turn, sub):
    auth = {"Authorization": f"Bearer {sup.token(sub)}"}
    utterance = speech("the relay carries every word of this sentence", RATE)
    async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
        assert (await http.get("/v1/ice-servers")).status_code == 401
        r = await http.get("/v1/ice-servers", headers=auth)
        assert r.status_code == 200, r.text
        servers = r.json()["ice_servers"]
        (turn_entry,) = servers
        assert turn_entry["urls"] == [turn.uri] and r.json()["ttl"] == 600
        turn_user = turn_entry["username"]

        pc, track, rec = await relay_caller(servers)
        try:
            cands = candidates(pc.localDescription.sdp)
            # relay-only: just the TURN allocation on coturn's relay address, nothing else
            assert cands and all(c[7] == "relay" for c in cands), pc.localDescription.sdp
            assert all(in_relay_range(turn, f"{c[4]}:{c[5]}") for c in cands), cands
            sid = await open_call(http, auth, pc, sup, what="relay call up and model live")
            assert pc.connectionState == "connected"

            # Janus's side of the selected pair is the caller's relay candidate on coturn
            pairs = await janus_selected_pairs(janus)
            assert len(pairs) == 1, pairs
            remote = pairs[0].split("<->")[1].split()[0]
            assert "[relay,udp]" in pairs[0] and in_relay_range(turn, remote), pairs[0]
            print(f"Janus selected pair: {pairs[0]}")

            await wait_quiet(rec)
            corr, m2e = await say_and_hear(track, rec, utterance)
            print(f"relay-only call: echo correlation {corr:.2f}, mouth-to-ear {m2e * 1000:.0f} ms")
            assert corr > 0.6
            assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
        finally:
            await rec.stop()
            await pc.close()

    # coturn logs the allocation's traffic when it ends: thousands of relayed packets each way
    def usage() -> tuple[int, int] | None:
        for line in turn.log_path.read_text(errors="replace").splitlines():
            if f"username=<{turn_user}>" in line and "usage:" in line:
                m = re.search(r"rp=(\d+), rb=(\d+), sp=(\d+), sb=(\d+)", line)
                if m:
                    return int(m.group(1)), int(m.group(3))
        return None

    got = await wait_until(usage, limit=15, what="coturn usage line for the call")
    print(f"coturn relayed packets: received {got[0]}, sent {got[1]}")
    assert got[0] > 200 and got[1] > 200, got


async def test_expired_turn_credentials_are_refused(sup, janus, turn, sub):
    expired = credential(TURN_SECRET, "expired-" + secrets.token_hex(3), 600, now=time.time() - 1200)
    servers = [{"urls": [turn.uri], "username": expired.username, "credential": expired.password}]
    auth = {"Authorization": f"Bearer {sup.token(sub)}"}
    pc, _, rec = await relay_caller(servers)
    try:
        # coturn answered the allocation with 401: no relay candidate, and relay-only allows nothing else
        assert candidates(pc.localDescription.sdp) == [], pc.localDescription.sdp
        log = turn.log_path.read_text(errors="replace")
        assert f"Cannot find credentials of user <{expired.username}>" in log, log[-2000:]
        assert re.search(rf"user <{re.escape(expired.username)}>.*(401|Unauthorized)|error 401", log), \
            log[-2000:]
        # the call cannot connect: no candidate pair exists
        async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
            r = await http.post("/v1/sessions", headers=auth,
                                json={"type": "offer", "sdp": pc.localDescription.sdp})
            if r.status_code == 201:
                sid = r.json()["session_id"]
                await pc.setRemoteDescription(RTCSessionDescription(r.json()["sdp"], "answer"))
                # a well-behaved call is up in well under a second here (the fresh-credential test)
                seen = set()
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    info = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
                    seen.add((pc.connectionState, info["state"]))
                    await asyncio.sleep(0.25)
                print(f"expired TURN credentials: (caller, session) states seen {sorted(seen)}")
                assert all(c != "connected" and st != "active" for c, st in seen), seen
                assert await janus_selected_pairs(janus) == []  # Janus never found a working pair
                await http.delete(f"/v1/sessions/{sid}", headers=auth)
            else:  # refusing an offer without candidates up front is fine too
                assert r.status_code == 400, r.text
    finally:
        await rec.stop()
        await pc.close()


@pytest.mark.skipif(not (NODE_MODULES / "playwright-core").exists(), reason="npm install in tests/e2e first")
async def test_demo_page_relay_only_in_chromium(sup, turn, tmp_path):
    """The demo page with ?relay=1: Chromium fetches /v1/ice-servers first and talks only through coturn."""

    wav = tmp_path / "speech.wav"
    write_wav(wav, np.concatenate([speech("hello through the relay", RATE), np.zeros(RATE * 2, np.int16)]),
              RATE)
    before = turn.log_path.read_text(errors="replace")
    await demo_page_call(sup.api + "/?relay=1", 1500, wav, sup.log_tail)
    # the page's TURN user (u_…: the keyed hash of the dev token's sub, from GET /v1/ice-servers) relayed it
    new = turn.log_path.read_text(errors="replace")[len(before):]
    users = set(re.findall(r"username=<(\d+:u_[A-Za-z0-9_-]+)>", new))
    assert users, new[-2000:]

    def relayed() -> int:
        text = turn.log_path.read_text(errors="replace")
        pattern = r"usage: .*?username=<\d+:u_[^>]+>.*?rp=(\d+)"
        return max((int(m.group(1)) for m in re.finditer(pattern, text)), default=0)

    got = await wait_until(lambda: relayed() > 100, limit=15, what="coturn usage line for the demo call")
    assert got
