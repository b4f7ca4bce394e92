"""Crash-safe record of what each call sent to the model since the model's last resume handle.

Why: the Live layer replays caller audio sent after the latest resumable handle when *it* reconnects,
but that buffer lives in the AI worker's memory. If the worker is SIGKILLed mid-utterance, the words
already read from the uplink ring and sent on the dead connection are gone from the ring too, and the
resumed session only knows the conversation up to the handle. This journal keeps exactly that gap —
turn starts, audio, turn ends not yet covered by a handle — in a tmpfs file per (slot, generation)
that outlives the process. Which turns a handle covers follows the Live layer's rule: every caller turn
gets exactly one outcome (``turnComplete`` or ``interrupted``), in order, and a handle covers the turns
answered before it arrived (see ``workers/ai/live.py``). The replacement worker replays the journal
into the resumed session, so no caller audio is lost across a worker crash.

Why a plain file on /dev/shm: appends are one ``write(2)`` per tick per talking call (~2 µs), the
kernel keeps the data when the writer dies, and nothing needs ordering beyond "the writer is dead
before the reader starts". The file is truncated at every new handle, so it stays small (a few
seconds of 16 kHz audio); it is capped at ``MAX_BYTES`` (older content is kept, newer dropped and
logged) so a model that never sends handles cannot fill memory.

Record format: ``kind`` (1 byte: S start, A audio, T text such as keypad digits, E end) + ``len``
(u32 LE) + payload.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from pathlib import Path

log = logging.getLogger(__name__)

START, AUDIO, END, TEXT = b"S", b"A", b"E", b"T"
_HDR = struct.Struct("<cI")
MAX_BYTES = 16000 * 2 * 300  # 5 minutes of 16 kHz audio
DEFAULT_DIR = Path("/dev/shm")


def journal_path(directory: Path, segment: str, slot: int, generation: int) -> Path:
    """The journal file of one (slot, generation) of a segment."""
    return directory / f"{segment.strip('/')}-ai{slot}-g{generation}.journal"


class TurnJournal:
    """Append-only journal of one call; ``clear`` at each new resume handle, ``remove`` when the call ends."""

    __slots__ = ("_fd", "_size", "full", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        self.full = False

    def _append(self, kind: bytes, payload: bytes = b"") -> None:
        if self._fd < 0:
            return
        n = _HDR.size + len(payload)
        if self._size + n > MAX_BYTES:
            if not self.full:
                self.full = True
                log.warning("turn journal full; newer audio is not crash-safe",
                            extra={"path": str(self.path)})
            return
        os.write(self._fd, _HDR.pack(kind, len(payload)) + payload)
        self._size += n

    def start(self) -> None:
        self._append(START)

    def audio(self, pcm: bytes) -> None:
        if pcm:
            self._append(AUDIO, pcm)

    def text(self, text: str) -> None:
        if text:
            self._append(TEXT, text.encode())

    def end(self) -> None:
        self._append(END)

    def clear(self) -> None:
        """The model confirmed everything so far (new resume handle): forget it."""
        if self._fd >= 0 and self._size:
            os.ftruncate(self._fd, 0)
            self._size = 0
            self.full = False

    def confirm(self, ends: int) -> None:
        """A new resume handle covers the first ``ends`` caller turns: drop them, keep what follows
        (e.g. the start of a turn the caller began while the model was still answering)."""
        if self._fd < 0 or not self._size or ends <= 0:
            return
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        off = 0
        seen = 0
        while off + _HDR.size <= len(data) and seen < ends:
            kind, n = _HDR.unpack_from(data, off)
            off += _HDR.size + n
            if kind == END:
                seen += 1
        rest = data[off:]
        os.ftruncate(self._fd, 0)
        if rest:
            os.write(self._fd, rest)
        self._size = len(rest)
        self.full = False

    def records(self) -> list[tuple[bytes, bytes]]:
        """Everything recorded (kind, payload), in order; a torn last record is ignored."""
        if self._fd < 0:
            return []
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        out: list[tuple[bytes, bytes]] = []
        off = 0
        while off + _HDR.size <= len(data):
            kind, n = _HDR.unpack_from(data, off)
            if kind not in (START, AUDIO, TEXT, END) or off + _HDR.size + n > len(data):
                break
            out.append((kind, data[off + _HDR.size: off + _HDR.size + n]))
            off += _HDR.size + n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """The call ended: close and delete the file."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


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
