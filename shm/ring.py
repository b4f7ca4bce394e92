"""Lock-free single-producer / single-consumer byte ring in shared memory.

Why hand-written: no maintained Python library offers an SPSC ring over a *foreign* POSIX shared
memory mapping with explicit acquire/release publication that survives a peer being SIGKILLed and
re-attaching; the whole algorithm is ~100 lines and sits on the per-frame hot path.

Algorithm (Lamport ring with monotonic cursors):

* Two u64 cursors count bytes ever written/read (mod 2**64) and live on separate cache lines;
  ``capacity`` is a power of two, so ``cursor & (capacity - 1)`` is the position even after the
  cursors wrap at 2**64 and ``(write - read) mod 2**64`` is always the fill level.
* Producer: acquire-load the read cursor, copy the payload (memoryview slice assignment, one or two
  memcpys), release-store the write cursor. A write that does not fit is dropped whole and counted
  (``overruns`` += 1, ``dropped`` += bytes); the producer never blocks or waits.
* Consumer: acquire-load the write cursor, copy out, release-store the read cursor. A read that
  cannot be served in full returns ``None`` and counts an underrun. Reads are exact-size, so
  whole-frame writes are never torn.
* Barge-in flush: the producer stores the current write cursor as ``flush_cursor`` and then
  release-increments ``flush_epoch``. On every read/peek/skip/available the consumer compares the
  epoch with its own ``flush_seen`` and, if it moved, advances its read cursor to ``flush_cursor``
  (discarding what was queued at flush time, keeping anything written afterwards). Only the consumer
  ever moves the read cursor.
* Re-attach: every cursor and the consumer's ``flush_seen`` live in the segment, so a restarted
  process continues where its predecessor stopped. A consumer killed after copying a frame but
  before publishing its cursor sees that frame again (at-least-once at a crash boundary); use
  ``peek`` + ``skip`` to make processing idempotent (``skip`` consumes the peeked bytes even when a
  flush arrives between the two, and only then obeys the flush).

Counters (u64, bytes unless noted) are written only by their own side with plain stores:
producer ``dropped``, ``overruns`` (writes dropped); consumer ``underruns`` (short reads),
``flushes`` (epochs obeyed), ``flushed`` (bytes discarded). ``written`` and ``read`` are derived
from the cursors (``written = write - start``, ``read = read cursor - start - flushed``), so they
stay exact even when a process is SIGKILLed between publishing a cursor and bumping a counter;
only a consumer killed in the middle of obeying a flush may attribute that one flush's bytes to
``read`` instead of ``flushed`` (their sum is always exact).
"""

from __future__ import annotations

from typing import Any

from shm import atomic
from shm import layout as L
from shm.atomic import Atomics
from shm.errors import RingClosedError, RingCorruptError

_W = L.RING_WRITE // 8
_EPOCH = L.RING_FLUSH_EPOCH // 8
_FCUR = L.RING_FLUSH_CURSOR // 8
_START = L.RING_START // 8
_DROPPED = L.RING_DROPPED // 8
_OVERRUNS = L.RING_OVERRUNS // 8
_R = L.RING_READ // 8
_SEEN = L.RING_FLUSH_SEEN // 8
_UNDER = L.RING_UNDERRUNS // 8
_FLUSHES = L.RING_FLUSHES // 8
_FLUSHED = L.RING_FLUSHED // 8
_U64 = L.U64
_HALF = 1 << 63


