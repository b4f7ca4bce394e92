"""Call recording in the AI worker: both legs into one stereo Ogg Opus file, sealed at rest, off the tick.

The tick only enqueues (one ``SimpleQueue.put`` per 20 ms of caller audio and per model chunk; bounded
by bytes, what does not fit is dropped, counted and marked as a gap). One writer thread per worker
process resamples, encodes, muxes, seals and writes. Why a thread and not a process: the heavy calls
(PyAV's libopus encode, soxr) release the GIL, so the loop is not held up, and a thread needs no second
copy of the call table. Why PyAV (already a dependency): it brings libopus *and* a conformant Ogg
muxer (granule positions, pre-skip, OpusTags) — the media worker's ctypes binding is mono and has no
container. Storage format, sidecar and pause flag: ``appliance/compliance/recordings.py``.

Timeline: the caller's audio is the clock (the media worker writes one 20 ms frame per tick for the
whole call), so left-channel sample ``n`` is call time ``n``. Model audio (and prompts: greeting, "please
hold" — AI-generated too) is laid on the right channel where it would start playing: after what is
already queued, never before "now"; a barge-in or ``interrupted`` drops what had not yet been played.
The right channel's spans with audio are the AI-generated segments in the sidecar.

Pauses (an operator's ``control/<session>.pause`` flag, polled every 200 ms, or the call's
``secure_entry_active`` — keypad card entry, workers/ai/call.py) record silence on both channels and a
gap ``{start_ms, end_ms, reason}`` in the sidecar, so the file's time stays the call's time.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.compliance.envelope import Keyring
from appliance.compliance.recordings import (
    SUFFIX,
    glob_escape,
    pause_path,
    recordings_root,
    records_audio,
    write_chunk,
)
from appliance.config import Config, tenant

log = logging.getLogger(__name__)

RATE = 24000  # the encoder's input: the model's rate; the caller's 16 kHz is resampled up
FRAME = 480  # 20 ms
MAX_QUEUED_BYTES = 8 * 1024 * 1024  # ~2.5 min of one call's both legs, seconds for a full shard
SEAL_BYTES = 64 * 1024  # a sealed chunk at least this big ...
SEAL_SECONDS = 5.0  # ... or this old (what a crash can lose)
PAUSE_POLL_SECONDS = 0.2
# 40 kbps constrained VBR, "audio" application (measured, docs/compliance.md "Recording"): below ~40 kbps
# libopus narrows the stereo image and one leg leaks into the other (-17..-32 dB); "voip" filters the
# waveform (correlation with the input 0.82 instead of 0.96)
BITRATE = 40000


class _Tap:
    """The worker side of one call's recording (lives on the loop thread)."""

    __slots__ = ("key", "lost", "owner", "secure")

    def __init__(self, owner: Recordings, key: tuple[int, int]) -> None:
        self.owner, self.key, self.lost, self.secure = owner, key, 0, False

    def played(self, pcm24k: bytes) -> None:
        self.owner.put(("model", self.key, bytes(pcm24k)), len(pcm24k))

    def flushed(self) -> None:
        self.owner.put(("flush", self.key, None), 0)


