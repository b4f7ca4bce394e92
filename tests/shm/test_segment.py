"""Segment lifecycle, header validation, slot table, control block fields, events, counters."""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib

import numpy as np
import posix_ipc
import pytest

from shm import atomic
from shm import layout as L
from shm.ring import RingClosedError, RingCorruptError
from shm.segment import (
    AI_COUNTERS,
    MEDIA_COUNTERS,
    EventCode,
    ShardSegment,
    ShmError,
    SlotState,
    cleanup_stale,
    local_rtp_port,
    ring_bytes,
    segment_name,
)
from tests.harness.shm import activate_slot, shard_segment, unique_instance_id


def _raw(name: str) -> tuple[mmap.mmap, memoryview]:


    shm = posix_ipc.SharedMemory(name, 0)
    mm = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    return mm, memoryview(mm)


def test_segment_name_and_helpers() -> None:
    assert segment_name("box1", 3) == "/va-box1-s3"
    with pytest.raises(ShmError, match="instance id"):
        segment_name("bad/id", 0)
    with pytest.raises(ShmError, match="shard"):
        segment_name("ok", -1)
    assert ring_bytes(2000, 8000) == (64000, 384000)
    assert local_rtp_port(40000, 1, 64, 3) == 40000 + 2 * (64 + 3)


def test_create_attach_sizes_and_header(seg: ShardSegment) -> None:
    assert seg.n_slots == 4
    assert seg.uplink_bytes == 65536 and seg.downlink_bytes == 524288  # rounded to powers of two
    w = ShardSegment.attach(seg.name)
    try:
        assert (w.n_slots, w.uplink_bytes, w.downlink_bytes) == (4, 65536, 524288)
        assert w.instance_id == seg.instance_id and w.creator_pid == os.getpid()
        assert os.path.exists("/dev/shm" + seg.name)
    finally:
        w.close()


def test_create_twice_and_attach_missing() -> None:
    with shard_segment() as seg:
        with pytest.raises(ShmError, match=f"segment {seg.name} already exists"):
            ShardSegment.create(seg.name, slots=1, uplink_bytes=4096, downlink_bytes=4096,
                                instance_id=seg.instance_id)
    with pytest.raises(ShmError, match=f"segment {seg.name} does not exist"):
        ShardSegment.attach(seg.name)


@pytest.mark.parametrize(
    "bad", [{"slots": 0}, {"slots": 5000}, {"uplink_bytes": 10}, {"downlink_bytes": 1 << 30}]
)
def test_create_rejects_out_of_range(bad: dict[str, int]) -> None:
    iid = unique_instance_id()
    kw = {"slots": 2, "uplink_bytes": 4096, "downlink_bytes": 4096} | bad
    with pytest.raises(ShmError, match=f"segment /va-{iid}-s0"):
        ShardSegment.create(segment_name(iid, 0), instance_id=iid, **kw)
    assert cleanup_stale(iid) == []


def _corrupt(seg: ShardSegment, offset: int, data: bytes, *, fix_crc: bool) -> None:
    mm, mv = _raw(seg.name)
    mv[offset:offset + len(data)] = data
    if fix_crc:
        mv[L.H_CRC:L.H_CRC + 4] = struct.pack("<I", zlib.crc32(mv[0:L.H_CRC_COVERS]))
    mv.release()
    mm.close()


@pytest.mark.parametrize(
    ("offset", "data", "fix_crc", "message"),
    [
        (L.H_MAGIC, b"GARBAGE!", False, "bad magic"),
        (L.H_VERSION, struct.pack("<I", 99), False,
         f"layout version 99, this build speaks {L.LAYOUT_VERSION}"),
        (L.H_INSTANCE, b"evil", False, "header checksum mismatch"),
        (L.H_NSLOTS, struct.pack("<I", 9), True, "sizes inconsistent"),
        (L.H_NSLOTS, struct.pack("<I", 0), True, "slot count 0 out of range"),
        (L.H_UPLINK, struct.pack("<Q", 5000), True, "uplink ring size 5000 invalid"),
        (L.H_TOTAL, struct.pack("<Q", 1 << 40), True, "sizes inconsistent"),
    ],
)
def test_corrupt_header_is_a_clear_error(offset: int, data: bytes, fix_crc: bool, message: str) -> None:
    with shard_segment(slots=2, uplink_bytes=4096, downlink_bytes=4096) as seg:
        _corrupt(seg, offset, data, fix_crc=fix_crc)
        with pytest.raises(ShmError, match=f"segment {seg.name}: .*{message}"):
            ShardSegment.attach(seg.name)


