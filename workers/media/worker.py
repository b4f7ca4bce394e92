"""The media worker of one shard: RTP/Opus between Janus and the shard's shared-memory rings.

One process per shard, pinned to a CPU, single-threaded around an epoll selector and a drift-free 20 ms
tick (:mod:`workers.media.pacing`). Why one thread and not asyncio: the per-packet work is a few
microseconds, asyncio's datagram callbacks cost ~11 µs per packet (FACTS) and its timers drift; a
plain ``selector.select(timeout_until_next_deadline)`` loop has neither problem.

Per session (one ACTIVE slot of the segment):
- UDP socket bound to the slot's deterministic ``local_rtp_port`` (RTCP socket on +1) on
  ``media.rtp_host``; RTP is sent *from* that socket to Janus's plain-RTP address (Janus ``connect()``s
  its side, so it only accepts packets from the port it was told).
- Uplink: packets from any other address, invalid RTP, other payload types, other SSRCs (until a new
  SSRC proves itself for 2 sequential packets while the old one is silent), and corrupt Opus are
  dropped and counted. RFC 4733 events become slot events. Valid packets go through the adaptive
  jitter buffer; each tick produces 20 ms of 16 kHz PCM (decode, FEC from the next packet, or PLC)
  for the uplink ring. From the first packet on, exactly one frame is written per tick (silence
  while the caller's stream pauses), so the AI worker sees a continuous 20 ms clock.
- Downlink: each tick takes one 960-byte 24 kHz frame from the downlink ring (a flush for barge-in is
  obeyed inside the ring), encodes it (VOIP, FEC, DTX off; libopus takes 24 kHz directly, so no
  resampler) and sends it. RTP timestamps come from the tick index (+960 at 48 kHz per tick), so they
  track the monotonic clock exactly; sequence numbers +1 per packet; marker on the first packet.
- When the model is silent the worker keeps sending: a pre-encoded Opus silence packet (encoding
  costs ~100 µs, a cached packet ~0), after flushing the real encoder with 3 zero frames so speech
  ends without a click. Why not stop sending: AudioBridge only starts sending to a plain-RTP
  participant after its first packet, and a continuous stream keeps the browser's jitter buffer and
  the RTP timeline steady (no talkspurt re-buffering on every model turn).

Provisional barge-in (playback hold): while model audio plays, a decoded caller frame with a 10 ms half
at least ``media.pause_on_speech_dbfs`` loud pauses playback *in the same tick* — no AI-worker round
trip, no wait for Silero — because what a caller perceives as barge-in latency is when the model stops
talking. The level is taken after the uplink processing (with AEC: also the raw microphone's excess over
the echo level predicted from the far end, :mod:`workers.media.echo_gate`, since AEC3 damps a barge-in's
onset), and the raw level must stand 14 dB out of the room's floor (:mod:`workers.media.noise_floor`:
babble is loud but steady). The worker stops reading the downlink ring (its content stays: nothing is
lost), resets the Opus encoder and sends the cached silence packet: measured on the bench clip, the first
paused packet then decodes silent after ~2.5 ms (its last 10 ms ≤ -66 dBFS) while the old 3-zero-frame
encoder tail carries the cut-off audio through two more packets (-28 / -35 dBFS), with no larger sample
step (a click) either way. It publishes the hold in the slot (``Slot.request_hold``); the AI worker
either confirms speech (flushes the ring, then releases: the answer is gone) or releases after
``vad.pause_confirm_ms`` (a cough: playback resumes at the exact ring position, with a 5 ms fade-in). A
hold the AI side never answers (it died) ends after ``HOLD_MAX_NS`` anyway (``pause_timeouts``). The
uninterruptible greeting (the slot's ``protect_until`` cursor) is never paused, and after a hold the next
pause needs a quiet frame first, so steady noise above the threshold pauses once, not every other tick. A
flush requested by the AI worker gets the same encoder reset (one packet less of old audio after a
confirmed barge-in).

Pacing: a tick is split in two. ``lead_ns`` before the deadline the worker *prepares* every session —
uplink frame (so a playback hold still acts on this tick's packet) and the next downlink packet, encoded
and framed — and at the deadline it *sends* them all back to back (a ``sendto`` each, ~15 µs on
loopback), so every call's packet leaves at the deadline whatever the number of calls. Before, each
session encoded and sent in turn and the k-th packet left ~k x 0.1 ms late, varying with who was
speaking: the pacing jitter the ramp stopped at. The lead is the second-slowest prepare of the last
second + 0.7 ms (1-15 ms); reading the downlink ring that much earlier is the latency this adds
(measured: docs/benchmarks.md "Pacing"). A barge-in flush requested between prepare and send makes the
prepared packet stale: it goes out as silence (``send_prepared``), so a flush still cuts audio within a
tick.

Counters go to the slot (``MEDIA_COUNTERS``); the shard heartbeat is written every tick.
``downlink_underruns`` counts transitions from model audio to an empty downlink ring (the end of a model
utterance, or the AI worker falling behind mid-utterance); ``concealed`` counts frames synthesised by
PLC (lost packets, and stalls while the jitter buffer waits for a late one); ``late`` counts packets
that arrived after their playout time; ``lost`` and ``jitter_us`` are RFC 3550 values. When no caller
RTP arrived for ``media.rtp_timeout_ms`` (and every further such period) an ``EventCode.RTP_TIMEOUT``
event carries the silent time in ms.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from appliance.config import MediaConfig
from appliance.logs import FrameSampler
from shm.audio import DOWN_FRAME, DOWN_RATE, UP_FRAME, UP_RATE
from shm.histograms import ShardHistograms
from shm.layout import U64
from shm.segment import EventCode, ShardSegment, Slot, SlotInfo, SlotState
from workers.levels import mean_square_of_dbfs
from workers.media import g711, opus
from workers.media.jitter import JitterBuffer, Kind
from workers.media.loss_policy import LossPolicy, OpusSettings, fraction_lost
from workers.media.noise_floor import NoiseFloor
from workers.media.pacing import PERIOD_NS, Pacer
from workers.media.red import RedError, split_red
from workers.media.rtp import (
    DTMF_EVENTS,
    DtmfReceiver,
    RtpError,
    SourceStats,
    build_rtp,
    parse_rtp,
)
from workers.media.uplink_dsp import UplinkDsp, session_mode

log = logging.getLogger("media.worker")

HALF_UP = UP_RATE // 100  # samples in 10 ms of uplink audio
OPUS_CLOCK = 48000
DTMF_CLOCK = 48000  # we answer telephone-event/48000 (appliance.janus.plain_rtp_answer), as browsers prefer
RECV_BATCH = 64  # packets drained per socket per wakeup before ticks get a chance to run
# A call carries 1-3 packets per 20 ms; a socket that delivers more than this in one tick is flooded: it
# is not polled again until the next tick, so the kernel drops the excess and one flooded port costs the
# worker a bounded amount of CPU (<= RX_BUDGET x 50 packets/s) instead of starving every other call.
RX_BUDGET_PER_TICK = 64
RCVBUF_BYTES = 256 * 1024
SSRC_SWITCH_SILENCE_NS = 100_000_000
ENCODER_TAIL_FRAMES = 3
PARTIAL_FRAME_TICKS = 2
SCAN_EVERY_TICKS = 5
ANSWER_MAX_S = 10.0  # first model audio → first RTP longer than this: not the same answer (stale words)
HOLD_MAX_NS = 2_000_000_000  # a hold the AI worker never answers ends here (vad.pause_confirm_ms <= 1 s)
FADE_IN_SAMPLES = 120  # 5 ms at 24 kHz: playback resuming mid-word after a false-alarm pause
_HALF = 1 << 63
# Pacing (module docstring): a tick is prepared this long before its deadline — the second-slowest prepare
# of the last second plus a margin for scheduling noise, within [min, max] — and sent at the deadline. The
# max stays below the AI worker's tick phase (2 ms after the deadline, so 18 ms before the next one).
LEAD_MIN_NS = 1_000_000
LEAD_MAX_NS = 15_000_000
LEAD_MARGIN_NS = 700_000
LEAD_WINDOW_TICKS = 50
PRECISE_NS = 1_500_000  # the last stretch before a deadline is slept, not polled (epoll has ms granularity)
DRAIN_GUARD_NS = 300_000  # stop draining sockets this close to a deadline (the rest: the next poll)


@dataclass
class _Candidate:
    stats: SourceStats
    good: int = 0


@dataclass(slots=True)
class _Prepared:
    """A downlink packet built ahead of its deadline (``MediaSession.prepare_downlink``)."""

    packet: bytes
    frame: bytes | None  # the 24 kHz PCM it carries (None: silence or encoder tail)
    audio: bool  # carries model audio or its encoder tail: stale if a flush comes before the send
    starts: bool  # the first packet of an utterance (times the answer when sent)
    flush_epoch: int  # the downlink ring's flush_epoch right after the frame was read
    seq: int
    ts: int
    marker: bool


class MediaSession:
    """One call's RTP/Opus state: sockets, jitter buffer, codecs, counters (in the slot)."""

    def __init__(self, slot: Slot, info: SlotInfo, cfg: MediaConfig, host: str,
                 clock: Callable[[], int] = time.monotonic_ns, hist: ShardHistograms | None = None) -> None:
        self.slot = slot
        self.hist = hist
        self.answer_seen = slot.answer()[1]  # an answer already played (worker restart) is not timed again
        self.index = info.index
        self.generation = info.generation
        self.session_id = info.session_id
        self.payload_type = info.payload_type
        self.dtmf_pt = info.dtmf_payload_type
        red = info.options.get("red_payload_type", -1) if isinstance(info.options, dict) else -1
        self.red_pt = red if isinstance(red, int) and 0 <= red < 128 and red != self.payload_type else -1
        self.clock = clock
        self.c = slot.counters
        self.remote: tuple[str, int] | None = None
        self.set_remote(info.remote_rtp_ip, info.remote_rtp_port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.rtp = socket.socket(family, socket.SOCK_DGRAM)
        self.rtcp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for s, port in ((self.rtp, info.local_rtp_port), (self.rtcp, info.local_rtp_port + 1)):
                # no SO_REUSEADDR: on Linux it would let a second (stale) worker bind the same UDP port and
                # steal half the packets; UDP has no TIME_WAIT, so a restarted worker rebinds at once
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
                s.bind((host, port))
        except OSError:
            self.rtp.close()
            self.rtcp.close()
            raise
        self.local_port = info.local_rtp_port
        if info.payload_type in (g711.PCMU, g711.PCMA):  # static G.711 payload types (rooms, gateways)
            self.decoder: UplinkCodec = g711.G711Uplink(info.payload_type, UP_RATE)
            self.encoder: DownlinkCodec = g711.G711Downlink(info.payload_type, DOWN_RATE)
        else:
            self.decoder = OpusUplink(UP_RATE)
            self.encoder = OpusDownlink(cfg)
        # the caller leg's RTCP loss picks the downlink's FEC/bitrate (Opus only; G.711 has neither)
        adapt = cfg.downlink_loss_adaptation and isinstance(self.encoder, OpusDownlink)
        self.loss_policy = LossPolicy(cfg.opus_bitrate, cfg.opus_expected_loss_percent) if adapt else None
        self.rtp_clock = self.decoder.rtp_clock
        self.ts_per_tick = self.encoder.rtp_clock // 50
        self.silence = self.encoder.silence()
        self.jb = JitterBuffer(target_ms=cfg.jitter_target_ms, max_ms=cfg.jitter_max_ms)
        self.dtmf = DtmfReceiver()
        self.src: SourceStats | None = None
        self.src_last_ns = 0
        self.candidate: _Candidate | None = None
        self.up_pcm = bytearray()
        self.uplink_started = False
        self.lost_frame_samples = UP_RATE // 50
        # downlink RTP state (random initial values, RFC 3550 5.1)
        self.tx_ssrc = random.getrandbits(32)
        self.tx_seq = random.getrandbits(16)
        self.tx_ts0 = random.getrandbits(32)
        self.first_tick: int | None = None
        self.tail = 0
        self.speaking = False
        self.partial_ticks = 0
        self.tx_errors = 0
        self.closed = False
        self.rx_this_tick = 0
        self.flood_logged = False
        self.muted: list[socket.socket] = []  # sockets over their per-tick budget (re-polled next tick)
        self.rtp_timeout_ns = cfg.rtp_timeout_ms * 1_000_000
        self._next_timeout_ns = self.rtp_timeout_ns
        # playback hold: mean-square threshold of a 10 ms block of a 16 kHz frame (0: off)
        db = cfg.pause_on_speech_dbfs
        self.pause_ms = mean_square_of_dbfs(db) if db < 0 else 0.0
        self.hold_seq: int | None = None  # the hold this session published and still obeys
        self.hold_since_ns = 0
        self.pause_armed = True  # False after a hold until a caller frame below the threshold
        self.floor = NoiseFloor()  # the room's level: a pause needs a frame standing out of it
        self.fade_in = False
        self.flushes_seen = slot.downlink.flushes
        self.pending: _Prepared | None = None
        self.stale_dropped = 0  # prepared packets replaced by silence: a flush came before the send
        # uplink processing (NS / AEC), before the ring and the pause check: workers/media/uplink_dsp.py
        self.dsp = UplinkDsp(session_mode(info.options, cfg.uplink_processing, info.session_id))
        self.dsp.set_delay_hint(cfg.jitter_target_ms + 20)

    def set_remote(self, ip: str, port: int) -> None:
        self.remote = (ip, port) if ip and port else None

    # ---- uplink: packets in --------------------------------------------------------------------
    def on_rtp(self, data: memoryview, addr: tuple[str, int], now_ns: int) -> None:
        c = self.c
        if self.remote is None or addr[0] != self.remote[0] or addr[1] != self.remote[1]:
            c.add("rx_dropped")
            return
        try:
            pkt = parse_rtp(data)
        except RtpError as exc:
            if exc.reason == "rtcp":  # rtcp-mux is fine
                c.add("rtcp_packets")
                self._loss_report(data)
            else:
                c.add("rx_invalid")
            return
        if pkt.payload_type == self.dtmf_pt and self.dtmf_pt >= 0:
            if self.src is not None and pkt.ssrc == self.src.ssrc:
                self.src.update_seq(pkt.sequence)  # events share the audio's sequence space: not losses
            self._on_dtmf(pkt.timestamp, pkt.payload)
            return
        payload, redundant = pkt.payload, None
        if pkt.payload_type == self.red_pt:  # RFC 2198 (workers/media/red.py): primary + earlier frames
            try:
                payload, redundant = split_red(payload, self.payload_type)
            except RedError:
                c.add("rx_invalid")
                return
        elif pkt.payload_type != self.payload_type:
            c.add("rx_dropped")
            return
        stats = self._source(pkt.ssrc, pkt.sequence, now_ns)
        if stats is None:
            c.add("rx_dropped")
            return
        try:
            samples = self.decoder.samples(payload)
        except opus.OpusError:
            c.add("rx_invalid")
            return
        clock = self.rtp_clock
        if not clock // 400 <= samples <= clock * 120 // 1000:  # 2.5 ms .. 120 ms
            c.add("rx_invalid")
            return
        ext = stats.update_seq(pkt.sequence)
        if ext is None:
            c.add("rx_dropped")
            return
        self.src_last_ns = now_ns
        self._next_timeout_ns = self.rtp_timeout_ns
        stats.update_jitter(pkt.timestamp, now_ns * clock // 1_000_000_000)
        c.add("rx_packets")
        c.add("rx_bytes", len(data))
        self.jb.set_frame_ms(samples * 1000 // clock)
        if self.jb.put(ext, payload) == "late":
            c.add("late")
        if redundant:
            for offset, frame in redundant:  # fill a gap the jitter buffer still waits for
                if offset % samples == 0:
                    self.jb.fill(ext - offset // samples, frame)

    def _source(self, ssrc: int, seq: int, now_ns: int) -> SourceStats | None:
        """The stats of the accepted SSRC, switching to a new one only when it proves itself."""
        if self.src is None:
            self.src = SourceStats(ssrc, seq, self.rtp_clock, probation=0)
            return self.src
        if ssrc == self.src.ssrc:
            self.candidate = None
            return self.src
        cand = self.candidate
        if cand is None or cand.stats.ssrc != ssrc:
            self.candidate = _Candidate(SourceStats(ssrc, seq, self.rtp_clock))
            self.candidate.stats.update_seq(seq)
            return None
        if cand.stats.update_seq(seq) is None:
            return None
        if now_ns - self.src_last_ns < SSRC_SWITCH_SILENCE_NS:
            return None  # the current source is still talking: an intruder, not a restart
        log.info("ssrc change", extra={"session": self.session_id, "old": self.src.ssrc, "new": ssrc})
        self.src = SourceStats(ssrc, seq, self.rtp_clock, probation=0)
        self.candidate = None
        self.jb = JitterBuffer(target_ms=self.jb.base_target_ms, max_ms=self.jb.max_ms)
        self.decoder.reset()
        self.dsp.reset()
        return self.src

    def _on_dtmf(self, timestamp: int, payload: bytes) -> None:
        try:
            got = self.dtmf.feed(timestamp, payload)
        except RtpError:
            self.c.add("rx_invalid")
            return
        if got is None:
            return
        digit, duration = got
        self.c.add("dtmf_events")
        self.slot.push_event(EventCode.DTMF, DTMF_EVENTS.index(digit))
        self.slot.push_event(EventCode.DTMF_END, duration * 1000 // DTMF_CLOCK)

    def on_rtcp(self, addr: tuple[str, int], data: bytes | memoryview = b"") -> None:
        if self.remote is not None and addr[0] == self.remote[0]:
            self.c.add("rtcp_packets")
            self._loss_report(data)
        else:
            self.c.add("rx_dropped")

    def _loss_report(self, data: bytes | memoryview) -> None:
        """An SR/RR's fraction lost adapts the downlink encoder (workers/media/loss_policy.py)."""
        if self.loss_policy is None:
            return
        fraction = fraction_lost(data)
        if fraction is None:
            return
        settings = self.loss_policy.report(fraction)
        if settings is not None and isinstance(self.encoder, OpusDownlink):
            self.encoder.apply(settings)
            log.info("downlink opus settings", extra={"session": self.session_id,
                                                      "loss_ratio": round(self.loss_policy.loss or 0.0, 3),
                                                      "expected_loss_percent": settings.expected_loss_percent,
                                                      "bitrate": settings.bitrate})

    # ---- uplink: one frame per tick --------------------------------------------------------------
    def tick_uplink(self) -> None:
        if not self.uplink_started:
            if self.src is None:
                return
            self.uplink_started = True
        silent_ns = self.clock() - self.src_last_ns
        if silent_ns >= self._next_timeout_ns:  # the caller went quiet at the RTP level: tell the AI side
            self.slot.push_event(EventCode.RTP_TIMEOUT, silent_ns // 1_000_000)
            self._next_timeout_ns += self.rtp_timeout_ns
        c, dec, jb = self.c, self.decoder, self.jb
        while len(self.up_pcm) < UP_FRAME:
            kind, payload = jb.pop()
            if kind is Kind.IDLE:
                break
            if kind is Kind.FRAME:
                try:
                    pcm = dec.decode(payload or b"")
                    self.lost_frame_samples = dec.last_samples
                except opus.OpusError:
                    c.add("rx_invalid")
                    pcm = dec.conceal(self.lost_frame_samples)
                    c.add("concealed")
            elif kind is Kind.FEC and dec.has_fec(payload or b""):
                try:
                    pcm = dec.decode_fec(payload or b"", self.lost_frame_samples)
                    c.add("fec_recovered")
                except opus.OpusError:
                    pcm = dec.conceal(self.lost_frame_samples)
                    c.add("concealed")
            else:
                pcm = dec.conceal(self.lost_frame_samples)
                c.add("concealed")
            self.up_pcm += pcm
        if len(self.up_pcm) >= UP_FRAME:
            frame = bytes(self.up_pcm[:UP_FRAME])
            del self.up_pcm[:UP_FRAME]
            raw_peak = self._room_level(frame) if self.pause_ms else 0.0
            frame = self.dsp.process(frame)
            if self.pause_ms and self.hold_seq is None:
                self._check_pause(self.dsp.pause_frame, raw_peak)  # after AEC and NS, before AGC
        else:
            frame = bytes(UP_FRAME)  # the caller's stream is paused: keep the AI side's clock running
            self.dsp.skip()
        self.slot.uplink.write(frame)
        c.add("frames_up")
        if self.src is not None:
            c.set("lost", max(0, self.src.lost))
            js = self.src.jitter_seconds()
            c.set("jitter_us", int(js * 1e6))
            jb.set_jitter(js)

    # ---- playback hold (provisional barge-in) ------------------------------------------------------
    def _room_level(self, frame: bytes) -> float:
        """Track the room's floor with this raw frame's two 10 ms halves; their larger mean square."""
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        a, b = x[:HALF_UP], x[HALF_UP:]
        ea, eb = float(np.dot(a, a)) / HALF_UP, float(np.dot(b, b)) / HALF_UP
        peak = max(ea, eb)
        stands_out = self.floor.stands_out(peak)  # against the floor before this frame
        self.floor.update(ea)
        self.floor.update(eb)
        return peak if stands_out else 0.0

    def _check_pause(self, frame: bytes, raw_peak: float = math.inf) -> None:
        """Pause model playback if this caller frame is loud while model audio plays (module docstring).

        ``raw_peak``: the raw frame's louder 10 ms half if it stands out of the room's floor, else 0
        (workers/media/noise_floor.py: babble is loud but does not stand out)."""
        if self.pause_armed and not self.speaking:
            return  # no model audio going out (a new utterance starts speaking in this tick's downlink)
        # either 10 ms half loud enough: an onset late in the frame counts now, not one frame later
        # (two np.dot calls: ~3 µs per frame, half of an einsum's)
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        a, b = x[:HALF_UP], x[HALF_UP:]
        loud = max(float(np.dot(a, a)), float(np.dot(b, b))) >= self.pause_ms * HALF_UP
        loud = loud and not self.dsp.echo_dominated  # AEC said: the model's own voice, not the caller
        # AEC3 damps a barge-in's onset: the raw microphone above the predicted echo level says it first
        loud = loud or self.dsp.near_excess >= self.pause_ms
        loud = loud and raw_peak > 0.0  # out of the room's floor (babble is loud but steady)
        if not self.pause_armed:
            self.pause_armed = not loud
            return
        if not loud:
            return
        greeting_left = (self.slot.protect_until - self.slot.downlink.read_cursor) & U64
        if 0 < greeting_left < _HALF:
            return  # the greeting (AI disclosure) is still playing: never interruptible
        self.hold_seq = self.slot.request_hold()
        self.hold_since_ns = self.clock()
        self.pause_armed = False
        self.c.add("pauses")

    def _held(self) -> bool:
        """True while this session's hold is neither released by the AI worker nor timed out."""
        seq = self.hold_seq
        if seq is None:
            return False
        if self.slot.hold_words()[1] == seq:
            self.hold_seq = None  # released: flushed (speech) or resumed (a false alarm)
            self.fade_in = True
            return False
        if self.clock() - self.hold_since_ns >= HOLD_MAX_NS:
            self.hold_seq = None
            self.fade_in = True
            self.c.add("pause_timeouts")
            log.warning("playback hold not answered by the AI worker: resuming",
                        extra={"session": self.session_id, "hold_seq": seq})
            return False
        return True

    def _cut(self) -> None:
        """Model audio stops mid-stream (hold or flush): reset the encoder, go straight to silence."""
        self.encoder.reset()
        self.tail = 0
        self.speaking = False
        self.partial_ticks = 0

    # ---- downlink: one packet per tick, built ahead and sent at the deadline -------------------------
    def tick_downlink(self, tick: int) -> None:
        """Build this tick's packet and send it at once (tests, benches; the worker splits the two)."""
        self.prepare_downlink(tick)
        self.send_prepared()

    def prepare_downlink(self, tick: int) -> None:
        """Read and encode this tick's frame into a ready RTP packet (:meth:`send_prepared` sends it).

        Runs ``MediaWorker.lead_ns`` before the deadline, so the ring's flush epoch is remembered: a
        barge-in flush requested between now and the send makes this packet's audio stale.
        """
        self.pending = None
        ring = self.slot.downlink
        left = 0
        if self._held():
            frame = None
            if self.speaking or self.tail:
                self._cut()
        else:
            data, left = ring.read_frames(DOWN_FRAME, 1)  # one cursor round for the frame and the fill
            frame = data or None
            flushes = ring.flushes
            if flushes != self.flushes_seen:
                self.flushes_seen = flushes
                if frame is None and (self.speaking or self.tail):
                    self._cut()  # a barge-in flush emptied the ring: no encoder tail of old audio
        if frame is None and self.hold_seq is None:
            if left:
                self.partial_ticks += 1
                if self.partial_ticks >= PARTIAL_FRAME_TICKS:  # the end of an utterance: pad it
                    frame = (ring.read(left) or b"") + bytes(DOWN_FRAME - left)
                    self.partial_ticks = 0
            else:
                self.partial_ticks = 0
        if self.remote is None:
            return  # Janus's side not known yet: model audio is discarded in real time
        starts = False
        if frame is not None:
            starts = not self.speaking
            if self.fade_in:
                self.fade_in = False
                if not self.speaking:
                    frame = _fade_in(frame)
            payload = self.encoder.encode(frame)
            self.tail = ENCODER_TAIL_FRAMES
            self.speaking = True
        else:
            if self.speaking and self.tail == ENCODER_TAIL_FRAMES:
                self.c.add("downlink_underruns")
            if self.tail > 0:
                payload = self.encoder.encode(bytes(DOWN_FRAME))
                self.tail -= 1
            else:
                payload = self.silence
                self.speaking = False
        marker = self.first_tick is None
        if marker:
            self.first_tick = tick
        ts = self.tx_ts0 + (tick - (self.first_tick or 0)) * self.ts_per_tick
        pkt = build_rtp(self.payload_type, self.tx_seq, ts, self.tx_ssrc, payload, marker)
        self.pending = _Prepared(pkt, frame, payload is not self.silence, starts, ring.flush_epoch,
                                 self.tx_seq, ts, marker)
        self.tx_seq = (self.tx_seq + 1) & 0xFFFF

    def send_prepared(self) -> None:
        """Send the packet :meth:`prepare_downlink` built, unless a flush made its audio stale.

        A flush requested after the frame was read (the ring's ``flush_epoch`` moved; ``flushes`` only
        moves when this side next reads) covers that frame: the packet goes out as the cached silence
        packet with the same sequence number and timestamp (the stream stays gapless) and the encoder is
        reset, exactly as if the flush had come before the read.
        """
        p = self.pending
        if p is None or self.remote is None:
            return
        self.pending = None
        pkt, frame = p.packet, p.frame
        if p.audio and self.slot.downlink.flush_epoch != p.flush_epoch:
            self._cut()
            pkt = build_rtp(self.payload_type, p.seq, p.ts, self.tx_ssrc, self.silence, p.marker)
            frame = None
            self.stale_dropped += 1
        elif frame is not None:
            if p.starts and self.hist is not None:
                self._answer_out()
            self.c.add("frames_down")
        if self.dsp.wants_far and self.uplink_started:
            self.dsp.far_frame(frame)  # AEC's reference: exactly what this packet carries (None: silence)
        try:
            self.rtp.sendto(pkt, self.remote)
        except OSError as exc:
            # ECONNREFUSED (ICMP from a closed Janus port) or a full socket buffer: count, keep going
            self.tx_errors += 1
            if exc.errno not in (errno.ECONNREFUSED, errno.EAGAIN, errno.ENOBUFS):
                log.warning("rtp send failed", extra={"session": self.session_id, "error": str(exc)})
            return
        self.c.add("tx_packets")
        self.c.add("tx_bytes", len(pkt))

    def _answer_out(self) -> None:
        """An utterance's first packet is going out: if it starts a new answer, time the answer
        (``playout``: first model audio at the AI worker → here; ``e2e``: caller's speech end → here)."""
        speech_end, model_audio = self.slot.answer()
        if model_audio == self.answer_seen:
            return  # the greeting, a resumed hold, or an answer already timed
        self.answer_seen = model_audio
        now = self.clock()
        playout = (now - model_audio) / 1e9
        if not 0.0 <= playout < ANSWER_MAX_S:
            return  # a stale or torn pair (see Slot.set_answer)
        self.hist.observe("playout", playout)  # type: ignore[union-attr]
        e2e = (now - speech_end) / 1e9
        if speech_end and playout <= e2e < 6 * ANSWER_MAX_S:
            self.hist.observe("e2e", e2e)  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.rtp.close()
            self.rtcp.close()
            self.decoder.close()
            self.encoder.close()


_RAMP = np.linspace(0.0, 1.0, FADE_IN_SAMPLES, endpoint=False, dtype=np.float32)


def _fade_in(frame: bytes) -> bytes:
    """The frame with a 5 ms linear fade-in (playback resuming mid-word must not click)."""
    x = np.frombuffer(frame, dtype="<i2").copy()
    x[:FADE_IN_SAMPLES] = (x[:FADE_IN_SAMPLES].astype(np.float32) * _RAMP).astype(np.int16)
    return x.tobytes()


class UplinkCodec(Protocol):
    """What the uplink path needs from a decoder (Opus, or G.711 + resampler)."""

    rtp_clock: int
    last_samples: int

    def samples(self, payload: bytes) -> int: ...
    def decode(self, payload: bytes) -> bytes: ...
    def has_fec(self, payload: bytes) -> bool: ...
    def decode_fec(self, next_payload: bytes, samples: int | None = None) -> bytes: ...
    def conceal(self, samples: int | None = None) -> bytes: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class DownlinkCodec(Protocol):
    """What the downlink path needs from an encoder."""

    rtp_clock: int

    def encode(self, pcm: bytes) -> bytes: ...
    def silence(self) -> bytes: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class OpusUplink(opus.Decoder):
    """Opus decoder at 16 kHz with the RTP-facing helpers (48 kHz RTP clock, FEC detection)."""

    rtp_clock = OPUS_CLOCK

    @staticmethod
    def samples(payload: bytes) -> int:
        return opus.packet_samples(payload, OPUS_CLOCK)

    @staticmethod
    def has_fec(payload: bytes) -> bool:
        return opus.packet_has_fec(payload)


_SILENCE_CACHE: dict[tuple[int, int, int], bytes] = {}


class OpusDownlink(opus.Encoder):
    """Opus encoder fed with 24 kHz frames, configured from ``[media]``; its silence packet is cached."""

    rtp_clock = OPUS_CLOCK

    def __init__(self, cfg: MediaConfig) -> None:
        super().__init__(DOWN_RATE, bitrate=cfg.opus_bitrate, complexity=cfg.opus_complexity, fec=True,
                         expected_loss_percent=cfg.opus_expected_loss_percent)
        self._key = (cfg.opus_bitrate, cfg.opus_complexity, cfg.opus_expected_loss_percent)
        self.settings = OpusSettings(True, cfg.opus_expected_loss_percent, cfg.opus_bitrate)

    def apply(self, settings: OpusSettings) -> None:
        """New FEC / expected loss / bitrate / DTX (the loss policy's row); takes effect next frame."""
        self.ctl(opus.OPUS_SET_INBAND_FEC, int(settings.fec))
        self.ctl(opus.OPUS_SET_PACKET_LOSS_PERC, settings.expected_loss_percent)
        self.ctl(opus.OPUS_SET_BITRATE, settings.bitrate)
        self.ctl(opus.OPUS_SET_DTX, int(settings.dtx))
        self.settings = settings

    def silence(self) -> bytes:
        """A 20 ms packet of digital silence from a separate, identically configured encoder."""
        pkt = _SILENCE_CACHE.get(self._key)
        if pkt is None:
            bitrate, complexity, loss = self._key
            enc = opus.Encoder(DOWN_RATE, bitrate=bitrate, complexity=complexity, fec=True,
                               expected_loss_percent=loss)
            for _ in range(10):
                pkt = enc.encode(bytes(DOWN_FRAME))
            enc.close()
            assert pkt is not None
            _SILENCE_CACHE[self._key] = pkt
        return pkt


class MediaWorker:
    """Runs all sessions of one shard segment on one thread."""

    def __init__(self, segment: ShardSegment, cfg: MediaConfig, *, host: str | None = None,
                 clock: Callable[[], int] = time.monotonic_ns, frame_log_ratio: float = 0.1) -> None:
        self.seg = segment
        self.frame_log = FrameSampler(log, frame_log_ratio)  # per-frame debug lines, sampled
        self.cfg = cfg
        self.host = host or cfg.rtp_host
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[int, MediaSession] = {}
        self._bind_failed: dict[tuple[int, int], int] = {}  # (slot, gen) -> tick of the last attempt
        self.pacer = Pacer(PERIOD_NS, clock)
        self._buf = bytearray(2048)
        self._view = memoryview(self._buf)
        self.ticks = 0
        self._skipped_logged = 0
        self.tick_late_ns: list[int] = []  # recent send lateness against the deadline (metrics/tests)
        self.lead_ns = LEAD_MIN_NS  # prepare this long before the deadline (adapted: _note_prepare)
        self._prepare_ns: deque[int] = deque(maxlen=LEAD_WINDOW_TICKS)
        self._pending_tick: int | None = None  # prepared, not yet sent
        self._prepared: list[MediaSession] = []

    # ---- slot table ------------------------------------------------------------------------------
    def scan(self) -> None:
        """Open sessions for new ACTIVE slots, close those whose (slot, generation) is gone."""
        for idx, sess in list(self.sessions.items()):
            if not sess.slot.is_current(sess.generation):
                self._close(idx)
        for slot in self.seg.slots():
            if slot.index in self.sessions:
                sess = self.sessions[slot.index]
                ip, port = slot.remote()
                if sess.remote != ((ip, port) if ip and port else None):
                    sess.set_remote(ip, port)
                continue
            if slot.state is not SlotState.ACTIVE:
                continue
            info = slot.snapshot()
            if info is None:
                continue
            key = (info.index, info.generation)
            last = self._bind_failed.get(key)
            if last is not None and self.ticks - last < 50:
                continue  # retry a failed bind once a second
            try:
                sess = MediaSession(slot, info, self.cfg, self.host, self.clock, self.seg.histograms("media"))
            except OSError as exc:
                self._bind_failed[key] = self.ticks
                log.error("cannot bind rtp port", extra={"session": info.session_id,
                                                          "port": info.local_rtp_port, "error": str(exc)})
                continue
            self._bind_failed.pop(key, None)
            self.sessions[info.index] = sess
            self.sel.register(sess.rtp, selectors.EVENT_READ, (sess, True))
            self.sel.register(sess.rtcp, selectors.EVENT_READ, (sess, False))
            log.info("session open", extra={"session": info.session_id, "slot": info.index,
                                            "port": info.local_rtp_port, "red_pt": sess.red_pt,
                                            "uplink_processing": sess.dsp.mode})

    def _close(self, idx: int) -> None:
        sess = self.sessions.pop(idx, None)
        if sess is None:
            return
        for s in (sess.rtp, sess.rtcp):
            if s in sess.muted:
                continue
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
        sess.close()
        log.info("session closed", extra={"session": sess.session_id, "slot": idx})

    # ---- loop ------------------------------------------------------------------------------------
    def _drain(self, sock: socket.socket, sess: MediaSession, is_rtp: bool) -> None:
        buf, view = self._buf, self._view
        if sess.closed:
            return
        if not sess.slot.is_current(sess.generation):
            self._close(sess.index)  # never write counters/events into a slot that was closed or reused
            return
        for _ in range(RECV_BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNREFUSED reported on the socket: nothing to read
            if sess.closed:
                return
            if is_rtp:
                sess.on_rtp(view[:n], addr, self.clock())
            else:
                sess.on_rtcp(addr, view[:n])
            sess.rx_this_tick += 1
            if sess.rx_this_tick >= RX_BUDGET_PER_TICK:
                # flooded: stop polling this session's sockets until the next tick
                for s in (sess.rtp, sess.rtcp):
                    if s not in sess.muted:
                        self.sel.unregister(s)
                        sess.muted.append(s)
                if not sess.flood_logged:
                    sess.flood_logged = True
                    log.warning("rtp flood: port muted until the next tick",
                                extra={"session": sess.session_id, "port": sess.local_port})
                return

    def tick(self, tick: int) -> None:
        """One whole tick at once: :meth:`prepare` then :meth:`send` (tests; the loop splits them)."""
        self.prepare(tick)
        self.send(tick)

    def prepare(self, tick: int) -> None:
        """Everything due every 20 ms but the sends: scan (every 100 ms), each session's uplink frame and
        its next downlink packet, built ``lead_ns`` before the deadline (module docstring: Pacing)."""
        if self.ticks % SCAN_EVERY_TICKS == 0:
            self.scan()
        self.ticks += 1
        prepared = self._prepared
        prepared.clear()
        for sess in list(self.sessions.values()):
            if not sess.slot.is_current(sess.generation):
                self._close(sess.index)
                continue
            sess.rx_this_tick = 0
            if sess.muted:
                for s in sess.muted:
                    self.sel.register(s, selectors.EVENT_READ, (sess, s is sess.rtp))
                sess.muted.clear()
            try:
                sess.tick_uplink()
                sess.prepare_downlink(tick)
                if sess.pending is not None:
                    prepared.append(sess)
                if self.frame_log.due():
                    c = sess.c
                    log.debug("frame", extra={"session": sess.session_id, "tick": tick,
                                              "jitter_us": c.get("jitter_us"), "lost": c.get("lost"),
                                              "speaking": sess.speaking, "held": sess.hold_seq is not None})
            except Exception:
                # a bug or bad state in one session must not stop the others: end that session locally
                log.exception("session failed", extra={"session": sess.session_id})
                self._close(sess.index)

    def send(self, tick: int) -> None:
        """The prepared packets, back to back (a few µs each), then the heartbeat."""
        for sess in self._prepared:
            if sess.closed:
                continue
            try:
                sess.send_prepared()
            except Exception:
                log.exception("session failed", extra={"session": sess.session_id})
                self._close(sess.index)
        self._prepared.clear()
        self.seg.heartbeat("media")
        if self.ticks % 500 == 0 and self.pacer.skipped != self._skipped_logged:
            log.warning("media worker fell behind: ticks skipped", extra={
                "skipped": self.pacer.skipped - self._skipped_logged, "sessions": len(self.sessions),
                "max_late_ms": round(self.pacer.late_ns_max / 1e6, 1)})
            self._skipped_logged = self.pacer.skipped
            self.pacer.late_ns_max = 0

    # ---- timing ----------------------------------------------------------------------------------
    def next_event_ns(self) -> int:
        """When the loop next has work: the wake-up to prepare the next tick, or a prepared tick's send."""
        if self._pending_tick is not None:
            return self.pacer.deadline(self._pending_tick)
        return self.pacer.deadline() - self.lead_ns

    def _poll(self, timeout: float, stop_at: int) -> None:
        """Receive packets for up to ``timeout`` s; stop draining sockets at ``stop_at`` (the rest stay
        readable for the next poll: a burst of arrivals must not delay a send)."""
        for key, _ in self.sel.select(timeout):
            sess, is_rtp = key.data
            self._drain(key.fileobj, sess, is_rtp)  # type: ignore[arg-type]
            if self.clock() >= stop_at:
                return

    def _wait(self, until: int, max_wait: float) -> bool:
        """Receive packets until ``until`` (monotonic ns); True once it is reached.

        epoll's timeout has millisecond granularity (rounded up), so the last ``PRECISE_NS`` are slept
        with ``time.sleep`` (clock_nanosleep: tens of µs of slack) without polling. Never blocks longer
        than ``max_wait`` (0 with an injected clock: the caller advances it and calls again).
        """
        rem = until - self.clock()
        if rem > PRECISE_NS:
            self._poll(min((rem - PRECISE_NS) / 1e9, max_wait), until - DRAIN_GUARD_NS)
            rem = until - self.clock()
        if rem <= 0:
            return True
        if rem <= PRECISE_NS and rem / 1e9 <= max_wait:
            time.sleep(rem / 1e9)
            return True
        return False

    def _note_prepare(self, took_ns: int) -> None:
        """Adapt the lead to the second-slowest prepare of the last second (+ a margin for scheduling
        noise): one preempted prepare must not add its stall to every call's latency for a second."""
        recent = self._prepare_ns
        recent.append(took_ns)
        slow = sorted(recent)[-2] if len(recent) > 1 else took_ns
        self.lead_ns = min(LEAD_MAX_NS, max(LEAD_MIN_NS, slow + LEAD_MARGIN_NS))

    def run_once(self, max_wait: float = 1.0) -> None:
        """Wait for packets until the next thing is due; prepare a tick ``lead_ns`` before its deadline,
        send it at the deadline (and go on at once while more is overdue: a stalled process)."""
        while True:
            if self._pending_tick is None:
                if not self._wait(self.pacer.deadline() - self.lead_ns, max_wait):
                    return
                now = self.clock()
                ticks = self.pacer.due(max(now, self.pacer.deadline()))  # consumed now, sent at its deadline
                for t in ticks[:-1]:  # a backlog (the process stalled): late already, send at once
                    self.prepare(t)
                    self._sent(t)
                t = ticks[-1]
                t0 = self.clock()
                self.prepare(t)
                self._note_prepare(self.clock() - t0)
                self._pending_tick = t
            t = self._pending_tick
            if not self._wait(self.pacer.deadline(t), max_wait):
                return
            self._pending_tick = None
            self._sent(t)
            if self.clock() < self.next_event_ns():
                return

    def _sent(self, t: int) -> None:
        late = self.clock() - self.pacer.deadline(t)
        self.tick_late_ns.append(late)
        if len(self.tick_late_ns) > 3000:
            del self.tick_late_ns[:1000]
        self.send(t)

    def run(self, should_stop: Callable[[], bool]) -> None:
        self.scan()
        self.seg.heartbeat("media")
        while not should_stop():
            self.run_once()

    def close(self) -> None:
        for idx in list(self.sessions):
            self._close(idx)
        self.sel.close()


def set_realtime(priority: int) -> bool:
    """SCHED_RR at ``priority`` for this thread (the worker's only one) if allowed; False otherwise.

    Needs CAP_SYS_NICE (or an RLIMIT_RTPRIO); without it the worker runs at normal priority and relies
    on its AI shard-mate lowering its own (``shards.ai_nice``).
    """
    if priority <= 0:
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(priority))
    except (PermissionError, OSError):
        return False
    return True


def pin_cpu(cpu: int | None) -> None:
    """Pin this process to ``cpu`` (no-op when None)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
