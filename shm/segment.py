"""One POSIX shared-memory segment per shard: header, heartbeats and the session slot table.

Why shared memory and not sockets: the media and AI workers exchange 20 ms PCM frames for up to
hundreds of calls; a mapped SPSC ring costs ~2 µs CPU per frame per side and survives either worker
restarting (the replacement maps the segment and finds every live session and both ring cursors).
``posix_ipc`` + ``mmap`` give named segments under ``/dev/shm`` that any process can attach by name.

Who writes what (see docs/architecture.md):

* supervisor: creates/unlinks the segment, ``Slot.activate`` / ``begin_close`` / ``free``,
  ``remote_rtp_ip``/``remote_rtp_port`` (room mode learns them after join);
* media worker: uplink producer, downlink consumer, media counters, DTMF events (producer),
  ``hold_seq`` (``request_hold``), ``heartbeat("media")``;
* AI worker: uplink consumer, downlink producer (+ flush on barge-in), AI counters, event consumer,
  ``resume_handle`` / ``model_state`` / ``transcript``, ``release_seq`` (``release_hold``),
  ``protect_until``, ``heartbeat("ai")``.

Playback hold (provisional barge-in): the media worker pauses model audio the moment a loud caller
frame arrives and publishes that with ``request_hold`` (``hold_seq`` += 1); the AI worker, once its VAD
has decided, flushes the downlink (speech) or not (a cough) and then ``release_hold(seq)``. Playback is
held while ``hold_seq != release_seq``. Each word has one writer, so a restarted worker of either side
reads the other's word and carries on (docs/architecture.md "Barge-in").

Slot state and generation share one u64 word (``generation << 8 | state``) written only by the
supervisor with release stores, so one acquire load gives a consistent (state, generation) pair.
``activate`` bumps the generation *before* writing the session fields and publishes ACTIVE last;
``Slot.snapshot()`` re-checks the word after copying the fields (seqlock-style), so a reader never
acts on a half-written or reused slot. Workers remember (slot, generation) and drop their local
session when ``Slot.is_current(generation)`` turns false. Strings that change during a call
(remote address, resume handle, model state, transcript) are individually seqlocked.

Counters: ``Slot.counters`` holds a fixed set of named u64 counters (``MEDIA_COUNTERS`` written by
the media worker, ``AI_COUNTERS`` by the AI worker — one writer each, plain stores, racy-but-untorn
reads for metrics). New names may be appended to either tuple without changing the layout version
(up to 32 per block).

Threads: slot control-plane methods (state, snapshot, strings, events) may be called from several
threads of one process; each *side* of a ring (producer or consumer) must stay on one thread.
Errors are ``ShmError`` (or its subclasses ``RingClosedError`` / ``RingCorruptError``) and always name
the segment — a bad header, a closed segment or damaged cursors never crash the process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import posix_ipc

from shm import atomic
from shm import layout as L
from shm.atomic import SharedAtomics, buffer_address
from shm.audio import ring_bytes
from shm.errors import RingClosedError, RingCorruptError, ShmError
from shm.histograms import ShardHistograms
from shm.ring import Ring

__all__ = [
    "AI_COUNTERS",
    "MEDIA_COUNTERS",
    "MODEL_STATE_ENDED",
    "Counters",
    "EventCode",
    "RingClosedError",
    "RingCorruptError",
    "ShardSegment",
    "ShmError",
    "Slot",
    "SlotInfo",
    "SlotState",
    "cleanup_stale",
    "local_rtp_port",
    "ring_bytes",
    "segment_name",
]

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")
SHM_DIR = "/dev/shm"

MEDIA_COUNTERS: tuple[str, ...] = (
    "rx_packets", "rx_bytes", "rx_dropped", "rx_invalid", "tx_packets", "tx_bytes",
    "frames_up", "frames_down", "late", "lost", "concealed", "jitter_us", "dtmf_events",
    "downlink_underruns", "rtcp_packets", "fec_recovered", "pauses", "pause_timeouts",
)
AI_COUNTERS: tuple[str, ...] = (
    "chunks_sent", "audio_sent_ms", "audio_received_ms", "turns", "interruptions", "reconnects",
    "resumes", "tool_calls", "errors", "input_tokens", "output_tokens", "vad_frames", "speech_ms",
    "degraded", "frames_replayed", "tool_errors", "dtmf_sent", "pauses_confirmed", "pauses_released",
    "consent",  # workers/ai/consent.py: 1 given, 2 refused (survives an AI worker restart)
)
# ``Slot.model_state`` starting with this: the AI worker ended the call (e.g. "ended:consent_refused");
# the supervisor tears it down (appliance/sessions.py ``mirror_once``).
MODEL_STATE_ENDED = "ended:"
assert len(MEDIA_COUNTERS) <= L.COUNTERS_PER_BLOCK and len(AI_COUNTERS) <= L.COUNTERS_PER_BLOCK


class SlotState(IntEnum):
    """Lifecycle of a slot: FREE → ACTIVE → CLOSING → FREE (all transitions by the supervisor)."""

    FREE = 0
    ACTIVE = 1
    CLOSING = 2


class EventCode(IntEnum):
    """Event codes for ``Slot.push_event`` (media worker → AI worker)."""

    DTMF = 1  # value: RFC 4733 event code (0-9, 10 '*', 11 '#', 12-15 A-D)
    DTMF_END = 2  # value: duration in ms
    RTP_TIMEOUT = 3  # value: ms since the last packet


def segment_name(instance_id: str, shard: int) -> str:
    """The POSIX name of shard ``shard``'s segment: ``/va-<instance_id>-s<shard>``."""
    _check_instance(instance_id)
    if not isinstance(shard, int) or shard < 0:
        raise ShmError(f"segment for instance {instance_id!r}: shard must be an int >= 0, got {shard!r}")
    return f"/va-{instance_id}-s{shard}"