def test_truncated_segment_is_a_clear_error() -> None:
    iid = unique_instance_id()
    name = segment_name(iid, 0)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=100)
    shm.close_fd()
    try:
        with pytest.raises(ShmError, match=f"segment {name}: 100 bytes is smaller than the header"):
            ShardSegment.attach(name)
    finally:
        cleanup_stale(iid)


def test_cleanup_stale_only_touches_its_own_instance() -> None:
    iid = unique_instance_id()
    other = iid + "-b"  # same prefix, different instance
    segs = [ShardSegment.create(segment_name(i, s), slots=1, uplink_bytes=4096, downlink_bytes=4096,
                                instance_id=i) for i, s in ((iid, 0), (iid, 1), (other, 0))]
    for s in segs:
        s.close()
    tricky = f"{iid}-s1"  # an instance whose name looks like one of iid's segments
    mine, theirs = f"/dev/shm/va-{iid}-s0-ai3-g7.journal", f"/dev/shm/va-{tricky}-s0-ai3-g7.journal"
    for path in (mine, theirs):
        open(path, "wb").close()
    try:
        assert cleanup_stale(iid) == sorted([segment_name(iid, 0), segment_name(iid, 1)])
        assert not os.path.exists(f"/dev/shm/va-{iid}-s0") and not os.path.exists(mine)
        assert os.path.exists(f"/dev/shm/va-{other}-s0") and os.path.exists(theirs)
    finally:
        assert cleanup_stale(other) == [segment_name(other, 0)]
        assert cleanup_stale(tricky) == [] and not os.path.exists(theirs)


def test_activate_fields_roundtrip_across_attach(seg: ShardSegment) -> None:
    slot = seg.slot(2)
    assert slot.state is SlotState.FREE and slot.snapshot() is None
    gen = activate_slot(slot, session_id="s-42", local_rtp_port=40004, remote_rtp_ip="::1",
                        remote_rtp_port=5004, payload_type=96, channels=1, dtmf_payload_type=-1,
                        mode="room", options={"voice": "Kore", "system": "ü" * 100})
    w = ShardSegment.attach(seg.name)
    try:
        ws = w.slot(2)
        info = ws.snapshot()
        assert info is not None
        assert (info.index, info.generation, info.session_id, info.local_rtp_port) == (2, gen, "s-42", 40004)
        assert (info.remote_rtp_ip, info.remote_rtp_port, info.payload_type) == ("::1", 5004, 96)
        assert (info.channels, info.dtmf_payload_type, info.mode) == (1, -1, "room")
        assert info.options == {"voice": "Kore", "system": "ü" * 100}
        assert ws.session_id == "s-42" and ws.mode == "room" and ws.payload_type == 96
        assert [i.index for i in w.active()] == [2]
        slot.remote_rtp_ip = "127.0.0.5"
        slot.remote_rtp_port = 6000
        assert (ws.remote_rtp_ip, ws.remote_rtp_port) == ("127.0.0.5", 6000)
        assert ws.remote() == ("127.0.0.5", 6000)
        slot.set_remote("", 0)
        assert ws.remote() == ("", 0)
        ws.resume_handle = "handle-" + "x" * 1000
        ws.model_state = "live"
        ws.transcript = "caller: hello"
        assert slot.resume_handle == "handle-" + "x" * 1000
        assert (slot.model_state, slot.transcript) == ("live", "caller: hello")
    finally:
        w.close()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("session_id", "", "session_id"),
        ("session_id", "x" * 65, "session_id"),
        ("local_rtp_port", 0, "local_rtp_port"),
        ("remote_rtp_port", 70000, "remote_rtp_port"),
        ("payload_type", 128, "payload_type"),
        ("channels", 3, "channels"),
        ("dtmf_payload_type", -2, "dtmf_payload_type"),
        ("mode", "conference", "mode"),
        ("remote_rtp_ip", "not-an-ip", "remote_rtp_ip"),
        ("options", {"big": "x" * 3000}, "options JSON"),
        ("options", {"bad": object()}, "not JSON"),
    ],
)
def test_activate_rejects_bad_values(seg: ShardSegment, field: str, value: object, message: str) -> None:
    slot = seg.slot(0)
    with pytest.raises(ShmError, match=f"segment {seg.name} slot 0: .*{message}"):
        activate_slot(slot, **{field: value})
    assert slot.state is SlotState.FREE and slot.generation == 0  # nothing published


