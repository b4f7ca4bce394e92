"""The one record of what a call sent (or is about to send) to the model: items, handle coverage,
replay, and the crash journal that lets a replacement worker continue.

Why one record: the Live layer must replay caller input the server has not provably kept when it
reconnects, and a replacement AI worker (after SIGKILL) must replay the same input into the resumed
session. Both are the same set — everything after the point the newest resumable handle covers — so it
is kept once, here, in memory for the sender and mirrored to a tmpfs file that outlives the process.

- **Items.** Caller audio (cut into ``chunk_bytes`` chunks), ``activityStart``, ``activityEnd`` and
  realtime text (keypad entries), numbered in order. The sender takes ``next_after(seq)``.
- **Coverage.** The Gemini Developer API has no ``transparent`` resumption, so a handle carries no
  message index. With manual activity detection (how the appliance runs) each caller activity gets
  exactly one outcome from the model — ``turnComplete`` or ``interrupted`` — in order, so the session
  reports each ``activityEnd`` it wrote (``sent``) and each outcome (``outcome``); a handle covers the
  activities answered before it arrived (``confirm``). With automatic detection the session can only
  assume a handle covers what was sent before it arrived (``cover_sent``). The emulator implements
  exactly these semantics and records the caller audio it holds, which is how tests prove the replay is
  gap- and duplicate-free (docs/architecture.md, "Live sessions").
- **Replay.** A new connection (resume, or fresh after an unknown handle) starts after the covered
  point: ``reconnect()`` says where, and forgets the old connection's unanswered activities.
- **Journal.** Appends are one ``write(2)`` per tick per talking call (~2 µs) to
  ``/dev/shm/<segment>-ai<slot>-g<generation>.journal``; at each handle the file is rewritten to what
  is still uncovered, so it stays a few seconds long. Record: kind (1 byte: S start, A audio, T text, E
  end) + length (u32 LE) + payload; a torn last record is ignored. Nothing needs ordering beyond "the
  writer is dead before the reader starts" (the supervisor restarts a worker only after it exited).
- **Bounds.** At most ``max_bytes`` of uncovered audio is kept (oldest dropped, counted: a model that
  never confirms cannot fill memory); the journal is rewritten from memory when it outgrows ``MAX_FILE``.
- **Ownership.** After a worker re-opens a call's Live session, the old session may still be closing:
  only the session that ``attach``-ed last may change coverage.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from shm.audio import UP_BYTES_PER_SECOND

log = logging.getLogger(__name__)

DROPPED = Counter("va_live_dropped_audio_seconds", "Unconfirmed caller audio dropped (log full)")
MAX_REPLAY_SECONDS = 30.0  # uncovered caller audio kept for replay (~1 MB)
MAX_FILE = UP_BYTES_PER_SECOND * 300  # journal bytes before it is rewritten from memory
_HDR = struct.Struct("<cI")


class Kind(enum.IntEnum):
    AUDIO = 0
    START = 1
    END = 2
    TEXT = 3


_CODE = {Kind.START: b"S", Kind.AUDIO: b"A", Kind.END: b"E", Kind.TEXT: b"T"}
_KIND = {v: k for k, v in _CODE.items()}


@dataclass(slots=True)
class Item:
    seq: int
    kind: Kind
    data: bytes
    t: float  # monotonic time the item became sendable


def journal_path(directory: Path, segment: str, slot: int, generation: int) -> Path:
    """The journal file of one (slot, generation) of a segment."""
    return directory / f"{segment.strip('/')}-ai{slot}-g{generation}.journal"


def remove_stale(directory: Path, segment: str, live: set[tuple[int, int]]) -> list[Path]:
    """Delete journals of ``segment`` whose (slot, generation) is not in ``live``."""
    pat = re.compile(rf"^{re.escape(segment.strip('/'))}-ai(\d+)-g(\d+)\.journal$")
    removed: list[Path] = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        m = pat.match(entry)
        if m and (int(m.group(1)), int(m.group(2))) not in live:
            with contextlib.suppress(FileNotFoundError):
                (directory / entry).unlink()
                removed.append(directory / entry)
    return removed


def read_journal(data: bytes) -> list[tuple[Kind, bytes]]:
    """The records of a journal file's content, in order (a torn or unknown last record ends it)."""
    out: list[tuple[Kind, bytes]] = []
    off = 0
    while off + _HDR.size <= len(data):
        code, n = _HDR.unpack_from(data, off)
        kind = _KIND.get(code)
        if kind is None or off + _HDR.size + n > len(data):
            break
        out.append((kind, data[off + _HDR.size: off + _HDR.size + n]))
        off += _HDR.size + n
    return out