class Ring:
    """One SPSC ring of a slot (``Slot.uplink`` / ``Slot.downlink``)."""

    __slots__ = (
        "_a_epoch",
        "_a_fcur",
        "_a_read",
        "_a_write",
        "_ca",
        "_cap",
        "_closed",
        "_d",
        "_hq",
        "_mask",
        "_mv",
        "_pa",
        "name",
    )

    def __init__(self, mv: memoryview, base_addr: int, hdr_off: int, data_off: int, capacity: int,
                 name: str) -> None:
        if capacity & (capacity - 1):
            raise ValueError(f"ring {name}: capacity {capacity} is not a power of two")
        self.name = name
        self._mv = mv
        self._hq = mv[hdr_off:hdr_off + L.RING_HDR_SIZE].cast("Q")
        self._d = data_off
        self._cap = capacity
        self._mask = capacity - 1
        self._a_write = base_addr + hdr_off + L.RING_WRITE
        self._a_read = base_addr + hdr_off + L.RING_READ
        self._a_epoch = base_addr + hdr_off + L.RING_FLUSH_EPOCH
        self._a_fcur = base_addr + hdr_off + L.RING_FLUSH_CURSOR
        self._pa = Atomics()  # producer-side scratch
        self._ca = Atomics()  # consumer-side scratch
        self._closed = False

    # ---- producer side -----------------------------------------------------------------------
    def write(self, data: Any) -> bool:
        """Append ``data`` (bytes, memoryview or C-contiguous ndarray) whole, or drop it and count."""
        if self._closed:
            raise RingClosedError(f"ring {self.name}: segment closed")
        if not isinstance(data, bytes | bytearray):
            data = memoryview(data).cast("B")
        n = len(data)
        hq = self._hq
        w = hq[_W]  # own word: plain load is fine
        r = self._peer_read()
        fill = (w - r) & _U64
        if n > self._cap - fill:
            if fill > self._cap:
                self._corrupt(w, r)
            hq[_OVERRUNS] += 1
            hq[_DROPPED] += n
            return False
        if n == 0:
            return True
        pos = w & self._mask
        start = self._d + pos
        end = pos + n
        if end <= self._cap:
            self._mv[start:start + n] = data
        else:
            k = self._cap - pos
            self._mv[start:start + k] = data[:k]
            self._mv[self._d:self._d + n - k] = data[k:]
        if atomic.PLAIN_ORDERED:
            hq[_W] = (w + n) & _U64  # after the copy: a TSO store is a release
        else:
            self._pa.store_release(self._a_write, (w + n) & _U64)
        return True

    def free_space(self) -> int:
        """Bytes the producer can write now (conservative: ignores a flush not yet obeyed)."""
        self._check()
        return self._cap - ((self._hq[_W] - self._peer_read()) & _U64)

    def _peer_read(self) -> int:
        """Producer: acquire-load the consumer's read cursor (a plain load is an acquire on TSO)."""
        return self._hq[_R] if atomic.PLAIN_ORDERED else self._pa.load_acquire(self._a_read)

    def request_flush(self) -> None:
        """Producer: ask the consumer to discard everything written so far (barge-in)."""
        self._check()
        hq = self._hq
        self._pa.store_release(self._a_fcur, hq[_W])
        self._pa.store_release(self._a_epoch, (hq[_EPOCH] + 1) & _U64)

    # ---- consumer side -----------------------------------------------------------------------
    def _sync(self) -> int:
        """Obey a pending flush; return the (possibly advanced) read cursor."""
        if self._closed:
            raise RingClosedError(f"ring {self.name}: segment closed")
        hq = self._hq
        r = hq[_R]
        epoch = hq[_EPOCH] if atomic.PLAIN_ORDERED else self._ca.load_acquire(self._a_epoch)
        seen = hq[_SEEN]
        if epoch != seen:
            fc = self._ca.load_acquire(self._a_fcur)
            delta = (fc - r) & _U64
            if 0 < delta < _HALF:
                r = fc
                self._ca.store_release(self._a_read, r)
                hq[_FLUSHED] += delta
            hq[_SEEN] = epoch
            hq[_FLUSHES] += (epoch - seen) & _U64
        return r

    def _publish_read(self, r: int) -> None:
        """Release-store the read cursor (after the copy out; a TSO store is a release)."""
        if atomic.PLAIN_ORDERED:
            self._hq[_R] = r
        else:
            self._ca.store_release(self._a_read, r)

    def _avail(self, r: int) -> int:
        w = self._hq[_W] if atomic.PLAIN_ORDERED else self._ca.load_acquire(self._a_write)
        n = (w - r) & _U64
        if n > self._cap:
            self._corrupt(w, r)
        return n

    def _corrupt(self, w: int, r: int) -> None:
        raise RingCorruptError(
            f"ring {self.name}: corrupt cursors (write {w}, read {r}, capacity {self._cap})")

    def available(self) -> int:
        """Bytes the consumer can read now (after obeying any flush)."""
        return self._avail(self._sync())

    def _copy_out(self, r: int, n: int) -> bytes:
        pos = r & self._mask
        start = self._d + pos
        if pos + n <= self._cap:
            return self._mv[start:start + n].tobytes()
        k = self._cap - pos
        return self._mv[start:start + k].tobytes() + self._mv[self._d:self._d + n - k].tobytes()

    def read(self, n: int) -> bytes | None:
        """Take exactly ``n`` bytes, or return ``None`` (underrun, counted) if fewer are queued."""
        r = self._sync()
        if self._avail(r) < n or n <= 0:
            if n > 0:
                self._hq[_UNDER] += 1
                return None
            return b""
        out = self._copy_out(r, n)
        self._publish_read((r + n) & _U64)
        return out

    def read_frames(self, frame: int, max_frames: int = -1) -> tuple[bytes, int]:
        """Take whole ``frame``-byte frames (at most ``max_frames``; all when < 0): ``(data, left)``.

        ``data`` is ``b""`` when less than one frame is queued (not counted as an underrun: the caller
        asked for "what is there"); ``left`` is what stays queued after the read. The per-tick hot
        paths use this instead of ``available()`` + ``read()``: one flush check and one cursor load
        instead of two of each (each atomic costs ~0.4 µs through ctypes), same bytes.
        """
        if frame <= 0:
            raise ValueError(f"ring {self.name}: frame size must be > 0, got {frame}")
        r = self._sync()
        avail = self._avail(r)
        n = avail - avail % frame
        if 0 <= max_frames < n // frame:
            n = max_frames * frame
        if n == 0:
            return b"", avail
        out = self._copy_out(r, n)
        self._publish_read((r + n) & _U64)
        return out, avail - n

    def read_into(self, buf: Any) -> bool:
        """Fill the writable buffer ``buf`` completely, or return False (underrun, counted)."""
        r = self._sync()
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if self._avail(r) < n:
            self._hq[_UNDER] += 1
            return False
        pos = r & self._mask
        start = self._d + pos
        if pos + n <= self._cap:
            mv[:] = self._mv[start:start + n]
        else:
            k = self._cap - pos
            mv[:k] = self._mv[start:start + k]
            mv[k:] = self._mv[self._d:self._d + n - k]
        self._publish_read((r + n) & _U64)
        return True

    def peek(self, n: int) -> bytes | None:
        """Copy the next ``n`` bytes without consuming them (``None`` if fewer; not counted)."""
        r = self._sync()
        if self._avail(r) < n:
            return None
        return self._copy_out(r, n) if n > 0 else b""

    def skip(self, n: int) -> int:
        """Consume up to ``n`` bytes without copying; returns how many were skipped.

        Skips from the current read cursor *before* obeying a pending flush, then obeys it: after
        ``peek(n)`` a ``skip(n)`` always consumes exactly the bytes that were peeked, even if a flush
        was requested in between (obeying it first would skip an unseen frame after the flush point).
        """
        self._check()
        r = self._hq[_R]
        n = max(0, min(n, self._avail(r)))
        if n:
            self._publish_read((r + n) & _U64)
        self._sync()
        return n

    # ---- both / admin ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Ring data size in bytes (a power of two)."""
        return self._cap

    def _check(self) -> None:
        if self._closed:
            raise RingClosedError(f"ring {self.name}: segment closed")

    def _counter(self, idx: int) -> int:
        self._check()
        return self._hq[idx]

    written = property(lambda self: self.stats()["written"], doc="bytes accepted by write()")
    dropped = property(lambda self: self._counter(_DROPPED), doc="bytes dropped because the ring was full")
    overruns = property(lambda self: self._counter(_OVERRUNS), doc="write() calls dropped (ring full)")
    read_bytes = property(lambda self: self.stats()["read"], doc="bytes consumed by read/read_into/skip")
    underruns = property(lambda self: self._counter(_UNDER), doc="short read()/read_into() calls")
    flushes = property(lambda self: self._counter(_FLUSHES), doc="flush epochs obeyed by the consumer")
    flushed = property(lambda self: self._counter(_FLUSHED), doc="bytes discarded by flushes")
    flush_epoch = property(lambda self: self._counter(_EPOCH), doc="flushes requested by the producer")
    write_cursor = property(lambda self: self._counter(_W), doc="monotonic bytes-written cursor (mod 2**64)")
    read_cursor = property(lambda self: self._counter(_R), doc="monotonic bytes-read cursor (mod 2**64)")

    def stats(self) -> dict[str, int]:
        """All counters and the current fill level (a racy snapshot, fine for metrics)."""
        self._check()
        hq = self._hq
        w, r, start, flushed = hq[_W], hq[_R], hq[_START], hq[_FLUSHED]
        return {
            "capacity": self._cap,
            "fill": (w - r) & _U64,
            "written": (w - start) & _U64,
            "dropped": hq[_DROPPED],
            "overruns": hq[_OVERRUNS],
            "read": (r - start - flushed) & _U64,
            "underruns": hq[_UNDER],
            "flush_requests": hq[_EPOCH],
            "flushes": hq[_FLUSHES],
            "flushed": hq[_FLUSHED],
        }

    def reset(self, start: int = 0) -> None:
        """Empty the ring and zero its counters, cursors at ``start``.

        Only while neither side runs (the supervisor calls it from ``Slot.activate`` on a FREE slot).
        ``start`` exists so tests can exercise cursor wraparound at 2**64.
        """
        self._check()
        hq = self._hq
        for i in range(len(hq)):
            hq[i] = 0
        start &= _U64
        hq[_START] = start
        hq[_FCUR] = start
        hq[_R] = start
        self._pa.store_release(self._a_write, start)
        self._ca.store_release(self._a_read, start)

    def _close(self) -> None:
        self._closed = True
        self._hq.release()