def test_string_limits(seg: ShardSegment) -> None:
    slot = seg.slot(0)
    activate_slot(slot)
    with pytest.raises(ShmError, match="resume_handle"):
        slot.resume_handle = "x" * 1025
    with pytest.raises(ShmError, match="model_state"):
        slot.model_state = "x" * 33
    slot.transcript = "a" * 400 + "ü" * 200  # 800 bytes: the tail is kept on a UTF-8 boundary
    t = slot.transcript
    assert t.endswith("ü" * 200) and len(t.encode()) <= 512
    with pytest.raises(ShmError, match="remote_rtp_port"):
        slot.remote_rtp_port = -1


@pytest.mark.parametrize("plain", [True, False], ids=["tso-plain", "patomic"])
def test_generation_guard_and_state_machine(seg: ShardSegment, plain: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "PLAIN_ORDERED", plain and atomic.PLAIN_ORDERED)
    sup = seg.slot(1)
    w = ShardSegment.attach(seg.name)
    try:
        worker = w.slot(1)
        g1 = activate_slot(sup, session_id="first")
        assert worker.is_current(g1) and worker.state is SlotState.ACTIVE
        with pytest.raises(ShmError, match="cannot activate, state is ACTIVE"):
            activate_slot(sup)
        sup.begin_close()
        assert worker.state is SlotState.CLOSING and not worker.is_current(g1)
        assert worker.snapshot() is None
        sup.free()
        g2 = activate_slot(sup, session_id="second")
        assert g2 == g1 + 1
        assert not worker.is_current(g1) and worker.is_current(g2)
        info = worker.snapshot()
        assert info is not None and (info.session_id, info.generation) == ("second", g2)
    finally:
        w.close()


def test_activate_resets_rings_counters_events(seg: ShardSegment) -> None:
    slot = seg.slot(0)
    activate_slot(slot, options={"resume_handle": "abc"})
    assert slot.resume_handle == "abc"
    slot.uplink.write(b"\1" * 640)
    slot.downlink.write(b"\2" * 960)
    slot.counters.add("rx_packets", 5)
    slot.push_event(EventCode.DTMF, 3)
    slot.transcript = "old"
    slot.begin_close()
    slot.free()
    activate_slot(slot)
    assert slot.uplink.available() == 0 and slot.downlink.available() == 0
    assert slot.uplink.stats()["written"] == 0 and slot.counters.get("rx_packets") == 0
    assert slot.pop_events() == [] and slot.transcript == "" and slot.resume_handle == ""


def test_playback_hold_words_one_writer_each_and_reset_on_activate(seg: ShardSegment) -> None:
    slot = seg.slot(1)
    activate_slot(slot)
    other = ShardSegment.attach(seg.name)  # the AI worker's own mapping
    try:
        ai = other.slot(1)
        assert slot.hold_words() == (0, 0) and slot.protect_until == 0
        seq = slot.request_hold()  # media worker pauses
        assert seq == 1 and ai.hold_words() == (1, 0)  # held: the words differ
        ai.protect_until = 48000
        ai.release_hold(seq)
        assert slot.hold_words() == (1, 1) and slot.protect_until == 48000
        assert slot.request_hold() == 2 and ai.hold_words() == (2, 1)
        slot.begin_close()
        slot.free()
        activate_slot(slot)  # a reused slot never starts held or protected
        assert ai.hold_words() == (0, 0) and ai.protect_until == 0
    finally:
        other.close()


def test_counters(seg: ShardSegment) -> None:
    slot = seg.slot(3)
    other = ShardSegment.attach(seg.name)
    try:
        slot.counters.add("rx_packets")
        slot.counters.add("rx_packets", 9)
        slot.counters.set("jitter_us", 1234)
        slot.counters.add("turns", 2)
        snap = other.slot(3).counters.snapshot()
        assert snap["rx_packets"] == 10 and snap["jitter_us"] == 1234 and snap["turns"] == 2
        assert set(snap) == set(MEDIA_COUNTERS) | set(AI_COUNTERS)
        with pytest.raises(KeyError, match="unknown shm counter 'nope'"):
            slot.counters.add("nope")
    finally:
        other.close()


