"""Hostile input straight into a media session's packet path: whatever arrives from Janus's address
(random bytes, RTP headers with garbage Opus, DTMF garbage, sequence/timestamp/SSRC jumps), the session
never raises, keeps writing one uplink frame per tick, and counts what it dropped.
``VA_FUZZ_EXAMPLES=20000`` runs it longer on demand."""

from __future__ import annotations

import os
import secrets
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import MediaConfig
from shm.segment import ShardSegment, ring_bytes
from tests.media.conftest import free_port_pair
from workers.media.worker import MediaSession

REMOTE = ("127.0.0.1", 9)

_header = st.builds(
    lambda b0, pt, seq, ts, ssrc: struct.pack("!BBHII", b0, pt, seq, ts, ssrc),
    st.sampled_from([0x80, 0x90, 0xA0, 0xB1, 0x81, 0x8F, 0x40, 0x00]),
    st.sampled_from([111, 111, 111, 101, 0xEF, 96, 200]),
    st.integers(0, 65535), st.integers(0, 2**32 - 1), st.sampled_from([1, 1, 1, 2, 0xFFFFFFFF]),
)
_packet = st.one_of(
    st.binary(max_size=64),
    st.tuples(_header, st.binary(max_size=300)).map(lambda t: t[0] + t[1]),
    st.tuples(_header, st.sampled_from([b"\x78", b"\xf8\xff\xfe", b"\x03\x00", b"\xff" * 9])).map(
        lambda t: t[0] + t[1]),
)


@settings(max_examples=int(os.environ.get("VA_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_packet, min_size=1, max_size=40))
def test_session_survives_any_packet_sequence(packets: list[bytes]) -> None:
    iid = "fz" + secrets.token_hex(4)
    up, down = ring_bytes(2000, 2000)
    seg = ShardSegment.create(f"/va-{iid}-s0", slots=1, uplink_bytes=up, downlink_bytes=down, instance_id=iid)
    try:
        slot = seg.slot(0)
        slot.activate(session_id="fuzz", local_rtp_port=free_port_pair(), remote_rtp_ip=REMOTE[0],
                      remote_rtp_port=REMOTE[1], payload_type=111, channels=2, dtmf_payload_type=101,
                      mode="direct")
        info = slot.snapshot()
        assert info is not None
        sess = MediaSession(slot, info, MediaConfig(), "127.0.0.1")
        try:
            now = 10**12
            for i, p in enumerate(packets):
                sess.on_rtp(memoryview(p), REMOTE, now + i * 20_000_000)
                sess.tick_uplink()
                sess.tick_downlink(i)
            c = slot.counters.snapshot()
            # every packet is counted once on arrival; one that passed the checks but fails to decode
            # later is also counted as invalid (and concealed)
            assert c["rx_packets"] + c["rx_dropped"] <= len(packets)
            assert c["rx_invalid"] <= len(packets) + c["rx_packets"]
            if sess.uplink_started:
                assert slot.uplink.available() % 640 == 0 and c["frames_up"] >= 1
        finally:
            sess.close()
    finally:
        seg.close()
        seg.unlink()
