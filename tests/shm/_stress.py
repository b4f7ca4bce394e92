"""Producer / consumer processes for the two-process ring stress test (run with ``python -m``).

Frames are 640 bytes: ``seq u64 | crc32 u32 | pad u32 | 624 payload bytes``; the CRC covers the seq
and the payload, so a torn frame (halves of two writes) or garbage fails it. An auxiliary shared
array records, per seq, whether the producer dropped it (ring full) and whether a consumer
delivered it. The consumer uses ``peek`` → verify → mark → ``skip`` so a consumer SIGKILLed at any
point re-delivers at most the one frame it had not yet skipped (marking is idempotent).

Every ``FLUSH_EVERY`` frames the producer requests a flush (barge-in) and records the boundary (the
first seq written after it): frames neither delivered nor dropped must be older than a boundary.

Aux layout: u64 words [last_seq+1, producer_done, redeliveries, corrupt, order_errors, checked,
flush requests, last flush boundary], then ``drops`` u8[N] and ``marks`` u8[N].
"""

from __future__ import annotations

import mmap
import random
import struct
import sys
import time
import zlib

import numpy as np
import posix_ipc

from shm.segment import ShardSegment

FRAME = 640
WORDS = 8
LAST, DONE, REDELIVERED, CORRUPT, ORDER, CHECKED, FLUSHES, BOUNDARY = range(8)
FLUSH_EVERY = 40_000  # the producer requests a barge-in flush this often
POOL = 97


def aux_size(n: int) -> int:
    """Bytes of the auxiliary segment for ``n`` frames."""
    return WORDS * 8 + 2 * n


def map_aux(name: str, n: int) -> tuple[mmap.mmap, np.ndarray, np.ndarray, np.ndarray]:
    """Map the aux segment: (mmap, words u64[8], drops u8[n], marks u8[n])."""
    shm = posix_ipc.SharedMemory(name, 0)
    mm = mmap.mmap(shm.fd, aux_size(n))
    shm.close_fd()
    words = np.frombuffer(mm, dtype=np.uint64, count=WORDS)
    drops = np.frombuffer(mm, dtype=np.uint8, count=n, offset=WORDS * 8)
    marks = np.frombuffer(mm, dtype=np.uint8, count=n, offset=WORDS * 8 + n)
    return mm, words, drops, marks


def _pool() -> list[bytes]:
    rnd = random.Random(1234)
    return [rnd.randbytes(FRAME - 16) for _ in range(POOL)]


def producer(seg_name: str, aux_name: str, n: int) -> None:
    """Write ``n`` frames as fast as the ring takes them; a full ring drops (and we back off briefly)."""
    seg = ShardSegment.attach(seg_name)
    ring = seg.slot(0).uplink
    _, words, drops, _ = map_aux(aux_name, n)
    pool = _pool()
    frame = bytearray(FRAME)
    fmv = memoryview(frame)
    pack = struct.Struct("<QI").pack_into
    for seq in range(n):
        if seq and seq % FLUSH_EVERY == 0:
            ring.request_flush()
            words[FLUSHES] += 1
            words[BOUNDARY] = seq
        fmv[16:] = pool[seq % POOL]
        struct.pack_into("<Q", frame, 0, seq)
        pack(frame, 0, seq, zlib.crc32(fmv[16:], zlib.crc32(fmv[0:8])))
        if not ring.write(frame):
            drops[seq] = 1
            time.sleep(0.0002)
    words[DONE] = 1


def consumer(seg_name: str, aux_name: str, n: int) -> None:
    """Verify and mark frames until told to stop (words[DONE] == 2) with the ring drained."""
    seg = ShardSegment.attach(seg_name)
    ring = seg.slot(0).uplink
    _, words, _, marks = map_aux(aux_name, n)
    pool = _pool()
    unpack = struct.Struct("<QI").unpack_from
    last = int(words[LAST]) - 1  # last seq marked by any incarnation (-1: none)
    first = True
    while True:
        data = ring.peek(FRAME)
        if data is None:
            if words[DONE] == 2:
                return
            time.sleep(0.0005)
            continue
        seq, crc = unpack(data)
        mv = memoryview(data)
        if seq >= n or crc != zlib.crc32(mv[16:], zlib.crc32(mv[0:8])) or data[16:] != pool[seq % POOL]:
            words[CORRUPT] += 1
        elif seq < last or (seq == last and not first):
            words[ORDER] += 1
        else:
            if seq == last:
                words[REDELIVERED] += 1  # killed between mark and skip last time
            marks[seq] = 1
            words[LAST] = seq + 1
            last = seq
        first = False
        words[CHECKED] += 1
        ring.skip(FRAME)


if __name__ == "__main__":
    role, seg_name, aux_name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    {"producer": producer, "consumer": consumer}[role](seg_name, aux_name, count)