class Outbox:
    """One call's outgoing record. ``Outbox.open(path, …)`` for a crash-safe one (loads what a dead
    worker left), ``Outbox(chunk_bytes)`` for memory only."""

    def __init__(self, chunk_bytes: int, *, max_bytes: int = int(MAX_REPLAY_SECONDS * UP_BYTES_PER_SECOND),
                 path: Path | None = None) -> None:
        self.chunk_bytes = chunk_bytes
        self.max_bytes = max_bytes
        self.path = path
        self._fd = -1
        self._file_bytes = 0
        self._items: deque[Item] = deque()
        self._partial = bytearray()
        self._seq = 0  # last assigned sequence number
        self._covered = 0  # the newest handle (or a drop) covers items up to this one
        self._answered = 0  # a handle received now would cover items up to this one
        self._audio_bytes = 0
        self._ends: deque[tuple[int, float]] = deque()  # activityEnds written on this connection
        self._owner: object | None = None
        self.dropped_bytes = 0
        self.open_turn = False  # the last item is inside an activity (start without end)
        self.closed = False

    @classmethod
    def open(cls, path: Path, chunk_bytes: int, **kw: int) -> Outbox:
        """A journaled outbox; what the file holds (a previous worker's uncovered input) becomes its
        first items. Raises OSError if the file cannot be opened."""
        box = cls(chunk_bytes, path=path, **kw)
        box._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        for kind, payload in box.records():
            box._add(kind, payload, journal=False)
        box._file_bytes = os.fstat(box._fd).st_size
        return box

    # --- the caller's side (the worker, or the session on its behalf) --------------------------------
    def audio(self, pcm: bytes) -> bool:
        """Caller audio (PCM16 16 kHz); True when a whole chunk became sendable."""
        return bool(pcm) and self._add(Kind.AUDIO, pcm)

    def start(self) -> None:
        self._add(Kind.START, b"")

    def end(self) -> None:
        self._add(Kind.END, b"")

    def text(self, text: str) -> None:
        if text:
            self._add(Kind.TEXT, text.encode())

    def _add(self, kind: Kind, data: bytes, *, journal: bool = True) -> bool:
        if self.closed:
            return False
        if journal:
            self._journal(kind, data)
        now = time.monotonic()
        if kind is Kind.AUDIO:
            self._partial += data
            cb = self.chunk_bytes
            if len(self._partial) < cb:
                return False
            while len(self._partial) >= cb:
                self._push(Kind.AUDIO, bytes(self._partial[:cb]), now)
                del self._partial[:cb]
            return True
        self._flush_partial(now)
        self._push(kind, data, now)
        if kind is Kind.START:
            self.open_turn = True
        elif kind is Kind.END:
            self.open_turn = False
        return True

    def _flush_partial(self, now: float) -> None:
        if self._partial:
            self._push(Kind.AUDIO, bytes(self._partial), now)
            self._partial.clear()

    def _push(self, kind: Kind, data: bytes, now: float) -> None:
        self._seq += 1
        self._items.append(Item(self._seq, kind, data, now))
        if kind is not Kind.AUDIO:
            return
        self._audio_bytes += len(data)
        while self._audio_bytes > self.max_bytes and self._items:
            old = self._items.popleft()
            if old.kind is Kind.AUDIO:
                self._audio_bytes -= len(old.data)
                self.dropped_bytes += len(old.data)
                DROPPED.inc(len(old.data) / UP_BYTES_PER_SECOND)
            self._covered = max(self._covered, old.seq)
            self._answered = max(self._answered, old.seq)

    # --- the sender ---------------------------------------------------------------------------------
    def attach(self, owner: object) -> None:
        """``owner`` (a Live session) sends from now on; an earlier owner's reports are ignored."""
        self._owner = owner
        self._ends.clear()

    def owned_by(self, owner: object) -> bool:
        return self._owner is owner and not self.closed

    def reconnect(self, owner: object) -> int:
        """A new connection: the sequence number to send after (everything uncovered is replayed)."""
        if self.owned_by(owner):
            self._ends.clear()
            self._answered = self._covered
        return self._covered

    def next_after(self, seq: int) -> Item | None:
        """The first item after ``seq`` (None when all is sent)."""
        items = self._items
        if not items:
            return None
        idx = max(seq - items[0].seq + 1, 0)
        return items[idx] if idx < len(items) else None

    def replay(self) -> list[Item]:
        """What a new connection re-sends."""
        return [it for it in self._items if it.seq > self._covered]

    def sent(self, owner: object, item: Item, now: float) -> None:
        if item.kind is Kind.END and self.owned_by(owner):
            self._ends.append((item.seq, now))

    def oldest_unanswered(self) -> float | None:
        """When the oldest activityEnd still waiting for the model's outcome was written."""
        return self._ends[0][1] if self._ends else None

    # --- coverage -----------------------------------------------------------------------------------
    def outcome(self, owner: object, *, answered: bool) -> None:
        """A model turn finished (or was interrupted): it resolves the oldest unanswered activity."""
        if self._ends and self.owned_by(owner):
            seq, _ = self._ends.popleft()
            if answered:
                self._answered = max(self._answered, seq)

    def cover_sent(self, owner: object, sent: int) -> None:
        """Automatic activity detection: a handle is assumed to cover everything sent before it."""
        if self.owned_by(owner):
            self._answered = max(self._answered, sent)

    def confirm(self, owner: object) -> None:
        """A new resumable handle: forget what it covers, here and in the journal."""
        if not self.owned_by(owner):
            return
        self._covered = max(self._covered, self._answered)
        dropped = False
        while self._items and self._items[0].seq <= self._covered:
            old = self._items.popleft()
            if old.kind is Kind.AUDIO:
                self._audio_bytes -= len(old.data)
            dropped = True
        if dropped:
            self._rewrite()

    @property
    def uncovered_audio_bytes(self) -> int:
        return self._audio_bytes + len(self._partial)

    @property
    def empty(self) -> bool:
        return not self._items and not self._partial

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items)

    # --- the journal --------------------------------------------------------------------------------
    def _journal(self, kind: Kind, data: bytes) -> None:
        if self._fd < 0:
            return
        if self._file_bytes + _HDR.size + len(data) > MAX_FILE:
            self._rewrite()
        rec = _HDR.pack(_CODE[kind], len(data)) + data
        os.write(self._fd, rec)
        self._file_bytes += len(rec)

    def _rewrite(self) -> None:
        """The file = what is uncovered now (memory is the truth; the file its crash-safe copy)."""
        if self._fd < 0:
            return
        parts = [_HDR.pack(_CODE[it.kind], len(it.data)) + it.data for it in self._items]
        if self._partial:
            parts.append(_HDR.pack(b"A", len(self._partial)) + bytes(self._partial))
        blob = b"".join(parts)
        os.ftruncate(self._fd, 0)
        if blob:
            os.write(self._fd, blob)
        self._file_bytes = len(blob)

    def records(self) -> list[tuple[Kind, bytes]]:
        """What the journal file holds now (what a replacement worker would replay)."""
        if self._fd < 0:
            return []
        return read_journal(os.pread(self._fd, os.fstat(self._fd).st_size, 0))

    def close(self, *, remove: bool = False) -> None:
        """Stop recording; ``remove`` deletes the journal (the call ended), else it stays for the next
        worker (this one is stopping, or re-opens the call)."""
        self.closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