class Recordings:
    """One per AI worker (``shard``): which calls record, and the writer thread."""

    def __init__(self, cfg: Config, shard: int, event: Callable[..., None] | None = None) -> None:
        """``event(call, type, **data)``: a record event (workers/ai/records.py), audited as
        ``recording.started`` / ``recording.paused`` / ``recording.resumed`` (compliance/trail.py)."""
        self.cfg = cfg
        self._event = event
        self.dir = recordings_root(cfg) / f"shard-{shard}"
        self.shard = shard
        self._q: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._queued = 0  # audio bytes in the queue (both threads change it: under _lock)
        self._lock = threading.Lock()
        self._taps: dict[tuple[int, int], _Tap] = {}
        self._thread: threading.Thread | None = None
        self.dropped_bytes = 0
        self.writer_errors = 0

    # -- called from the loop ----------------------------------------------------------------------
    def policy(self, options: dict[str, object]) -> str:
        """The call's ``recording`` option if set, else its tenant's (``compliance.recording`` for the
        default tenant)."""
        own = str(options.get("recording") or "")
        if own:
            return own
        try:
            return tenant(self.cfg, str(options.get("tenant") or "") or None).recording
        except KeyError:
            return tenant(self.cfg, None).recording

    def attached(self, call: Any) -> None:
        """A call was attached: start its recording when its policy keeps audio."""
        if call.key in self._taps or not records_audio(self.policy(call.options)):
            return
        tap = self._taps[call.key] = _Tap(self, call.key)
        call.playback.tap = tap
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"recorder-{self.shard}", daemon=True)
            self._thread.start()
        self._q.put(("start", call.key, (call.session_id, str(call.options.get("tenant") or ""))))
        self._note(call, "recording_started")
        log.info("recording started", extra={"session": call.session_id})

    def _note(self, call: Any, type_: str, **data: Any) -> None:
        if self._event is not None:
            self._event(call, type_, **data)

    def caller_audio(self, call: Any, pcm16k: bytes) -> None:
        tap = self._taps.get(call.key)
        if tap is None:
            return
        # secure keypad entry (PCI): a read-only property of the call (workers/ai/call.py); absent → off
        secure = bool(getattr(call, "secure_entry_active", False))
        if secure != tap.secure:
            tap.secure = secure
            self._note(call, "recording_paused" if secure else "recording_resumed", reason="secure_entry")
        if self.put(("caller", call.key, (pcm16k, secure, tap.lost)), len(pcm16k)):
            tap.lost = 0
        else:
            tap.lost += len(pcm16k)

    def closed(self, call: Any) -> None:
        tap = self._taps.pop(call.key, None)
        if tap is None:
            return
        call.playback.tap = None
        ended = not call.slot.is_current(call.generation)  # else another worker carries on: a new part
        self._q.put(("stop", call.key, ended))

    def put(self, item: tuple[str, Any, Any], size: int) -> bool:
        with self._lock:
            if self._queued + size > MAX_QUEUED_BYTES:
                self.dropped_bytes += size
                return False
            self._queued += size
        self._q.put(item)
        return True

    def _taken(self, size: int) -> None:
        with self._lock:
            self._queued -= size

    def close(self, timeout: float = 10.0) -> None:
        """Finish every open recording (the worker is stopping)."""
        if self._thread is None:
            return
        self._q.put(("shutdown", None, None))
        self._thread.join(timeout)
        self._thread = None

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        writers: dict[tuple[int, int], _Writer] = {}
        keyring: Keyring | None = None
        polled = 0.0
        while True:
            try:
                kind, key, data = self._q.get(timeout=PAUSE_POLL_SECONDS)
            except queue.Empty:
                kind, key, data = "idle", None, None
            try:
                match kind:
                    case "start":
                        if keyring is None:
                            keyring = _keyring(self.cfg, self.dir)
                        old = writers.pop(key, None)
                        if old is not None:
                            old.close(ended=True)
                        session, tenant_name = data
                        writers[key] = _Writer.create(self.dir, keyring, session, tenant_name, self.shard)
                    case "caller":
                        self._taken(len(data[0]))
                        w = writers.get(key)
                        if w is not None:
                            w.caller(*data)
                    case "model":
                        self._taken(len(data))
                        w = writers.get(key)
                        if w is not None:
                            w.model(data)
                    case "flush":
                        w = writers.get(key)
                        if w is not None:
                            w.flush()
                    case "stop":
                        w = writers.pop(key, None)
                        if w is not None:
                            w.close(ended=bool(data))
                    case "shutdown":
                        for w in writers.values():
                            w.close(ended=False)
                        return
            except Exception as exc:  # one recording's failure: it stops, the others and the call go on
                self.writer_errors += 1
                log.error("recording failed", exc_info=exc, extra={"kind": kind})
                bad = writers.pop(key, None) if key is not None else None
                if bad is not None:
                    with contextlib.suppress(Exception):
                        bad.abort(str(exc))
            now = time.monotonic()
            if now - polled >= PAUSE_POLL_SECONDS:
                polled = now
                for key, w in list(writers.items()):
                    try:
                        w.poll_pause()
                    except OSError as exc:  # e.g. the sidecar cannot be written (disk full)
                        self.writer_errors += 1
                        log.error("recording failed", extra={"session": w.session, "error": str(exc)})
                        writers.pop(key, None)
                        with contextlib.suppress(Exception):
                            w.abort(str(exc))