def local_rtp_port(rtp_port_min: int, shard: int, slots_per_shard: int, slot: int) -> int:
    """Deterministic media-worker RTP port of a slot (RTCP on +1), per docs/architecture.md."""
    return rtp_port_min + 2 * (shard * slots_per_shard + slot)


def _check_instance(instance_id: str) -> None:
    if not isinstance(instance_id, str) or not _INSTANCE_RE.match(instance_id):
        raise ShmError(f"instance id {instance_id!r} must be 1-48 chars of [A-Za-z0-9_.-]")


def cleanup_stale(instance_id: str) -> list[str]:
    """Unlink every segment of ``instance_id`` (``/dev/shm/va-<instance_id>-s<N>``); returns their names.

    Also deletes the AI workers' crash-replay journals of those segments in /dev/shm
    (``va-<instance_id>-s<N>-ai<slot>-g<gen>.journal``): they are meaningless without the segment.
    The patterns are exact, so instance ``a`` never touches instance ``a-b``'s (or ``a-s1``'s) files.
    """
    _check_instance(instance_id)
    iid = re.escape(instance_id)
    seg_pat = re.compile(rf"^va-{iid}-s\d+$")
    journal_pat = re.compile(rf"^va-{iid}-s\d+-ai\d+-g\d+\.journal$")
    removed: list[str] = []
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in sorted(entries):
        if seg_pat.match(entry):
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory("/" + entry)
                removed.append("/" + entry)
        elif journal_pat.match(entry):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
    return removed


@dataclass(frozen=True)
class SlotInfo:
    """A consistent copy of an ACTIVE slot's control block (see ``Slot.snapshot``)."""

    index: int
    generation: int
    session_id: str
    local_rtp_port: int
    remote_rtp_ip: str
    remote_rtp_port: int
    payload_type: int
    channels: int
    dtmf_payload_type: int
    mode: str
    options: dict[str, Any] = field(default_factory=dict)


