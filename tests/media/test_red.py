"""RFC 2198 RED end to end below the browser: the payload format (workers/media/red.py), Janus NoSIP
carrying Chromium's RED offer into its plain SDP and our RED answer back into the browser's answer
(real Janus 1.1.2 in a netns), and the media worker recovering lost packets whole from the next
packet's redundant copy (content: no frame concealed, the tone intact)."""

from __future__ import annotations

import random

import pytest

from appliance.janus import NOSIP, JanusClient, parse_plain_sdp, plain_rtp_answer
from shm.segment import ShardSegment
from tests.harness.audio import dominant_frequency, tone
from tests.harness.janus import JanusInstance
from tests.media.conftest import free_port_pair, running_worker
from tests.media.test_worker_loopback import Peer, read_uplink, wait_for
from workers.media.red import RedError, build_red, split_red
from workers.media.rtp import build_rtp

# Chromium 156's audio offer (createOffer with one audio transceiver, captured 2026-12-01; candidates,
# ssrc and msid lines dropped): it offers red/48000/2 as PT 63 carrying Opus 111, and no NACK for audio.
CHROMIUM_OFFER = "\r\n".join([
    "v=0",
    "o=- 4873476409444992083 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "a=extmap-allow-mixed",
    "a=msid-semantic: WMS",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
    "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:N6R5",
    "a=ice-pwd:9pSIO13ONCkYyxau5rkdhL0H",
    "a=ice-options:trickle",
    "a=fingerprint:sha-256 50:06:62:57:28:49:10:FC:35:59:24:D6:67:AD:B8:73:2B:C3:BC:85:31:14:BC:03:67:"
    "90:38:59:14:30:92:A7",
    "a=setup:actpass",
    "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=sendrecv",
    "a=rtcp-mux",
    "a=rtcp-rsize",
    "a=rtcp-xr:rcvr-rtt=all",
    "a=rtpmap:111 opus/48000/2",
    "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtpmap:63 red/48000/2",
    "a=fmtp:63 111/111",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:13 CN/8000",
    "a=rtpmap:110 telephone-event/48000",
    "a=rtpmap:126 telephone-event/8000",
]) + "\r\n"


def test_split_and_build_round_trip() -> None:
    red = build_red(b"primary", [(1920, b"two-back"), (960, b"one-back")], 111)
    assert split_red(red, 111) == (b"primary", [(1920, b"two-back"), (960, b"one-back")])
    assert split_red(build_red(b"only", [], 111), 111) == (b"only", [])
    for bad in (b"", b"\xef\x00", bytes([0x80 | 111, 0, 0x0F, 0xFF]) + b"x", bytes([96]) + b"opus"):
        with pytest.raises(RedError):
            split_red(bad, 111)


def test_sdp_helpers_negotiate_red_only_for_opus() -> None:
    side = parse_plain_sdp(CHROMIUM_OFFER.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP"))
    assert (side.payload_type, side.red_payload_type, side.telephone_event_payload_type) == (111, 63, 110)
    answer = plain_rtp_answer("10.0.0.2", 40000, 111, red_payload_type=63)
    assert "m=audio 40000 RTP/AVP 63 111\r\n" in answer  # RED first: what the browser then sends
    assert "a=fmtp:63 111/111\r\n" in answer
    assert parse_plain_sdp(answer).red_payload_type == 63
    assert "red" not in plain_rtp_answer("10.0.0.2", 40000, 111)  # the default answer stays as it was
    no_red = CHROMIUM_OFFER.replace("a=fmtp:63 111/111", "a=fmtp:63 9/9")  # RED of another codec: not ours
    assert parse_plain_sdp(no_red.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP")).red_payload_type is None


@pytest.mark.janus
async def test_nosip_passes_chromiums_red_both_ways(janus: JanusInstance) -> None:
    async with JanusClient(janus.url, api_secret=janus.api_secret) as client:
        handle = await (await client.create_session()).attach(NOSIP)
        side = await handle.nosip_generate(CHROMIUM_OFFER, info="red")
        assert side.red_payload_type == 63, handle.generated_sdp
        answer = plain_rtp_answer(janus.host_ip, free_port_pair(janus.host_ip), side.payload_type,
                                  red_payload_type=side.red_payload_type)
        jsep = await handle.nosip_process_answer(answer)
    m_line = next(line for line in jsep.splitlines() if line.startswith("m=audio"))
    assert m_line.split()[3:] == ["63", "111"], jsep  # the order a browser picks its send codec by
    assert "a=rtpmap:63 red/48000/2" in jsep and "a=fmtp:63 111/111" in jsep


def _send_red_stream(peer: Peer, port: int, lose: set[int], red: bool) -> None:
    import time

    samples = tone(440, 1.6, 48000)
    prev = b""
    t0 = time.monotonic()
    for i in range(len(samples) // 960):
        payload = peer.enc.encode(samples[i * 960: (i + 1) * 960].tobytes())
        if red:
            red_payload = build_red(payload, [(960, prev)] if prev else [], 111)
            pkt = build_rtp(63, peer.seq, peer.ts, peer.ssrc, red_payload)
        else:
            pkt = build_rtp(111, peer.seq, peer.ts, peer.ssrc, payload)
        prev = payload
        if i not in lose:
            peer.sock.sendto(pkt, ("127.0.0.1", port))
        peer.seq = (peer.seq + 1) & 0xFFFF
        peer.ts = (peer.ts + 960) & 0xFFFFFFFF
        delay = t0 + (i + 1) * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _run(segment: ShardSegment, index: int, lose: set[int], red: bool) -> dict[str, int]:
    peer, port = Peer(), free_port_pair()
    segment.slot(index).activate(session_id=f"red{index}", local_rtp_port=port, remote_rtp_ip=peer.addr[0],
                                 remote_rtp_port=peer.addr[1], payload_type=111, channels=2,
                                 dtmf_payload_type=-1, mode="direct", options={"red_payload_type": 63})
    with running_worker(segment, uplink_processing="off"):
        assert wait_for(lambda: len(peer.recv_all()) > 0)
        _send_red_stream(peer, port, lose, red)
        pcm = read_uplink(segment, index, 70)
        c = segment.slot(index).counters.snapshot()
    peer.close()
    assert c["rx_invalid"] == 0 and c["rx_packets"] == 80 - len(lose)
    assert abs(dominant_frequency(pcm[3200:-3200], 16000) - 440) < 5
    return c


def test_worker_recovers_lost_packets_from_red(segment: ShardSegment) -> None:
    """The same isolated losses with and without RED: with it no frame is rebuilt from FEC (the lost
    frame itself arrives in the next packet) and fewer are concealed (only jitter-buffer stalls while
    that next packet is on its way, which a 20 ms target cannot always hide)."""
    lose = set(random.Random(5).sample(range(5, 75), 8))  # ~10 % isolated losses
    lose = {i for i in lose if i - 1 not in lose and i + 1 not in lose}
    with_red = _run(segment, 0, lose, True)
    without = _run(segment, 1, lose, False)
    assert with_red["fec_recovered"] == 0, with_red
    assert without["concealed"] + without["fec_recovered"] >= len(lose), without
    assert with_red["concealed"] < without["concealed"] + without["fec_recovered"]
