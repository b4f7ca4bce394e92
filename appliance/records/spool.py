"""The local record spool: workers append record items, the supervisor's writer ships them.

Why a spool and not a database client in the workers: nothing on the 20 ms path may wait for
PostgreSQL, and a database outage (or a supervisor restart) must delay records, never lose them. An
append is one ``os.write`` of a framed record to a file in the page cache (tens of µs with the JSON
encoding, docs/benchmarks.md "Records"); durability and shipping happen elsewhere.

Layout: one directory per producer under the spool root (``shard-<k>`` for AI worker k, ``supervisor``
for the control plane), each a sequence of append-only segment files ``seg-<ns>-<pid>.spool`` (name
order = write order of one directory). A record is ``<u32 length><u32 crc32>`` + a JSON object with
``id`` (unique item id: the database's idempotency key), ``kind``, ``call`` and ``at`` (unix seconds).

Crash safety and fsync policy:
- A record reaches the kernel in one ``write``: a SIGKILL of the producer loses nothing it appended.
- The active segment is fsynced by a background thread every ``fsync_seconds`` (default 1 s) when
  dirty, and a segment is fsynced before it is sealed: a power loss can cost at most the last second.
- A torn tail (power loss mid-write) fails its length/CRC check and is skipped by the reader.

Sealing: the producer holds an exclusive ``flock`` on its active segment for as long as it appends to
it (a new segment is created under a temporary name, locked, then renamed). The reader may delete a
segment only when it can take the lock itself (its producer rotated away from it, or died) and every
record in it is committed. A live segment is read up to its last complete record; the reader keeps its
offset in memory (a restarted supervisor re-ships from the start: the item ids make that harmless).

Size bound: ``max_bytes`` per directory. An append that would exceed it is dropped and counted; the
count is written as a ``spool.dropped`` item as soon as space allows (the writer turns it into
``va_records_spool_dropped_total``), and the writer exports the spool size (``va_records_spool_bytes``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")  # length, crc32 of the payload
MAX_RECORD_BYTES = 1 << 20  # one transcript line of an hour-long monologue still fits
SEGMENT_RE = re.compile(r"^seg-(\d{20})-(\d+)\.spool$")
DROPPED_KIND = "spool.dropped"


def _segment_name(pid: int) -> str:
    return f"seg-{time.time_ns():020d}-{pid}.spool"


def encode(item: dict[str, Any]) -> bytes:
    payload = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class Spool:
    """Producer side: ``append(kind, call_id, **fields)``. One instance per process and directory."""

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 256 << 20,
                 segment_bytes: int = 4 << 20, segment_seconds: float = 60.0,
                 fsync_seconds: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.fsync_seconds = fsync_seconds
        self._prefix = secrets.token_hex(6)
        self._seq = 0
        self.dropped = 0  # since start (tests, logs)
        self._unreported = 0  # dropped items not yet written as a DROPPED_KIND item
        self._fd = -1
        self._size = 0
        self._opened = 0.0
        self._dirty = False
        self._dir_bytes = self._scan()
        self._scanned = time.monotonic()
        self._lock = threading.Lock()  # the append/rotate state
        self._sync_lock = threading.Lock()  # one sync() at a time (the thread's or an explicit one)
        self._sealing: list[int] = []
        self._closed = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._thread.start()

    # -- appending -------------------------------------------------------------------------------
    def new_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}{self._seq:x}"

    def append(self, kind: str, call_id: str, **fields: Any) -> bool:
        """Append one item (never blocks on anything but the page cache). False if dropped."""
        item = {"id": self.new_id(), "kind": kind, "call": call_id, "at": time.time(), **fields}
        return self.append_item(item)

    def append_item(self, item: dict[str, Any]) -> bool:
        data = encode(item)
        if len(data) > MAX_RECORD_BYTES:
            log.warning("record item too large; dropped",
                        extra={"kind": item.get("kind"), "bytes": len(data)})
            self._drop()
            return False
        if self._unreported:
            note = encode({"id": self.new_id(), "kind": DROPPED_KIND, "call": "", "at": time.time(),
                           "count": self._unreported})
            if self._room(len(note) + len(data)):
                self._unreported = 0
                data = note + data
        if not self._room(len(data)):
            self._drop()
            return False
        with self._lock:
            if self._fd < 0 or self._size >= self.segment_bytes or (
                    self._size and time.monotonic() - self._opened >= self.segment_seconds):
                self._rotate()
            os.write(self._fd, data)
            self._size += len(data)
            self._dir_bytes += len(data)
            self._dirty = True
        return True

    def _drop(self) -> None:
        self.dropped += 1
        self._unreported += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("record spool full; items dropped",
                      extra={"spool": str(self.dir), "dropped": self.dropped, "max_bytes": self.max_bytes})

    def _room(self, n: int) -> bool:
        if self._dir_bytes + n <= self.max_bytes:
            return True
        now = time.monotonic()
        if now - self._scanned >= 0.5:  # the writer may have deleted segments since
            self._dir_bytes = self._scan()
            self._scanned = now
        return self._dir_bytes + n <= self.max_bytes

    def _scan(self) -> int:
        total = 0
        with contextlib.suppress(OSError):
            for e in os.scandir(self.dir):
                with contextlib.suppress(OSError):
                    total += e.stat().st_size
        return total

    def _rotate(self) -> None:
        """Seal the active segment (fsync + unlock in the sync thread) and open a fresh, locked one."""
        if self._fd >= 0:
            self._sealing.append(self._fd)
            self._wake.set()
        name = _segment_name(os.getpid())
        tmp = self.dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, self.dir / name)
        self._fd, self._size, self._opened = fd, 0, time.monotonic()

    # -- durability ------------------------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.fsync_seconds)
            self._wake.clear()
            self.sync()

    def sync(self) -> None:
        """fsync the active segment if dirty; fsync, unlock and close sealed ones (when it returns, every
        segment sealed before the call is durable and unlocked, even if the sync thread was mid-way)."""
        with self._sync_lock:
            with self._lock:
                fd = self._fd if self._dirty else -1
                self._dirty = False
                sealing, self._sealing = self._sealing, []
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
            for old in sealing:
                with contextlib.suppress(OSError):
                    os.fsync(old)
                with contextlib.suppress(OSError):
                    os.close(old)  # releases the flock: the reader may now delete it once shipped

    def close(self) -> None:
        """Seal the active segment (the writer may then remove it once shipped)."""
        with self._lock:
            if self._fd >= 0:
                self._sealing.append(self._fd)
                self._fd = -1
        self._closed = True
        self._wake.set()
        self._thread.join(5)
        self.sync()


@dataclass
class _Segment:
    path: Path
    offset: int = 0  # bytes committed (shipped) so far


@dataclass
class Batch:
    """Items read from one directory plus what to acknowledge once they are committed."""

    items: list[dict[str, Any]] = field(default_factory=list)
    ends: dict[Path, tuple[int, bool]] = field(default_factory=dict)  # segment → (end offset, sealed+done)


class SpoolReader:
    """Reader side for one spool directory (the supervisor's writer)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self._segments: dict[Path, _Segment] = {}
        self.corrupt_records = 0

    def segments(self) -> list[Path]:
        try:
            names = sorted(n for n in os.listdir(self.dir) if SEGMENT_RE.match(n))
        except FileNotFoundError:
            return []
        return [self.dir / n for n in names]

    def size_bytes(self) -> int:
        total = 0
        for p in self.segments():
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def read_batch(self, max_items: int = 500, max_bytes: int = 4 << 20) -> Batch:
        batch = Batch()
        budget = max_bytes
        for path in self.segments():
            if len(batch.items) >= max_items or budget <= 0:
                break
            seg = self._segments.setdefault(path, _Segment(path))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                sealed = _try_lock(fd)  # True: no producer appends to it any more
                size = os.fstat(fd).st_size
                os.lseek(fd, seg.offset, os.SEEK_SET)
                data = _read_all(fd, min(size - seg.offset, max(budget, MAX_RECORD_BYTES + HEADER.size)))
            finally:
                os.close(fd)
            pos, stop = 0, "limit"
            while len(batch.items) < max_items:
                if pos == len(data):
                    stop = "end"
                    break
                if len(data) - pos < HEADER.size:
                    stop = "partial"
                    break
                n, crc = HEADER.unpack_from(data, pos)
                if n > MAX_RECORD_BYTES:
                    stop = "corrupt"
                    break
                if len(data) - pos - HEADER.size < n:
                    stop = "partial"
                    break
                payload = data[pos + HEADER.size:pos + HEADER.size + n]
                if zlib.crc32(payload) != crc:
                    stop = "corrupt"
                    break
                try:
                    item = json.loads(payload)
                except ValueError:
                    item = None
                pos += HEADER.size + n
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    batch.items.append(item)
                else:
                    self.corrupt_records += 1
            budget -= pos
            end = seg.offset + pos
            read_to_eof = seg.offset + len(data) >= size
            # A sealed segment is finished when everything valid in it has been read: its end, or a torn
            # tail / corrupt record (no producer will ever complete it). A live one is never finished.
            torn = stop == "corrupt" or (stop == "partial" and read_to_eof)
            done = sealed and ((stop == "end" and read_to_eof) or torn)
            if sealed and torn:
                self.corrupt_records += 1
                log.warning("spool segment has a torn or corrupt record; rest skipped",
                            extra={"segment": str(path), "offset": end})
            batch.ends[path] = (end, done)
        return batch

    def ack(self, batch: Batch) -> None:
        """The batch is committed: advance offsets, delete sealed segments that are fully shipped."""
        for path, (end, done) in batch.ends.items():
            seg = self._segments.get(path)
            if seg is None:
                continue
            seg.offset = max(seg.offset, end)
            if done:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._segments.pop(path, None)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_all(fd: int, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            break
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def spool_root(state_dir: str, configured: str = "") -> Path:
    """``records.spool_dir`` or ``<state_dir>/records-spool``."""
    return Path(configured) if configured else Path(state_dir) / "records-spool"