def _keyring(cfg: Config, directory: Path) -> Keyring:
    from appliance.compliance.atrest import SpoolKeyStore, load_master

    directory.mkdir(parents=True, exist_ok=True)
    return Keyring(load_master(cfg), SpoolKeyStore(directory / "keys.json"))


class _Sink(io.RawIOBase):
    """Where the Ogg muxer writes: memory, sealed into the file in chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += b
        return len(b)


@dataclass
class _Writer:
    """One part of one call's recording (writer thread only)."""

    session: str
    tenant: str
    part: int
    audio: Path
    sidecar: Path
    keyring: Keyring
    file: Any
    root: Path
    container: Any = None
    stream: Any = None
    resampler: Any = None
    sink: _Sink = field(default_factory=_Sink)
    left: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    right: bytearray = field(default_factory=bytearray)  # right[0] is the sample at ``pos``
    pos: int = 0  # samples (24 kHz) encoded
    chunks: int = 0
    sealed_at: float = field(default_factory=time.monotonic)
    ai: list[list[int]] = field(default_factory=list)  # [start, end) samples
    gaps: list[dict[str, Any]] = field(default_factory=list)
    admin_paused: bool = False
    secure: bool = False
    started_at: float = field(default_factory=time.time)

    @classmethod
    def create(cls, directory: Path, keyring: Keyring, session: str, tenant_name: str, shard: int) -> _Writer:
        import av
        import soxr

        directory.mkdir(parents=True, exist_ok=True)
        pattern = f"{glob_escape(session)}.*{SUFFIX}"
        taken = [p.name[len(session) + 1: -len(SUFFIX)] for p in directory.glob(pattern)]
        part = max((int(n) for n in taken if n.isdigit()), default=0) + 1
        audio = directory / f"{session}.{part}{SUFFIX}"
        fd = os.open(audio, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        w = cls(session, tenant_name, part, audio, directory / f"{session}.{part}.json", keyring,
                os.fdopen(fd, "wb"), directory.parent)
        w.container = av.open(w.sink, mode="w", format="ogg")
        w.stream = w.container.add_stream("libopus", rate=RATE, layout="stereo")
        # unconstrained VBR in "audio" mode overshoots ~1.6x on speech: constrained keeps ~5 KB/s
        w.stream.codec_context.options = {"b": str(BITRATE), "vbr": "constrained", "application": "audio",
                                          "compression_level": "3"}
        # the marking inside the file itself (OpusTags); the segments are in the sidecar
        w.stream.metadata.update({"TITLE": f"call {session}", "CHANNEL_LEFT": "caller",
                                  "CHANNEL_RIGHT": "ai-generated (model speech and prompts)",
                                  "AI_GENERATED": "right channel; segments in the .json sidecar"})
        w.resampler = soxr.ResampleStream(16000, RATE, 1, dtype="int16")
        w.poll_pause()
        w.write_sidecar(complete=False)
        return w

    # -- input -------------------------------------------------------------------------------------
    @property
    def heard(self) -> int:
        """Call time (samples) of the newest caller audio received."""
        return self.pos + len(self.left)

    def caller(self, pcm16k: bytes, secure: bool, lost: int) -> None:
        if lost:  # dropped under overload: silence, marked
            at = self.heard
            self._append_left(np.zeros(lost // 2 * RATE // 16000, np.int16))
            self.gaps.append({"start_ms": at // 24, "end_ms": self.heard // 24, "reason": "overload"})
        if secure != self.secure:
            self.secure = secure
            self._pause_changed("secure_entry", secure)
        self._append_left(self.resampler.resample_chunk(np.frombuffer(pcm16k, np.int16)))

    def model(self, pcm24k: bytes) -> None:
        offset = max(len(self.right) // 2, self.heard - self.pos)
        if offset * 2 > len(self.right):
            self.right += bytes(offset * 2 - len(self.right))
        self.right += pcm24k
        start, end = self.pos + offset, self.pos + len(self.right) // 2
        if self.ai and start <= self.ai[-1][1] + FRAME:
            self.ai[-1][1] = end
        else:
            self.ai.append([start, end])

    def flush(self) -> None:
        """Queued model audio was dropped before it played (barge-in, ``interrupted``)."""
        keep = max(0, self.heard - self.pos)
        del self.right[keep * 2:]
        now = self.heard
        while self.ai and self.ai[-1][0] >= now:
            self.ai.pop()
        if self.ai and self.ai[-1][1] > now:
            self.ai[-1][1] = now

    def poll_pause(self) -> None:
        paused = pause_path(self.root, self.session).exists()
        if paused != self.admin_paused:
            self.admin_paused = paused
            self._pause_changed("operator", paused)

    def _pause_changed(self, reason: str, on: bool) -> None:
        at = self.heard // 24
        if on:
            self.gaps.append({"start_ms": at, "end_ms": None, "reason": reason})
        else:
            for g in reversed(self.gaps):
                if g["reason"] == reason and g["end_ms"] is None:
                    g["end_ms"] = at
                    break
        log.info("recording paused" if on else "recording resumed",
                 extra={"session": self.session, "reason": reason})
        self.write_sidecar(complete=False)

    # -- encoding ----------------------------------------------------------------------------------
    def _append_left(self, x: np.ndarray) -> None:
        if x.size:
            self.left = np.concatenate([self.left, x.astype(np.int16, copy=False)])
        self._encode(final=False)

    def _encode(self, *, final: bool) -> None:
        import av

        while len(self.left) >= FRAME or (final and len(self.left)):
            left = self.left[:FRAME]
            self.left = self.left[FRAME:]
            if len(left) < FRAME:
                left = np.concatenate([left, np.zeros(FRAME - len(left), np.int16)])
            raw = bytes(self.right[:FRAME * 2])
            del self.right[:FRAME * 2]
            right = np.frombuffer(raw + bytes(FRAME * 2 - len(raw)), np.int16)
            stereo = np.zeros(FRAME * 2, np.int16)
            if not (self.admin_paused or self.secure):
                stereo[0::2], stereo[1::2] = left, right
            frame = av.AudioFrame.from_ndarray(stereo.reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = RATE
            frame.pts = self.pos
            self.pos += FRAME
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        if len(self.sink.buf) >= SEAL_BYTES or (self.sink.buf and
                                                time.monotonic() - self.sealed_at >= SEAL_SECONDS):
            self._seal(final=False)

    def _seal(self, *, final: bool) -> None:
        data = bytes(self.sink.buf)
        self.sink.buf.clear()
        write_chunk(self.file, self.keyring, data, session=self.session, part=self.part, index=self.chunks,
                    final=final, tenant=self.tenant)
        self.file.flush()
        self.chunks += 1
        self.sealed_at = time.monotonic()

    def close(self, *, ended: bool) -> None:
        self._append_left(self.resampler.resample_chunk(np.zeros(0, np.int16), last=True))
        self._encode(final=True)
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        self._seal(final=True)
        os.fsync(self.file.fileno())
        self.file.close()
        end = self.pos // 24
        for g in self.gaps:
            if g["end_ms"] is None:
                g["end_ms"] = end
        self.write_sidecar(complete=True, ended_at=time.time() if ended else None)
        log.info("recording finished", extra={"session": self.session, "part": self.part,
                                              "seconds": round(self.pos / RATE, 2)})

    def abort(self, error: str) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        self.write_sidecar(complete=False, error=error[:200])

    def write_sidecar(self, *, complete: bool, ended_at: float | None = None, error: str = "") -> None:
        meta: dict[str, Any] = {
            "version": 1, "format": "audio/ogg; codecs=opus", "session_id": self.session, "part": self.part,
            "tenant": self.tenant or "default", "started_at": self.started_at, "ended_at": ended_at,
            "duration_ms": self.pos // 24, "sample_rate": RATE,
            "channels": {"left": "caller", "right": "ai"},
            "ai_generated": {"channel": "right", "marking": "EU AI Act art. 50(2)",
                             "segments": [{"start_ms": s // 24, "end_ms": e // 24} for s, e in self.ai]},
            "gaps": self.gaps, "complete": complete,
            "encryption": {"scheme": "AES-256-GCM envelope (appliance/compliance/envelope.py)",
                           "chunks": self.chunks},
        }
        if error:
            meta["error"] = error
        tmp = self.sidecar.with_name(f".{self.sidecar.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, self.sidecar)
