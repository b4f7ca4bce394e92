"""Cross-process consistency of the control block: seqlocked strings and generation-checked snapshots.

A writer process hammers a field while this process reads it; every read must be a value that was
written whole (never a mix of two writes), and a reader must never act on a half-written slot.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize
import struct
import time

import pytest

from shm import layout as L
from shm.segment import ShardSegment, ShmError
from tests.harness.shm import activate_slot, shard_segment

_CTX = mp.get_context("fork")
# Each child hammers until the reader has observed enough (an Event), or this many seconds at most:
# a loaded 2-core CI box can starve either side for seconds, so the test is bounded by observations,
# not by a fixed window.
MAX_SECONDS = 60.0


def _hammer_strings(name: str, stop: mp.synchronize.Event) -> None:
    seg = ShardSegment.attach(name)
    slot = seg.slot(0)
    i = 0
    stop_at = time.monotonic() + MAX_SECONDS
    while not (i % 64 == 0 and (stop.is_set() or time.monotonic() > stop_at)):
        ch = "abcdefgh"[i % 8]
        slot.resume_handle = ch * (100 + 113 * (i % 8))  # 100..891 bytes, length tied to the char
        slot.transcript = ch * (10 + 50 * (i % 8))
        slot.set_remote(f"127.0.0.{1 + i % 8}", 5000 + i % 8)
        i += 1
    seg.close()


def _expected_len(s: str, base: int, step: int) -> int:
    return base + step * "abcdefgh".index(s[0])


def test_seqlocked_strings_are_never_torn() -> None:
    with shard_segment(slots=1) as seg:
        slot = seg.slot(0)
        activate_slot(slot)
        slot.resume_handle = "a" * 100
        slot.transcript = "a" * 10
        slot.set_remote("127.0.0.1", 5000)
        stop = _CTX.Event()
        proc = _CTX.Process(target=_hammer_strings, args=(seg.name, stop))
        proc.start()
        reads = changes = 0
        last = ""
        try:
            while proc.is_alive() and not (reads > 200 and changes > 20):
                h = slot.resume_handle
                assert len(set(h)) == 1 and len(h) == _expected_len(h, 100, 113), (len(h), set(h))
                t = slot.transcript
                assert len(set(t)) == 1 and len(t) == _expected_len(t, 10, 50)
                ip, port = slot.remote_rtp_ip, slot.remote_rtp_port  # two reads: may differ
                info = slot.snapshot()
                assert info is not None
                assert int(info.remote_rtp_ip.rsplit(".", 1)[1]) == info.remote_rtp_port - 4999
                assert ip.startswith("127.0.0.") and 5000 <= port < 5008
                reads += 1
                changes += h != last
                last = h
        finally:
            stop.set()
            proc.join(10)
        assert proc.exitcode == 0
        assert reads > 200 and changes > 20, (reads, changes)


def test_writer_dying_mid_update_gives_clear_error_and_is_repaired() -> None:
    with shard_segment(slots=1) as seg:
        slot = seg.slot(0)
        activate_slot(slot)
        slot.resume_handle = "before"
        seq_off = L.HEADER_SIZE + L.CB_RESUME
        (seq,) = struct.unpack_from("<Q", seg._mv, seq_off)
        struct.pack_into("<Q", seg._mv, seq_off, seq + 1)  # as if a writer died after going odd
        t0 = time.monotonic()
        with pytest.raises(ShmError, match=f"segment {seg.name} slot 0 resume_handle: writer stuck"):
            _ = slot.resume_handle
        assert time.monotonic() - t0 < 5
        slot.resume_handle = "after"  # the next writer takes over the odd seqlock
        assert slot.resume_handle == "after"
        (seq2,) = struct.unpack_from("<Q", seg._mv, seq_off)
        assert seq2 % 2 == 0


def _cycle_sessions(name: str, stop: mp.synchronize.Event) -> None:
    seg = ShardSegment.attach(name)
    slot = seg.slot(1)
    k = 0
    stop_at = time.monotonic() + MAX_SECONDS
    while not (k % 64 == 0 and (stop.is_set() or time.monotonic() > stop_at)):
        k += 1
        activate_slot(slot, session_id=f"s{k}", local_rtp_port=1000 + k % 60000, remote_rtp_port=k % 60000,
                      options={"k": k, "pad": "x" * (k % 1500)})
        slot.begin_close()
        slot.free()
    seg.close()


def test_snapshots_are_consistent_while_slot_is_reused() -> None:
    with shard_segment(slots=2) as seg:
        stop = _CTX.Event()
        proc = _CTX.Process(target=_cycle_sessions, args=(seg.name, stop))
        proc.start()
        slot = seg.slot(1)
        seen = 0
        kinds: set[int] = set()
        try:
            while proc.is_alive() and not (seen > 20 and len(kinds) > 20):
                info = slot.snapshot()
                if info is None:
                    continue
                k = info.options["k"]
                assert info.session_id == f"s{k}" and info.generation == k
                assert info.local_rtp_port == 1000 + k % 60000 and info.remote_rtp_port == k % 60000
                assert info.options["pad"] == "x" * (k % 1500)
                seen += 1
                kinds.add(k)
        finally:
            stop.set()
            proc.join(10)
        assert proc.exitcode == 0
        assert seen > 20 and len(kinds) > 20, (seen, len(kinds))
