"""The record spool: crash safety (SIGKILL, torn tails), sealing, the size bound and its drop count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from appliance.records.spool import DROPPED_KIND, Spool, SpoolReader


def _drain(reader: SpoolReader) -> list[dict]:
    out: list[dict] = []
    while True:
        b = reader.read_batch(100)
        reader.ack(b)
        if not b.items:
            return out
        out += b.items


def test_roundtrip_rotation_and_deletion_after_ack(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=4096)
    for i in range(300):
        assert sp.append("event", f"call{i % 7}", type="turn", n=i)
    sp.sync()  # sealed segments are unlocked once fsynced (normally by the spool's thread)
    reader = SpoolReader(tmp_path)
    assert len(reader.segments()) > 2  # rotated
    b = reader.read_batch(1000)
    assert [it["n"] for it in b.items] == list(range(300))
    assert len({it["id"] for it in b.items}) == 300
    before = set(reader.segments())
    reader.ack(b)
    left = set(reader.segments())
    assert len(left) == 1 and left < before  # only the live segment stays (still locked by us)
    assert reader.read_batch(10).items == []  # nothing re-read from it
    sp.append("event", "c", n=300)
    assert [it["n"] for it in reader.read_batch(10).items] == [300]
    sp.close()
    assert [it["n"] for it in _drain(reader)] == [300]
    assert reader.segments() == []  # closed → sealed → deleted once shipped


def test_sigkill_loses_nothing_appended(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, time
        from appliance.records.spool import Spool
        sp = Spool({str(tmp_path)!r}, segment_bytes=2048, fsync_seconds=60)
        for i in range(500):
            sp.append("transcript", "c1", n=i, text="x" * 20)
        print("appended", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).parents[2]))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "appended"
        reader = SpoolReader(tmp_path)
        live = reader.read_batch(1000)
        assert len(live.items) == 500  # readable while the producer lives
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader = SpoolReader(tmp_path)  # a fresh reader (a restarted supervisor) finds everything
    items = _drain(reader)
    assert [it["n"] for it in items] == list(range(500))
    assert reader.segments() == []  # the dead producer's segments are sealed (flock gone) and shipped


def test_torn_tail_is_skipped(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    for i in range(10):
        sp.append("event", "c", n=i)
    sp.close()
    (seg,) = SpoolReader(tmp_path).segments()
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02\x03\x04{\"id\":")  # a record cut off by a power loss
    reader = SpoolReader(tmp_path)
    assert [it["n"] for it in _drain(reader)] == list(range(10))
    assert reader.corrupt_records == 1
    assert reader.segments() == []


def test_corrupt_record_stops_the_segment_not_the_spool(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=300)
    for i in range(20):
        sp.append("event", "c", n=i)
    sp.close()
    segs = SpoolReader(tmp_path).segments()
    data = bytearray(segs[0].read_bytes())
    data[10] ^= 0xFF  # flip a payload byte of the first record
    segs[0].write_bytes(bytes(data))
    got = [it["n"] for it in _drain(SpoolReader(tmp_path))]
    assert got and got == sorted(got) and got[-1] == 19 and 0 not in got


def test_size_bound_drops_and_reports_the_count(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 16, segment_bytes=8192)
    ok = sum(sp.append("transcript", "c", text="y" * 200) for _ in range(1000))
    assert 0 < ok < 1000 and sp.dropped == 1000 - ok
    assert SpoolReader(tmp_path).size_bytes() <= 1 << 16
    sp.sync()
    reader = SpoolReader(tmp_path)
    first = _drain(reader)
    assert len(first) == ok
    sp._scanned = 0.0  # let the producer re-measure at once (it does so at most every 0.5 s)
    assert sp.append("transcript", "c", text="after")
    items = reader.read_batch(10).items
    assert items[0]["kind"] == DROPPED_KIND and items[0]["count"] == 1000 - ok
    assert items[1]["text"] == "after"
    sp.close()