class Counters:
    """Named u64 counters of one slot: ``add``, ``set`` (gauges such as jitter_us), ``get``, ``snapshot``."""

    __slots__ = ("_idx", "_q")

    def __init__(self, mv: memoryview, ctrl_off: int) -> None:
        self._q = mv[ctrl_off + L.CB_COUNTERS_MEDIA:ctrl_off + L.CB_COUNTERS_AI + 8 * L.COUNTERS_PER_BLOCK]
        self._q = self._q.cast("Q")
        idx = {n: i for i, n in enumerate(MEDIA_COUNTERS)}
        idx.update({n: L.COUNTERS_PER_BLOCK + i for i, n in enumerate(AI_COUNTERS)})
        self._idx = idx

    def _i(self, name: str) -> int:
        try:
            return self._idx[name]
        except KeyError:
            raise KeyError(f"unknown shm counter {name!r}; known: {sorted(self._idx)}") from None

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` (>= 0) to counter ``name`` (only its owning worker may call this)."""
        i = self._i(name)
        self._q[i] = (self._q[i] + n) & L.U64

    def set(self, name: str, value: int) -> None:
        """Set gauge-like counter ``name`` (e.g. ``jitter_us``) to ``value`` (0 ≤ value < 2**64)."""
        self._q[self._i(name)] = value & L.U64

    def get(self, name: str) -> int:
        """Current value of counter ``name``."""
        return self._q[self._i(name)]

    def snapshot(self) -> dict[str, int]:
        """All counters by name."""
        q = self._q
        return {n: q[i] for n, i in self._idx.items()}

    def reset(self) -> None:
        """Zero all counters (supervisor, on activation)."""
        for i in range(len(self._q)):
            self._q[i] = 0


class _SeqString:
    """A seqlocked length-prefixed UTF-8 string: one writer, any number of readers."""

    __slots__ = ("_a", "_addr", "_max", "_mv", "_off", "label")

    def __init__(self, mv: memoryview, base_addr: int, off: int, max_bytes: int, label: str) -> None:
        self._mv, self._off, self._max, self.label = mv, off, max_bytes, label
        self._addr = base_addr + off
        self._a = SharedAtomics()

    def write(self, value: str) -> None:
        data = value.encode()
        if len(data) > self._max:
            raise ValueError(f"{self.label}: {len(data)} bytes exceeds the {self._max}-byte limit")
        _seq_begin(self._a, self._addr)
        struct.pack_into("<I", self._mv, self._off + 8, len(data))
        d = self._off + L.SEQ_DATA
        self._mv[d:d + len(data)] = data
        self._a.fetch_add(self._addr, 1)  # even: published (release)

    def read(self) -> str:
        deadline = 0.0
        while True:
            s1 = self._a.load_acquire(self._addr)
            if s1 & 1:
                deadline = _seq_wait(deadline, self.label)
                continue
            (n,) = struct.unpack_from("<I", self._mv, self._off + 8)
            d = self._off + L.SEQ_DATA
            raw = self._mv[d:d + min(n, self._max)].tobytes()
            if self._a.load_release_rmw(self._addr) == s1:
                return raw.decode(errors="replace")
            deadline = _seq_wait(deadline, self.label)


_SEQ_WAIT_S = 0.05


def _seq_begin(a: SharedAtomics, addr: int) -> None:
    """Make a seqlock odd (writing). Already odd means a writer died mid-update: just take over."""
    if not a.load_acquire(addr) & 1:
        a.fetch_add(addr, 1)  # acq_rel: the data stores that follow cannot move before it


def _seq_wait(deadline: float, label: str) -> float:
    """Back off while a seqlock writer is mid-update; give up after ~50 ms with a clear error."""
    now = time.monotonic()
    if not deadline:
        return now + _SEQ_WAIT_S
    if now > deadline:
        raise ShmError(f"{label}: writer stuck mid-update (it died while writing; the next write repairs it)")
    time.sleep(0)
    return deadline


class Slot:
    """One session slot: control block, counters, events and the two rings."""

    def __init__(self, seg: ShardSegment, index: int, off: int) -> None:
        mv, base = seg._mv, seg._addr
        self._seg = seg
        self.index = index
        self._off = off
        self._label = f"segment {seg.name} slot {index}"
        self._a = SharedAtomics()
        self._gs = base + off + L.CB_GEN_STATE
        self._gsq = mv[off + L.CB_GEN_STATE:off + L.CB_GEN_STATE + 8].cast("Q")  # PLAIN_ORDERED reads
        self._remote_seq = base + off + L.CB_REMOTE_SEQ
        self.counters = Counters(mv, off)
        self._resume = _SeqString(mv, base, off + L.CB_RESUME, L.RESUME_MAX, f"{self._label} resume_handle")
        self._model = _SeqString(mv, base, off + L.CB_MODEL_STATE, L.MODEL_STATE_MAX,
                                 f"{self._label} model_state")
        self._transcript = _SeqString(mv, base, off + L.CB_TRANSCRIPT, L.TRANSCRIPT_MAX,
                                      f"{self._label} transcript")
        up_data = off + L.CTRL_SIZE
        down_data = up_data + seg.uplink_bytes
        self.uplink = Ring(mv, base, off + L.CB_UPLINK_HDR, up_data, seg.uplink_bytes,
                           f"{seg.name}[{index}].uplink")
        self.downlink = Ring(mv, base, off + L.CB_DOWNLINK_HDR, down_data, seg.downlink_bytes,
                             f"{seg.name}[{index}].downlink")
        self._hold = base + off + L.CB_HOLD
        self._release = base + off + L.CB_RELEASE
        self._protect = base + off + L.CB_PROTECT
        self._answer = mv[off + L.CB_ANSWER:off + L.CB_ANSWER + 16].cast("Q")
        self._ev_w = base + off + L.CB_EV_WRITE
        self._ev_r = base + off + L.CB_EV_READ
        self._eva_p = SharedAtomics()
        self._eva_c = SharedAtomics()
        self._mv = mv

    # ---- state / generation ------------------------------------------------------------------
    def _word(self) -> int:
        self._seg._check()
        if atomic.PLAIN_ORDERED:  # x86-64: a plain aligned load is an acquire (shm.atomic); 2x cheaper
            return self._gsq[0]
        return self._a.load_acquire(self._gs)

    @property
    def state(self) -> SlotState:
        """Current state (acquire load)."""
        return SlotState(self._word() & 0xFF)

    @state.setter
    def state(self, value: SlotState) -> None:
        self._set_state(SlotState(value))

    def _set_state(self, st: SlotState) -> None:
        word = self._word()
        self._a.store_release(self._gs, (word & ~0xFF) | int(st))

    @property
    def generation(self) -> int:
        """Bumped by every ``activate``; (index, generation) names one session for its lifetime."""
        return self._word() >> 8

    def is_current(self, generation: int) -> bool:
        """True while this slot is still ACTIVE with ``generation`` (the worker-side reuse guard)."""
        return self._word() == (generation << 8) | SlotState.ACTIVE

    def activate(self, *, session_id: str, local_rtp_port: int, remote_rtp_ip: str, remote_rtp_port: int,
                 payload_type: int, channels: int, dtmf_payload_type: int, mode: str,
                 options: dict[str, Any] | None = None) -> int:
        """Supervisor: fill a FREE slot for a new session and publish it ACTIVE; returns the generation."""
        lab = self._label
        sid = session_id.encode() if isinstance(session_id, str) else b""
        if not sid or len(sid) > L.SESSION_MAX:
            raise ShmError(f"{lab}: session_id must be 1..{L.SESSION_MAX} bytes, got {session_id!r}")
        _range(lab, "local_rtp_port", local_rtp_port, 1, 65535)
        _range(lab, "remote_rtp_port", remote_rtp_port, 0, 65535)
        _range(lab, "payload_type", payload_type, 0, 127)
        _range(lab, "channels", channels, 1, 2)
        _range(lab, "dtmf_payload_type", dtmf_payload_type, -1, 127)
        if mode not in L.MODES:
            raise ShmError(f"{lab}: mode must be one of {L.MODES}, got {mode!r}")
        ip = _check_ip(lab, remote_rtp_ip)
        try:
            opts = json.dumps(options or {}, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ShmError(f"{lab}: options are not JSON-serialisable: {exc}") from exc
        if len(opts) > L.OPTIONS_MAX:
            raise ShmError(f"{lab}: options JSON is {len(opts)} bytes, limit {L.OPTIONS_MAX}")
        word = self._word()
        if word & 0xFF != SlotState.FREE:
            raise ShmError(f"{lab}: cannot activate, state is {SlotState(word & 0xFF).name}")
        gen = ((word >> 8) + 1) & ((1 << 56) - 1)
        # bump the generation first (still FREE): a reader holding the old generation stops matching
        self._a.store_release(self._gs, gen << 8 | SlotState.FREE)
        self._a.fetch_add(self._gs, 0)  # acq_rel: keep the field writes below after the bump
        self.uplink.reset()
        self.downlink.reset()
        self.counters.reset()
        mv, off = self._mv, self._off
        for o in (L.CB_EV_WRITE, L.CB_EV_DROPPED, L.CB_EV_READ, L.CB_HOLD, L.CB_RELEASE, L.CB_PROTECT,
                  L.CB_ANSWER, L.CB_ANSWER + 8):
            struct.pack_into("<Q", mv, off + o, 0)
        struct.pack_into("<IIIiIII", mv, off + L.CB_LOCAL_PORT, local_rtp_port, payload_type, channels,
                         dtmf_payload_type, L.MODES.index(mode), len(sid), len(opts))
        mv[off + L.CB_SESSION:off + L.CB_SESSION + len(sid)] = sid
        mv[off + L.CB_OPTIONS:off + L.CB_OPTIONS + len(opts)] = opts
        self._write_remote(ip, remote_rtp_port)
        self._resume.write(str((options or {}).get("resume_handle", "") or ""))
        self._model.write("")
        self._transcript.write("")
        self._a.store_release(self._gs, gen << 8 | SlotState.ACTIVE)
        return gen

    def begin_close(self) -> None:
        """Supervisor: ACTIVE → CLOSING (workers close their local session on their next scan)."""
        self._set_state(SlotState.CLOSING)

    def free(self) -> None:
        """Supervisor: → FREE (slot may be activated again, with a new generation)."""
        self._set_state(SlotState.FREE)

    # ---- control block fields ----------------------------------------------------------------
    def _fixed(self) -> tuple[int, int, int, int, int, int, int]:
        self._seg._check()
        return struct.unpack_from("<IIIiIII", self._mv, self._off + L.CB_LOCAL_PORT)

    def _read_fixed(self) -> tuple[str, int, int, int, int, str, dict[str, Any]]:
        lp, pt, ch, dpt, mode, slen, olen = self._fixed()
        off = self._off
        sid = self._mv[off + L.CB_SESSION:off + L.CB_SESSION + min(slen, L.SESSION_MAX)].tobytes()
        raw = self._mv[off + L.CB_OPTIONS:off + L.CB_OPTIONS + min(olen, L.OPTIONS_MAX)].tobytes()
        try:
            opts = json.loads(raw) if raw else {}
        except ValueError:
            opts = {}
        mode_s = L.MODES[mode] if mode < len(L.MODES) else "direct"
        return sid.decode(errors="replace"), lp, pt, ch, dpt, mode_s, opts

    def snapshot(self) -> SlotInfo | None:
        """A consistent copy of the control block if the slot is ACTIVE, else None."""
        for _ in range(1000):
            w1 = self._word()
            if w1 & 0xFF != SlotState.ACTIVE:
                return None
            sid, lp, pt, ch, dpt, mode, opts = self._read_fixed()
            ip, rport = self._read_remote()
            if self._a.load_release_rmw(self._gs) == w1:
                return SlotInfo(self.index, w1 >> 8, sid, lp, ip, rport, pt, ch, dpt, mode, opts)
        raise ShmError(f"{self._label}: control block kept changing while being read")

    session_id = property(lambda self: self._read_fixed()[0], doc="session id")
    local_rtp_port = property(lambda self: self._fixed()[0], doc="port the media worker binds")
    payload_type = property(lambda self: self._fixed()[1], doc="Opus RTP payload type")
    channels = property(lambda self: self._fixed()[2], doc="Opus channels announced in SDP")
    dtmf_payload_type = property(lambda self: self._fixed()[3], doc="telephone-event PT (-1: none)")
    mode = property(lambda self: self._read_fixed()[5], doc="'direct' (NoSIP) or 'room' (AudioBridge)")
    options = property(lambda self: self._read_fixed()[6], doc="session options (JSON object)")

    def _write_remote(self, ip: str, port: int) -> None:
        data = ip.encode()
        a, mv, off = self._a, self._mv, self._off
        _seq_begin(a, self._remote_seq)
        struct.pack_into("<II", mv, off + L.CB_REMOTE_PORT, port, len(data))
        mv[off + L.CB_REMOTE_IP:off + L.CB_REMOTE_IP + len(data)] = data
        a.fetch_add(self._remote_seq, 1)

    def _read_remote(self) -> tuple[str, int]:
        a, mv, off = self._a, self._mv, self._off
        deadline = 0.0
        while True:
            s1 = a.load_acquire(self._remote_seq)
            if s1 & 1:
                deadline = _seq_wait(deadline, f"{self._label} remote address")
                continue
            port, n = struct.unpack_from("<II", mv, off + L.CB_REMOTE_PORT)
            ip = mv[off + L.CB_REMOTE_IP:off + L.CB_REMOTE_IP + min(n, L.REMOTE_IP_MAX)].tobytes()
            if a.load_release_rmw(self._remote_seq) == s1:
                return ip.decode(errors="replace"), port
            deadline = _seq_wait(deadline, f"{self._label} remote address")

    def set_remote(self, ip: str, port: int) -> None:
        """Supervisor: set Janus's plain-RTP address atomically (room mode learns it after join)."""
        _range(self._label, "remote_rtp_port", port, 0, 65535)
        self._seg._check()
        self._write_remote(_check_ip(self._label, ip), port)

    def remote(self) -> tuple[str, int]:
        """Janus's plain-RTP (ip, port) from one seqlocked read ("", 0 until known): the media worker's
        scan compares both every 100 ms per session, and two property reads cost two seqlock rounds."""
        self._seg._check()
        return self._read_remote()

    @property
    def remote_rtp_ip(self) -> str:
        """Janus's plain-RTP IP ("" until known)."""
        return self._read_remote()[0]

    @remote_rtp_ip.setter
    def remote_rtp_ip(self, ip: str) -> None:
        self.set_remote(ip, self._read_remote()[1])

    @property
    def remote_rtp_port(self) -> int:
        """Janus's plain-RTP port (0 until known)."""
        return self._read_remote()[1]

    @remote_rtp_port.setter
    def remote_rtp_port(self, port: int) -> None:
        self.set_remote(self._read_remote()[0], port)

    def _str_prop(self, f: _SeqString, value: str | None = None) -> str:
        self._seg._check()
        if value is None:
            return f.read()
        try:
            f.write(value)
        except ValueError as exc:
            raise ShmError(str(exc)) from None
        return value

    @property
    def resume_handle(self) -> str:
        """Latest resumable Live handle (AI worker writes, ≤ 1 KiB)."""
        return self._str_prop(self._resume)

    @resume_handle.setter
    def resume_handle(self, v: str) -> None:
        self._str_prop(self._resume, v)

    @property
    def model_state(self) -> str:
        """connecting/live/reconnecting/degraded (AI worker writes, ≤ 32 bytes)."""
        return self._str_prop(self._model)

    @model_state.setter
    def model_state(self, v: str) -> None:
        self._str_prop(self._model, v)

    @property
    def transcript(self) -> str:
        """Last transcript line (AI worker writes, ≤ 512 bytes; longer text: keep the tail)."""
        return self._str_prop(self._transcript)

    @transcript.setter
    def transcript(self, v: str) -> None:
        data = v.encode()
        if len(data) > L.TRANSCRIPT_MAX:  # keep the tail, on a UTF-8 boundary
            v = data[-L.TRANSCRIPT_MAX:].decode(errors="ignore")
        self._str_prop(self._transcript, v)

    # ---- playback hold (provisional barge-in) -------------------------------------------------
    def hold_words(self) -> tuple[int, int]:
        """(hold_seq, release_seq): playback is held while they differ."""
        self._seg._check()
        a = self._a
        return a.load_acquire(self._hold), a.load_acquire(self._release)

    def request_hold(self) -> int:
        """Media worker: pause model playback (a new hold); returns its ``hold_seq``."""
        self._seg._check()
        seq = (self._a.load_acquire(self._hold) + 1) & L.U64
        self._a.store_release(self._hold, seq)
        return seq

    def release_hold(self, seq: int) -> None:
        """AI worker: end hold ``seq`` (after flushing, if the caller really spoke)."""
        self._seg._check()
        self._a.store_release(self._release, seq & L.U64)

    @property
    def protect_until(self) -> int:
        """Downlink write cursor up to which audio is the uninterruptible greeting (AI worker writes)."""
        self._seg._check()
        return self._a.load_acquire(self._protect)

    @protect_until.setter
    def protect_until(self, cursor: int) -> None:
        self._seg._check()
        self._a.store_release(self._protect, cursor & L.U64)

    # ---- answer clock (turn latency metrics, shm/histograms.py) ------------------------------------
    def set_answer(self, speech_end_ns: int, model_audio_ns: int) -> None:
        """AI worker: the caller's speech end and the answer's first model audio (CLOCK_MONOTONIC ns).
        The media worker reads them when that answer's first RTP packet goes out; a torn pair (no
        ordering between the two stores) costs at most one sample, which ``answer`` sanity-checks."""
        self._seg._check()
        a = self._answer
        a[0] = speech_end_ns & L.U64
        a[1] = model_audio_ns & L.U64

    def answer(self) -> tuple[int, int]:
        """(speech_end_ns, model_audio_ns) of the latest answer (0, 0 before the first)."""
        self._seg._check()
        a = self._answer
        return a[0], a[1]

    # ---- events (SPSC, media worker → AI worker) -----------------------------------------------
    def push_event(self, code: int, value: int) -> bool:
        """Queue an event (e.g. DTMF); False (and counted) if the 64-entry queue is full."""
        self._seg._check()
        mv, off = self._mv, self._off
        (w,) = struct.unpack_from("<Q", mv, off + L.CB_EV_WRITE)
        r = self._eva_p.load_acquire(self._ev_r)
        if (w - r) & L.U64 >= L.EVENTS_CAP:
            (d,) = struct.unpack_from("<Q", mv, off + L.CB_EV_DROPPED)
            struct.pack_into("<Q", mv, off + L.CB_EV_DROPPED, d + 1)
            return False
        struct.pack_into("<qq", mv, off + L.CB_EV_ENTRIES + (w % L.EVENTS_CAP) * L.EVENT_SIZE, code, value)
        self._eva_p.store_release(self._ev_w, (w + 1) & L.U64)
        return True

    def pop_events(self) -> list[tuple[int, int]]:
        """Take all queued events, oldest first."""
        self._seg._check()
        mv, off = self._mv, self._off
        (r,) = struct.unpack_from("<Q", mv, off + L.CB_EV_READ)
        w = self._eva_c.load_acquire(self._ev_w)
        n = (w - r) & L.U64
        if n == 0 or n > L.EVENTS_CAP:
            return []
        out = [struct.unpack_from("<qq", mv, off + L.CB_EV_ENTRIES + ((r + i) % L.EVENTS_CAP) * L.EVENT_SIZE)
               for i in range(n)]
        self._eva_c.store_release(self._ev_r, w)
        return out

    @property
    def events_dropped(self) -> int:
        """Events lost because the queue was full."""
        self._seg._check()
        return struct.unpack_from("<Q", self._mv, self._off + L.CB_EV_DROPPED)[0]

    def __repr__(self) -> str:
        return f"<Slot {self._label}>"


def _range(label: str, name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ShmError(f"{label}: {name} must be an integer in {lo}..{hi}, got {value!r}")


def _check_ip(label: str, ip: str) -> str:
    if ip == "":
        return ip
    try:
        return str(ipaddress.ip_address(ip))
    except (ValueError, TypeError):
        raise ShmError(f"{label}: remote_rtp_ip {ip!r} is not an IP address") from None


class ShardSegment:
    """A mapped shard segment. ``create`` (supervisor) or ``attach`` (workers); ``close`` unmaps."""

    def __init__(self, name: str, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self._mm = mm
        self._mv = memoryview(mm)
        self._addr, self._keeper = buffer_address(mm)
        self._closed = False
        try:
            self._load_header(size)
        except BaseException:
            self._unmap()
            raise
        self._slots = [Slot(self, i, L.HEADER_SIZE + i * self.slot_size) for i in range(self.n_slots)]
        self._hb = {role: self._mv[o:o + 16].cast("Q") for role, o in L.H_HEARTBEAT.items()}
        self._hist = {role: ShardHistograms(self._mv, role) for role in L.H_HIST}  # type: ignore[arg-type]

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, *, slots: int, uplink_bytes: int, downlink_bytes: int,
               instance_id: str) -> ShardSegment:
        """Create and initialise a new segment (fails if ``name`` exists: run ``cleanup_stale`` first)."""
        _check_instance(instance_id)
        if not isinstance(slots, int) or not 1 <= slots <= 4096:
            raise ShmError(f"segment {name}: slots must be 1..4096, got {slots!r}")
        for what, v in (("uplink_bytes", uplink_bytes), ("downlink_bytes", downlink_bytes)):
            if not isinstance(v, int) or not 640 <= v <= 1 << 26:
                raise ShmError(f"segment {name}: {what} must be 640..{1 << 26}, got {v!r}")
        up, down = L.ring_capacity(uplink_bytes), L.ring_capacity(downlink_bytes)
        ssize = L.slot_size(up, down)
        total = L.HEADER_SIZE + slots * ssize
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError:
            raise ShmError(f"segment {name} already exists (stale? cleanup_stale() removes it)") from None
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise ShmError(f"segment {name}: cannot create ({exc})") from exc
        try:
            mm = mmap.mmap(shm.fd, total)
        except OSError as exc:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise ShmError(f"segment {name}: cannot map {total} bytes ({exc})") from exc
        finally:
            if shm.fd >= 0:
                shm.close_fd()
        hdr = bytearray(L.H_CRC_COVERS)
        hdr[0:8] = L.MAGIC
        struct.pack_into("<IIII", hdr, L.H_VERSION, L.LAYOUT_VERSION, L.HEADER_SIZE, slots, ssize)
        struct.pack_into("<QQQQQ", hdr, L.H_UPLINK, up, down, total, time.time_ns(), os.getpid())
        iid = instance_id.encode()
        hdr[L.H_INSTANCE:L.H_INSTANCE + len(iid)] = iid
        mm[0:L.H_CRC_COVERS] = bytes(hdr)
        mm[L.H_CRC:L.H_CRC + 4] = struct.pack("<I", zlib.crc32(hdr))
        return cls(name, total, mm)

    @classmethod
    def attach(cls, name: str) -> ShardSegment:
        """Map an existing segment and validate its header (magic, version, sizes, checksum)."""
        try:
            shm = posix_ipc.SharedMemory(name, 0)
        except posix_ipc.ExistentialError:
            raise ShmError(f"segment {name} does not exist") from None
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise ShmError(f"segment {name}: cannot open ({exc})") from exc
        try:
            size = shm.size
            if size < L.HEADER_SIZE:
                raise ShmError(f"segment {name}: {size} bytes is smaller than the header")
            mm = mmap.mmap(shm.fd, size)
        except OSError as exc:
            raise ShmError(f"segment {name}: cannot map ({exc})") from exc
        finally:
            shm.close_fd()
        return cls(name, size, mm)

    def _load_header(self, size: int) -> None:
        n = self.name
        mv = self._mv
        if mv[0:8].tobytes() != L.MAGIC:
            raise ShmError(f"segment {n}: bad magic {mv[0:8].tobytes()!r} (not a voice-appliance segment)")
        version, hsize, slots, ssize = struct.unpack_from("<IIII", mv, L.H_VERSION)
        if version != L.LAYOUT_VERSION:
            raise ShmError(f"segment {n}: layout version {version}, this build speaks {L.LAYOUT_VERSION} "
                           "(restart the supervisor after an upgrade)")
        (crc,) = struct.unpack_from("<I", mv, L.H_CRC)
        if zlib.crc32(mv[0:L.H_CRC_COVERS]) != crc:
            raise ShmError(f"segment {n}: header checksum mismatch (corrupt header)")
        up, down, total, created, pid = struct.unpack_from("<QQQQQ", mv, L.H_UPLINK)
        if hsize != L.HEADER_SIZE or not 1 <= slots <= 4096:
            raise ShmError(f"segment {n}: header size {hsize} / slot count {slots} out of range")
        for what, v in (("uplink", up), ("downlink", down)):
            if v < L.PAGE or v & (v - 1) or v > 1 << 26:
                raise ShmError(f"segment {n}: {what} ring size {v} invalid")
        if ssize != L.slot_size(up, down) or total != L.HEADER_SIZE + slots * ssize or total > size:
            raise ShmError(f"segment {n}: sizes inconsistent (slot {ssize}, total {total}, mapped {size})")
        self.n_slots, self.slot_size, self.uplink_bytes, self.downlink_bytes = slots, ssize, up, down
        self.total_size, self.created_ns, self.creator_pid = total, created, pid
        self.instance_id = mv[L.H_INSTANCE:L.H_INSTANCE + L.INSTANCE_MAX].tobytes().rstrip(b"\0").decode()

    # ---- API ---------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ShmError(f"segment {self.name} is closed")

    def slot(self, i: int) -> Slot:
        """Slot ``i`` (0 ≤ i < n_slots)."""
        self._check()
        if not isinstance(i, int) or not 0 <= i < self.n_slots:
            raise ShmError(f"segment {self.name}: slot index {i!r} out of range 0..{self.n_slots - 1}")
        return self._slots[i]

    def slots(self) -> Iterator[Slot]:
        """All slots in index order."""
        self._check()
        return iter(self._slots)

    def active(self) -> list[SlotInfo]:
        """Snapshots of every ACTIVE slot (the workers' per-tick scan)."""
        self._check()
        out = []
        for s in self._slots:
            info = s.snapshot()
            if info is not None:
                out.append(info)
        return out

    def heartbeat(self, role: Literal["media", "ai"]) -> None:
        """Record that ``role``'s worker (this process) is alive now."""
        self._check()
        hb = self._hb_words(role)
        hb[0] = os.getpid()
        hb[1] = time.monotonic_ns()

    def heartbeat_age(self, role: Literal["media", "ai"]) -> tuple[int | None, float | None]:
        """(pid, seconds since its last beat) of ``role``'s worker, or (None, None) if it never beat."""
        self._check()
        hb = self._hb_words(role)
        pid, ns = hb[0], hb[1]
        if ns == 0:
            return None, None
        return pid, max(0.0, (time.monotonic_ns() - ns) / 1e9)

    def heartbeat_ns(self, role: Literal["media", "ai"]) -> int:
        """CLOCK_MONOTONIC ns of ``role``'s last beat (0: never). The media worker beats at the end of
        each 20 ms tick, so this is also the phase of its tick grid (the AI worker locks onto it)."""
        self._check()
        return int(self._hb_words(role)[1])

    def histograms(self, role: Literal["media", "ai"]) -> ShardHistograms:
        """``role``'s latency histogram block (shm/histograms.py): that worker observes, anyone reads."""
        self._check()
        return self._hist[role]

    def _hb_words(self, role: str) -> memoryview:
        try:
            return self._hb[role]
        except KeyError:
            raise ShmError(f"segment {self.name}: unknown heartbeat role {role!r} (media|ai)") from None

    def close(self) -> None:
        """Unmap (idempotent). Slots and rings of this object become unusable (ShmError/RingClosedError)."""
        if self._closed:
            return
        self._closed = True
        for s in self._slots:
            s.uplink._close()
            s.downlink._close()
            s.counters._q.release()
            s._gsq.release()
            s._answer.release()
        for hb in self._hb.values():
            hb.release()
        for h in self._hist.values():
            h.release()
        self._unmap()

    def _unmap(self) -> None:
        self._closed = True
        self._keeper = None
        self._mv.release()
        with contextlib.suppress(BufferError):
            self._mm.close()

    def unlink(self) -> None:
        """Remove the name from /dev/shm (mappings stay valid until closed)."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.name)

    def __enter__(self) -> ShardSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ShardSegment {self.name} slots={getattr(self, 'n_slots', '?')}>"