def test_events_fifo_and_overflow(seg: ShardSegment) -> None:
    slot = seg.slot(0)
    activate_slot(slot)
    w = ShardSegment.attach(seg.name)
    try:
        consumer = w.slot(0)
        assert consumer.pop_events() == []
        for i in range(L.EVENTS_CAP):
            assert slot.push_event(EventCode.DTMF, i)
        assert not slot.push_event(EventCode.DTMF, 999)
        assert slot.events_dropped == 1
        assert consumer.pop_events() == [(EventCode.DTMF, i) for i in range(L.EVENTS_CAP)]
        for rnd in range(3):  # wraps around the 64-entry queue
            assert slot.push_event(EventCode.DTMF_END, -rnd)
            assert consumer.pop_events() == [(2, -rnd)]
    finally:
        w.close()


def test_heartbeats(seg: ShardSegment) -> None:
    w = ShardSegment.attach(seg.name)
    try:
        assert seg.heartbeat_age("media") == (None, None)
        w.heartbeat("media")
        pid, age = seg.heartbeat_age("media")
        assert pid == os.getpid() and age is not None and 0 <= age < 5
        time.sleep(0.05)
        assert seg.heartbeat_age("media")[1] >= 0.05  # type: ignore[operator]
        assert seg.heartbeat_age("ai") == (None, None)
        with pytest.raises(ShmError, match="unknown heartbeat role"):
            w.heartbeat("janus")  # type: ignore[arg-type]
    finally:
        w.close()


def test_use_after_close_raises_instead_of_crashing() -> None:
    with shard_segment(slots=1) as seg:
        slot = seg.slot(0)
        activate_slot(slot)
        ring = slot.uplink
    with pytest.raises(RingClosedError):
        ring.write(b"x" * 640)
    with pytest.raises(RingClosedError):
        ring.read(640)
    with pytest.raises(RingClosedError):
        ring.read_frames(640)
    with pytest.raises(ShmError, match="is closed"):
        slot.remote()
    with pytest.raises(ShmError, match="is closed"):
        _ = slot.state
    with pytest.raises(ShmError, match="is closed"):
        seg.slot(0)
    with pytest.raises(ShmError, match="is closed"):
        slot.push_event(1, 1)
    seg.close()  # idempotent


def test_slot_index_range(seg: ShardSegment) -> None:
    with pytest.raises(ShmError, match=r"slot index 4 out of range 0\.\.3"):
        seg.slot(4)


def test_numpy_frames_roundtrip(seg: ShardSegment) -> None:
    slot = seg.slot(0)
    activate_slot(slot)
    t = np.arange(320) / 16000
    frame = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    assert slot.uplink.write(frame)
    out = np.empty(320, dtype=np.int16)
    assert slot.uplink.read_into(out)
    np.testing.assert_array_equal(out, frame)
    assert slot.uplink.write(frame[::2].copy())
    assert np.array_equal(np.frombuffer(slot.uplink.read(320), np.int16), frame[::2])


def test_corrupt_ring_cursors_raise_instead_of_returning_garbage(seg: ShardSegment) -> None:
    slot = seg.slot(0)
    activate_slot(slot)
    assert slot.uplink.write(b"\1" * 640)
    hdr = L.HEADER_SIZE + L.CB_UPLINK_HDR
    struct.pack_into("<Q", seg._mv, hdr + L.RING_WRITE, 1 << 40)  # a stray write into the header
    with pytest.raises(RingCorruptError, match=rf"ring {seg.name}\[0\]\.uplink: corrupt cursors"):
        slot.uplink.read(640)
    with pytest.raises(ShmError, match="corrupt cursors"):  # RingCorruptError is a ShmError
        slot.uplink.write(b"\1" * 640)
    slot.begin_close()
    slot.free()
    activate_slot(slot)  # re-activation resets the ring
    assert slot.uplink.write(b"\2" * 640) and slot.uplink.read(640) == b"\2" * 640
