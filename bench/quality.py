"""`voice-appliance bench quality`: what the model hears and whether barge-in survives echo and noise.

Reference speech (espeak-ng, generated at run time) goes through the media worker's real path — the
real :class:`workers.media.worker.MediaWorker` with one session on a real shard segment: Opus RTP into
its UDP socket (jitter buffer, FEC/PLC, decode, uplink processing, playback pause) and out of the
uplink ring; model audio into the downlink ring and out as paced Opus RTP to a UDP peer — on a
*virtual clock*: the worker's pacer and every packet's arrival time are simulated time, so impairment
is exact and repeatable and the scores do not depend on how loaded the shared machine is (a 100-turn
run takes seconds, not minutes). Scheduling delay of a loaded box is therefore not in these figures
(``bench pipeline`` measures that).

The simulated caller (this process, playing the browser and the room):
- plays the downlink it receives (Opus decoded at 48 kHz) after ``PLAYOUT_MS``; its microphone picks
  it up again through a short synthetic room response at ``--echo-db`` (-20 dB: a browser echo
  canceller that leaks) ``ACOUSTIC_MS`` later — the echo the model would hear of itself;
- adds babble (6 other espeak voices) or café noise (babble + pink noise + dish clatter) at
  ``--snr-db`` relative to the caller's speech;
- encodes 20 ms Opus frames at 48 kHz (32 kbit/s, in-band FEC at the condition's loss) like a
  browser and sends them through a network model: independent (Bernoulli) loss, Gilbert-Elliott burst
  loss, and independent uniform 0..J ms jitter (so packets reorder beyond 20 ms, harsher than a real
  path's correlated jitter).

Two phases per uplink-processing mode (``media.uplink_processing``; ``off`` is always run as the
reference):
- ``scores``: per impairment the caller reads the reference sentences with the model silent (the
  ``echo`` condition: the model talks over them, double-talk); the uplink ring's content is aligned to
  the clean reference by cross-correlation and scored with PESQ (ITU-T P.862.2 wideband, MOS-LQO,
  ``pesq`` package) and an SNR figure. Playback pauses are off here (the model keeps talking).
- ``bargein``: ``--turns`` model turns (-20 dBFS) with the caller's echo at ``--echo-db``; every other
  turn the caller talks over the answer: at a normal level (-26 dBFS; ``bargein_echo``), at the
  *same level as the echo* (``bargein_echo_level``), and at the normal level with babble 10 dB below
  it (``bargein_echo_babble``). This process settles the media worker's playback holds as the AI
  worker would (a real barge-in: flush after 100 ms and release; no caller speech: release after
  ``vad.pause_confirm_ms``). ``false_pauses`` = holds requested while the caller was not talking;
  ``bargein_*_ms`` = the packet carrying the caller's speech onset (the first 10 ms within 15 dB of
  the utterance's active level) leaving the caller → the tick whose downlink packet is the first
  silent one (the hold): network + jitter buffer + detection; ``bargein_missed`` = talk-overs
  without a hold within 500 ms of the onset.

``ns_snr_gain_db``: model-input SNR on the noise set (speech frames' power minus the noise power
measured in the reference's silent gaps, over that noise power) with the mode, minus the same with
``off``, on identical input (same seeds). ``media_cpu_ms_per_call_second``: this process's CPU spent
inside the worker's loop per simulated call-second (includes the socket work; a loaded machine inflates
it); ``dsp_cpu_ms_per_call_second``: the processing chain alone on 20 s of speech, back to back per
mode, with the model talking all the time and half the time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import secrets
import select
import shutil
import socket
import subprocess
import time
import wave
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import soxr

from appliance.config import MediaConfig
from bench.media_bench import free_port_pair
from shm.segment import ShardSegment, ring_bytes
from workers.media import opus
from workers.media.red import build_red
from workers.media.rtp import build_rtp, parse_rtp
from workers.media.worker import MediaWorker

RATE = 48000  # the caller's (browser's) rate
UP = 16000
FRAME48 = 960
PT = 111
RED_PT = 63  # what Chromium offers for red/48000/2
PLAYOUT_MS = 60  # downlink network + the browser's jitter buffer before the caller hears a packet
ACOUSTIC_MS = 10  # loudspeaker → microphone
# frame k (audio [20k, 20k+20) ms) leaves at 20k + CALLER_SEND_S: capture done + 7 ms (the browser's
# encode/send), at a phase to the worker's ticks
CALLER_SEND_S = 0.027
BASE_DELAY_MS = 2  # one-way network delay of the uplink before jitter
MODEL_DBFS = -20.0  # model speech level (active RMS) on the downlink
CALLER_DBFS = -26.0  # caller speech level in the scores phase
CALLER_TEXTS = (
    "Hello, what will the weather be like tomorrow morning?",
    "I would like to change my delivery address to the new flat.",
    "Can you tell me when the next train to the airport leaves?",
    "My order number is written on the receipt somewhere.",
    "Please book a table for four people on Friday evening.",
)
MODEL_TEXTS = (
    "Sure, I can help you with that right away.",
    "Tomorrow will be sunny with a light breeze from the west and mild temperatures.",
    "Let me check the timetable for you, one moment please.",
    "Your table is booked, and you will receive a confirmation by email shortly.",
    "I have updated your address, is there anything else I can do for you today?",
)
BARGE_TEXTS = ("No wait, stop.", "Hold on a second.", "Sorry, that is not what I meant.", "Excuse me.")
BABBLE = (("en-us+m3", "The market opens early on weekends and closes late."),
          ("en+f2", "We should really paint the kitchen before summer comes."),
          ("en-gb+m5", "Did you see the match last night, it was incredible."),
          ("en+f4", "I think the meeting moved to half past three on Tuesday."),
          ("en-us+m7", "Her brother works at the hospital on the other side of town."),
          ("en+f1", "Two coffees and a slice of that lemon cake, please."))
CALLER_VOICE = "en+f3"
MODEL_VOICE = "en-us+m1"


@dataclass(frozen=True)
class Condition:
    name: str
    loss: float = 0.0  # independent loss probability
    burst: tuple[float, float] | None = None  # Gilbert-Elliott (p good→bad, p bad→good); bad = lost
    jitter_ms: float = 0.0
    noise: str = ""  # "", "babble", "cafe"
    snr_db: float = 10.0
    echo_db: float | None = None  # model echo in the caller's microphone (double-talk)
    red: bool = False  # the caller sends RFC 2198 RED (each packet repeats the previous frame), as Chromium


CONDITIONS = (
    Condition("clean"),
    Condition("loss_3", loss=0.03),
    Condition("loss_10", loss=0.10),
    Condition("burst_5", burst=(0.0125, 0.25)),  # ~5 % loss in bursts of 4 packets on average
    Condition("loss_10_red", loss=0.10, red=True),
    Condition("burst_5_red", burst=(0.0125, 0.25), red=True),
    Condition("jitter_40", jitter_ms=40),
    Condition("jitter_80", jitter_ms=80),
    Condition("babble_10db", noise="babble"),
    Condition("cafe_10db", noise="cafe"),
    Condition("echo_20db", echo_db=-20.0),
)
NOISE_SET = ("babble_10db", "cafe_10db")
BASE_NAMES = [c.name for c in CONDITIONS if not c.red]  # a condition's seed: its index here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default="", help="uplink processing modes to measure, comma-separated "
                        "(default: every mode this build has; 'off' always runs as the reference)")
    parser.add_argument("--mode", default="", help="mode of the top-level figures (default: the config's "
                        "media.uplink_processing)")
    parser.add_argument("--turns", type=int, default=100, help="model turns in the barge-in phase")
    parser.add_argument("--echo-db", type=float, default=-20.0, help="echo level relative to the downlink")
    parser.add_argument("--bargein-db", type=float, default=None,
                        help="caller talk-over level relative to the downlink in the main barge-in phase "
                             "(default: a normal caller, -26 vs -20 dBFS; a second phase always uses the "
                             "echo's level)")
    parser.add_argument("--snr-db", type=float, default=10.0, help="noise level below the caller's speech")
    parser.add_argument("--conditions", default="", help="comma-separated subset of the impairments")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="short CI form: 3 conditions, 10 turns")


# ---- audio sources ---------------------------------------------------------------------------------
_ESPEAK: dict[tuple[str, str], np.ndarray] = {}


def espeak(text: str, voice: str, rate: int = RATE) -> np.ndarray:
    """``text`` spoken by espeak-ng with ``voice``, trimmed, float64 at ``rate`` (unit peak not set)."""
    key = (text, voice)
    if key not in _ESPEAK:
        if not shutil.which("espeak-ng"):
            raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
        out = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", "160", text],
                             check=True, capture_output=True).stdout
        with wave.open(io.BytesIO(out)) as w:
            src = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float64)
        x = soxr.resample(x, src, rate)
        loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
        _ESPEAK[key] = x[loud[0]: loud[-1] + 1].copy()
    return _ESPEAK[key]


def active_rms(x: np.ndarray, rate: int = RATE) -> float:
    """RMS over the 10 ms frames within 30 dB of the loudest (speech level without the pauses)."""
    hop = rate // 100
    n = len(x) // hop
    if n == 0:
        return 0.0
    p = (x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    act = p[p > p.max() * 1e-3]
    return float(np.sqrt(act.mean()))


def onset_s(x: np.ndarray, below_db: float = 15.0) -> float:
    """Where speech starts: the first 10 ms frame within ``below_db`` of the clip's active level."""
    hop = RATE // 100
    n = len(x) // hop
    p = (x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    return float(np.argmax(p >= active_rms(x) ** 2 * 10 ** (-below_db / 10)) * hop / RATE)


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return x * (32768 * 10 ** (dbfs / 20) / max(active_rms(x), 1e-9))


def babble(seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * RATE)
    out = np.zeros(n)
    for voice, text in BABBLE:
        s = at_level(espeak(text, voice), -30.0)
        pos = int(rng.integers(0, len(s)))
        while pos < n + len(s):
            a, b = pos - len(s), pos
            lo, hi = max(a, 0), min(b, n)
            if lo < hi:
                out[lo:hi] += s[lo - a: hi - a]
            pos += len(s) + int(rng.integers(RATE // 10, RATE // 2))
    return out


def cafe(seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * RATE)
    b = babble(seconds, rng)
    white = rng.standard_normal(n)
    spec = np.fft.rfft(white)
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))  # pink: 1/f power
    pink = np.fft.irfft(spec, n)
    pink *= active_rms(b) / max(float(np.sqrt((pink ** 2).mean())), 1e-9) * 0.7
    clatter = np.zeros(n)
    t = np.arange(int(0.08 * RATE)) / RATE
    for at in rng.integers(0, max(n - len(t), 1), size=int(seconds * 1.5)):
        f = float(rng.uniform(2000, 5000))
        clatter[at: at + len(t)] += np.sin(2 * np.pi * f * t) * np.exp(-t * 60) * active_rms(b) * 4
    return b + pink + clatter


def room_response(rng: np.random.Generator) -> np.ndarray:
    """A short loudspeaker→microphone response at 48 kHz (direct path + decaying reflections), unit energy."""
    h = np.zeros(int(0.04 * RATE))
    h[0] = 1.0
    tail = rng.standard_normal(len(h)) * np.exp(-np.arange(len(h)) / (0.008 * RATE)) * 0.3
    h[48:] += tail[48:]
    return h / np.sqrt((h ** 2).sum())


# ---- the network ---------------------------------------------------------------------------------
class Network:
    """Loss and jitter of the caller → worker leg (see the module docstring)."""

    def __init__(self, cond: Condition, rng: np.random.Generator) -> None:
        self.cond, self.rng, self.bad = cond, rng, False
        self.sent = self.lost = 0

    def delay_ns(self) -> int | None:
        """Arrival delay of the next packet, or None when it is lost."""
        c, r = self.cond, self.rng
        self.sent += 1
        if c.burst is not None:
            self.bad = (r.random() >= c.burst[1]) if self.bad else (r.random() < c.burst[0])
            if self.bad:
                self.lost += 1
                return None
        if c.loss and r.random() < c.loss:
            self.lost += 1
            return None
        return int((BASE_DELAY_MS + r.uniform(0, c.jitter_ms)) * 1e6)


# ---- one simulated call ------------------------------------------------------------------------------
@dataclass
class Script:
    """What happens in one call: the caller's clean speech, noise, and when the model says what."""

    seconds: float
    speech: np.ndarray  # caller's clean speech at 48 kHz (float, int16 scale)
    noise: np.ndarray
    model: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (at seconds, 24 kHz int16)
    # caller talk-over (clip start, speech onset, end) s
    bargeins: list[tuple[float, float, float]] = field(default_factory=list)
    turns: list[tuple[float, float]] = field(default_factory=list)  # model turn (start, end) s
    echo_db: float | None = None


@dataclass
class CallResult:
    received: np.ndarray  # uplink ring content, 16 kHz int16, one frame per tick from the first packet
    first_frame_s: float  # simulated time of the tick that wrote received[0]
    pauses: list[float]  # simulated times of playback holds
    cpu_s: float
    sent: int
    lost: int


class Call:
    """The media worker on a virtual clock with one session, and the caller around it."""

    def __init__(self, cfg: MediaConfig, cond: Condition, script: Script, seed: int,
                 options: dict[str, Any] | None = None, confirm_ms: int = 200) -> None:
        self.cfg, self.cond, self.script = cfg, cond, script
        self.rng = np.random.default_rng(seed)
        self.net = Network(cond, np.random.default_rng(seed + 1000))
        iid = "bq" + secrets.token_hex(4)
        up, down = ring_bytes(4000, 30000)
        self.seg = ShardSegment.create(f"/va-{iid}-s0", slots=1, uplink_bytes=up, downlink_bytes=down,
                                       instance_id=iid)
        self.t0 = 1_000_000_000_000
        self.now = self.t0
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.setblocking(False)
        self.port = free_port_pair()
        self.slot = self.seg.slot(0)
        opts = {**(options or {}), **({"red_payload_type": RED_PT} if cond.red else {})}
        self.slot.activate(session_id=f"bq-{iid}", local_rtp_port=self.port, remote_rtp_ip="127.0.0.1",
                           remote_rtp_port=self.peer.getsockname()[1], payload_type=PT, channels=2,
                           dtmf_payload_type=101, mode="direct", options=opts)
        self.prev_payload = b""
        self.worker = MediaWorker(self.seg, cfg, host="127.0.0.1", clock=lambda: self.now)
        self.worker.scan()
        self.sess = self.worker.sessions[0]
        loss_pct = round(100 * (cond.loss + (0.05 if cond.burst else 0)))
        self.enc = opus.Encoder(RATE, bitrate=32000, complexity=5, fec=True, expected_loss_percent=loss_pct)
        self.dec = opus.Decoder(RATE)
        n = int(script.seconds * RATE) + RATE
        self.played = np.zeros(n)
        self.first_ts: int | None = None
        self.first_idx = 0
        self.h = room_response(self.rng)
        self.echo_gain = 10 ** (script.echo_db / 20) if script.echo_db is not None else 0.0
        self.seq, self.ts, self.ssrc = 1000, 5000, 0x1234567
        self.inflight: list[tuple[int, bytes]] = []
        self.sent_pkts = 0
        self.received: list[bytes] = []
        self.first_frame_ns: int | None = None
        self.pauses: list[float] = []
        self.pauses_seen = 0
        self.settle: tuple[int, int, bool] | None = None  # (at ns, hold seq, confirmed)
        self.hold_seen = 0
        self.confirm_ns = confirm_ms * 1_000_000
        self.cpu = 0.0
        self.rx_counted = 0

    def close(self) -> None:
        self.worker.close()
        self.peer.close()
        self.seg.close()
        self.seg.unlink()

    # -- caller side ---------------------------------------------------------------------------------
    def _mic_frame(self, k: int) -> np.ndarray:
        """The caller's microphone for frame k (samples [k*960, (k+1)*960) of the call)."""
        a, b = k * FRAME48, (k + 1) * FRAME48
        s = self.script
        x = s.speech[a:b] + s.noise[a:b]
        if self.echo_gain:  # self.played is indexed by when the caller hears it (playout included)
            d, L = ACOUSTIC_MS * RATE // 1000, len(self.h)
            lo, hi = a - d - L + 1, b - d
            if hi > 0:
                seg = self.played[max(lo, 0): hi]
                if lo < 0:
                    seg = np.concatenate([np.zeros(-lo), seg])
                x = x + np.convolve(seg, self.h, mode="valid") * self.echo_gain
        return np.clip(x, -32768, 32767).astype(np.int16)

    def _send_caller_frame(self, k: int) -> None:
        payload = self.enc.encode(self._mic_frame(k).tobytes())
        if self.cond.red:  # Chromium's RED: the previous frame again, 20 ms earlier
            red = [(FRAME48, self.prev_payload)] if self.prev_payload else []
            self.prev_payload = payload
            pkt = build_rtp(RED_PT, self.seq, self.ts, self.ssrc, build_red(payload, red, PT))
        else:
            pkt = build_rtp(PT, self.seq, self.ts, self.ssrc, payload)
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + FRAME48) & 0xFFFFFFFF
        delay = self.net.delay_ns()
        if delay is not None:
            self.inflight.append((self.now + delay, pkt))
            self.inflight.sort(key=lambda p: p[0])

    def _drain_peer(self) -> None:
        want = self.sess.c.get("tx_packets")
        deadline = time.monotonic() + 0.5
        while self.rx_counted < want and time.monotonic() < deadline:
            try:
                data = self.peer.recv(2048)
            except BlockingIOError:
                select.select([self.peer], [], [], 0.05)
                continue
            self.rx_counted += 1
            p = parse_rtp(data)
            pcm = np.frombuffer(self.dec.decode(p.payload), np.int16).astype(np.float64)
            if self.first_ts is None:
                self.first_ts = p.timestamp
                self.first_idx = int((self.now - self.t0) * RATE // 1_000_000_000) + PLAYOUT_MS * RATE // 1000
            idx = self.first_idx + ((p.timestamp - self.first_ts) & 0xFFFFFFFF)
            end = min(idx + len(pcm), len(self.played))
            if idx < end:
                self.played[idx:end] = pcm[: end - idx]

    # -- the AI worker's side ------------------------------------------------------------------------------
    def _consume_uplink(self) -> None:
        ring = self.slot.uplink
        n = ring.available() // 640 * 640
        if n:
            if self.first_frame_ns is None:
                self.first_frame_ns = self.now - (n // 640 - 1) * 20_000_000
            self.received.append(ring.read(n) or b"")

    def _watch_holds(self) -> None:
        c = self.sess.c.get("pauses")
        if c != self.pauses_seen:
            self.pauses_seen = c
            self.pauses.append((self.now - self.t0) / 1e9)
        hold, release = self.slot.hold_words()
        if hold != release and hold != self.hold_seen:
            self.hold_seen = hold
            t = (self.now - self.t0) / 1e9
            talking = any(a <= t <= b + 0.3 for a, _, b in self.script.bargeins)
            self.settle = (self.now + (100_000_000 if talking else self.confirm_ns), hold, talking)
        if self.settle is not None and self.now >= self.settle[0]:
            _, seq, talking = self.settle
            if talking:
                self.slot.downlink.request_flush()
            self.slot.release_hold(seq)
            self.settle = None

    def _deliver(self) -> int:
        n = 0
        while self.inflight and self.inflight[0][0] <= self.now:
            _, pkt = self.inflight.pop(0)
            self.peer.sendto(pkt, ("127.0.0.1", self.port))
            n += 1
        return n

    def _worker_step(self, expect: int) -> None:
        c = self.sess.c
        t = time.process_time()
        self.worker.run_once(max_wait=0)
        deadline = time.monotonic() + 0.5
        while (c.get("rx_packets") + c.get("rx_dropped") + c.get("rx_invalid") < self.rx_expected
               and time.monotonic() < deadline):  # loopback delivery is normally synchronous; if not, wait
            select.select([self.sess.rtp], [], [], 0.05)
            self.worker.run_once(max_wait=0)
        self.cpu += time.process_time() - t

    def run(self) -> CallResult:
        s = self.script
        end = self.t0 + int(s.seconds * 1e9)
        frame_ns = 20_000_000
        next_frame = self.t0 + int(CALLER_SEND_S * 1e9)
        k = 0
        model = sorted(s.model, key=lambda m: m[0])
        mi = 0
        self.rx_expected = 0
        inf = 1 << 62
        while self.now < end:
            nxt = min(next_frame, self.worker.pacer.deadline(),
                      self.inflight[0][0] if self.inflight else inf,
                      self.settle[0] if self.settle else inf,
                      self.t0 + int(model[mi][0] * 1e9) if mi < len(model) else inf)
            self.now = max(self.now, nxt)
            while mi < len(model) and self.t0 + int(model[mi][0] * 1e9) <= self.now:
                if not self.slot.downlink.write(model[mi][1].tobytes()):
                    raise RuntimeError("downlink ring full in the quality bench")
                mi += 1
            if self.now >= next_frame:
                self._send_caller_frame(k)
                k += 1
                next_frame += frame_ns
            self.rx_expected += self._deliver()
            self._worker_step(self.rx_expected)
            self._drain_peer()
            self._consume_uplink()
            self._watch_holds()
        return CallResult(np.frombuffer(b"".join(self.received), np.int16),
                          ((self.first_frame_ns or self.t0) - self.t0) / 1e9, self.pauses, self.cpu,
                          self.net.sent, self.net.lost)


# ---- scripts ---------------------------------------------------------------------------------------------
def scores_script(cond: Condition, rng: np.random.Generator, snr_db: float) -> Script:
    """The caller reads the reference sentences (0.7 s gaps); the model talks over them for ``echo``."""
    parts, t = [], 0.8
    spans = []
    for text in CALLER_TEXTS:
        x = at_level(espeak(text, CALLER_VOICE), CALLER_DBFS)
        spans.append((t, x))
        t += len(x) / RATE + 0.7
    seconds = t + 0.5
    speech = np.zeros(int(seconds * RATE) + RATE)
    for at, x in spans:
        i = int(at * RATE)
        speech[i: i + len(x)] += x
    parts.append(speech)
    noise = np.zeros_like(speech)
    if cond.noise:
        gen = babble if cond.noise == "babble" else cafe
        nz = gen(len(speech) / RATE, rng)[: len(speech)]
        noise = nz * (active_rms(speech) / max(active_rms(nz), 1e-9)) * 10 ** (-snr_db / 20)
    script = Script(seconds, speech, noise, echo_db=cond.echo_db)
    if cond.echo_db is not None:
        at = 0.3
        i = 0
        while at < seconds - 1:
            m = at_level(espeak(MODEL_TEXTS[i % len(MODEL_TEXTS)], MODEL_VOICE, 24000), MODEL_DBFS,
                         ).clip(-32768, 32767).astype(np.int16)
            script.model.append((at, m))
            at += len(m) / 24000 + 0.2
            i += 1
    return script


def bargein_script(turns: int, rng: np.random.Generator, echo_db: float, noise_kind: str = "",
                   snr_db: float = 10.0, bargein_db: float | None = None) -> Script:
    """``turns`` model answers; every other one the caller talks over at the echo's level."""
    plan, t = [], 0.5
    for i in range(turns):
        m = at_level(espeak(MODEL_TEXTS[i % len(MODEL_TEXTS)], MODEL_VOICE, 24000), MODEL_DBFS)
        dur = len(m) / 24000
        barge = None
        if i % 2 == 1:
            level = MODEL_DBFS + (echo_db if bargein_db is None else bargein_db)
            c = at_level(espeak(BARGE_TEXTS[i // 2 % len(BARGE_TEXTS)], CALLER_VOICE), level)
            start = t + float(rng.uniform(0.5, min(1.2, dur - 0.3)))
            barge = (start, c)
            end = max(start + len(c) / RATE, t + 0.8)
        else:
            end = t + dur
        plan.append((t, m.clip(-32768, 32767).astype(np.int16), barge, end))
        t = end + 0.8
    seconds = t + 0.5
    speech = np.zeros(int(seconds * RATE) + RATE)
    script = Script(seconds, speech, np.zeros_like(speech), echo_db=echo_db)
    for at, m, barge, end in plan:
        script.model.append((at, m))
        script.turns.append((at, end))
        if barge is not None:
            start, c = barge
            i = int(start * RATE)
            speech[i: i + len(c)] += c
            script.bargeins.append((start, start + onset_s(c), start + len(c) / RATE))
    if noise_kind:
        gen = babble if noise_kind == "babble" else cafe
        nz = gen(len(speech) / RATE, rng)[: len(speech)]
        ref = 32768 * 10 ** ((MODEL_DBFS + (echo_db if bargein_db is None else bargein_db)) / 20)
        script.noise = nz * (ref / max(active_rms(nz), 1e-9)) * 10 ** (-snr_db / 20)
    return script


# ---- scoring -----------------------------------------------------------------------------------------------
def align(ref: np.ndarray, deg: np.ndarray) -> np.ndarray:
    """``deg`` shifted to best match ``ref`` (FFT cross-correlation), cut/padded to ``len(ref)``."""
    a = ref - ref.mean()
    b = deg.astype(np.float64) - deg.mean()
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    lags = np.concatenate([corr[: len(b)], corr[n - len(a) + 1:]])
    lag = int(np.argmax(lags))
    lag = lag if lag < len(b) else lag - len(lags)
    out = np.zeros(len(ref))
    src = b[max(lag, 0): max(lag, 0) + len(ref) - max(-lag, 0)]
    out[max(-lag, 0): max(-lag, 0) + len(src)] = src
    return out


def pesq_wb(ref16: np.ndarray, deg16: np.ndarray) -> float | None:
    try:
        from pesq import NoUtterancesError, PesqError, pesq
    except ModuleNotFoundError:
        raise SystemExit("bench quality needs pesq: pip install 'voice-appliance[test]'") from None

    try:
        return round(float(pesq(UP, ref16.astype(np.float32), deg16.astype(np.float32), "wb")), 3)
    except (NoUtterancesError, PesqError):
        return None


def snr_db(ref16: np.ndarray, deg16: np.ndarray) -> float:
    """Speech-frame power minus noise power over noise power; noise measured where ``ref16`` is silent."""
    hop = UP // 100
    n = min(len(ref16), len(deg16)) // hop
    pr = (ref16[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    pd = (deg16[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(axis=1)
    speech = pr > pr.max() * 10 ** (-25 / 10)
    # silent: 40 ms away from any speech (the codec and the NS smear edges)
    quiet = pr < pr.max() * 1e-7
    quiet = quiet & (np.convolve((~quiet).astype(float), np.ones(9), mode="same") == 0)
    if not speech.any() or not quiet.any():
        return float("nan")
    p_noise = float(pd[quiet].mean())
    p_sig = max(float(pd[speech].mean()) - p_noise, 1e-9)
    return round(10 * np.log10(p_sig / max(p_noise, 1e-9)), 2)


def score_call(script: Script, res: CallResult) -> dict[str, Any]:
    ref16 = soxr.resample(script.speech.astype(np.float64), RATE, UP)
    deg = align(ref16, res.received)
    return {"pesq_wb": pesq_wb(ref16, deg), "snr_db": snr_db(ref16, deg),
            "loss_ratio": round(res.lost / max(res.sent, 1), 4)}


def bargein_stats(script: Script, res: CallResult) -> dict[str, Any]:
    false, lat, missed = 0, [], 0
    for p in res.pauses:
        if not any(a <= p <= b + 0.3 for a, _, b in script.bargeins):
            false += 1
    for start, a, _b in script.bargeins:
        onset_pkt = CALLER_SEND_S + 0.02 * np.floor(a / 0.02)  # the packet carrying the onset leaves
        hit = [p for p in res.pauses if start <= p <= a + 0.5]
        if hit:
            lat.append((hit[0] - onset_pkt) * 1000)
        else:
            missed += 1
    v = np.asarray(lat)
    return {"false_pauses": false, "pauses": len(res.pauses), "bargeins": len(script.bargeins),
            "bargein_missed": missed,
            "bargein_p50_ms": round(float(np.percentile(v, 50)), 1) if len(v) else None,
            "bargein_p99_ms": round(float(np.percentile(v, 99)), 1) if len(v) else None,
            "bargein_max_ms": round(float(v.max()), 1) if len(v) else None}


# ---- modes -------------------------------------------------------------------------------------------------
def available_modes() -> tuple[str, ...]:
    """The uplink processing modes this build of the media worker knows."""
    try:
        from workers.media.uplink_dsp import MODES
    except ModuleNotFoundError:
        return ("off",)
    return tuple(MODES)


def _cfg(base: MediaConfig, mode: str, **kw: Any) -> MediaConfig:
    if "uplink_processing" in MediaConfig.__dataclass_fields__:
        kw["uplink_processing"] = mode
    return replace(base, **kw)


def run_mode(mode: str, conds: list[Condition], args: argparse.Namespace) -> dict[str, Any]:
    base = MediaConfig()
    out: dict[str, Any] = {"scores": {}, "snr_db": {}, "cpu_s": 0.0, "sim_s": 0.0}
    for cond in conds:
        # the same seed with and without RED: the same noise and the same lost packets, paired
        seed = args.seed + BASE_NAMES.index(cond.name.removesuffix("_red"))
        script = scores_script(cond, np.random.default_rng(seed), args.snr_db)
        call = Call(_cfg(base, mode, pause_on_speech_dbfs=0.0), cond, script, seed)
        try:
            res = call.run()
        finally:
            call.close()
        sc = score_call(script, res)
        out["scores"][cond.name] = sc["pesq_wb"]
        out["snr_db"][cond.name] = sc["snr_db"]
        out["cpu_s"] += res.cpu_s
        out["sim_s"] += script.seconds
    normal = CALLER_DBFS - MODEL_DBFS if args.bargein_db is None else args.bargein_db
    for label, noise, level in (("echo", "", normal), ("echo_level", "", args.echo_db),
                                ("echo_babble", "babble", normal)):
        script = bargein_script(args.turns, np.random.default_rng(args.seed + 77), args.echo_db, noise,
                                args.snr_db, level)
        call = Call(_cfg(base, mode), Condition("bargein"), script, args.seed + 77)
        try:
            res = call.run()
        finally:
            call.close()
        st = bargein_stats(script, res)
        out[f"bargein_{label}"] = st
        out["cpu_s"] += res.cpu_s
        out["sim_s"] += script.seconds
        if args.smoke:
            break
    out["media_cpu_ms_per_call_second"] = round(out.pop("cpu_s") * 1000 / max(out.pop("sim_s"), 1e-9), 3)
    out["dsp_cpu_ms_per_call_second"] = dsp_cost(mode, 4.0 if args.smoke else 20.0)
    return out


def dsp_cost(mode: str, seconds: float = 20.0) -> dict[str, float]:
    """CPU ms per call-second of :class:`UplinkDsp` alone (process + far reference), paired per mode.

    ``model_talking``: the model speaks the whole time (the canceller always runs); ``realistic``: it
    speaks half the time in 3 s turns (the canceller idles 1 s after each).
    """
    from workers.media.uplink_dsp import UplinkDsp

    caller = at_level(espeak(CALLER_TEXTS[0], CALLER_VOICE, UP), CALLER_DBFS)
    model = at_level(espeak(MODEL_TEXTS[1], MODEL_VOICE, 24000), MODEL_DBFS)
    frames = int(seconds * 50)
    near = np.resize(caller, frames * 320).clip(-32768, 32767).astype(np.int16)
    far = np.resize(model, frames * 480).clip(-32768, 32767).astype(np.int16)
    out: dict[str, float] = {}
    for duty, talking in (("model_talking", lambda k: True), ("realistic", lambda k: (k // 150) % 2 == 0)):
        dsp = UplinkDsp(mode)
        t = time.process_time()
        for k in range(frames):
            dsp.process(near[k * 320: (k + 1) * 320].tobytes())
            if dsp.wants_far:
                dsp.far_frame(far[k * 480: (k + 1) * 480].tobytes() if talking(k) else None)
        out[duty] = round((time.process_time() - t) * 1000 / seconds, 3)
    return out


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("media.worker").setLevel(logging.WARNING)  # a session per call: no open/close lines
    t_start = time.monotonic()
    load0 = os.getloadavg()[0]
    have = available_modes()
    modes = [m for m in (args.modes.split(",") if args.modes else have) if m]
    for m in modes:
        if m not in have:
            raise SystemExit(f"unknown uplink processing mode {m!r} (this build has {', '.join(have)})")
    if "off" not in modes:
        modes.insert(0, "off")
    names = [c.name for c in CONDITIONS]
    wanted = args.conditions.split(",") if args.conditions else names
    if args.smoke:
        wanted = args.conditions.split(",") if args.conditions else ["clean", "loss_10", "cafe_10db"]
        args.turns = min(args.turns, 10)
    for w in wanted:
        if w not in names:
            raise SystemExit(f"unknown condition {w!r} (have {', '.join(names)})")
    conds = [c for c in CONDITIONS if c.name in wanted]
    by_mode = {m: run_mode(m, conds, args) for m in modes}
    default_mode = getattr(MediaConfig(), "uplink_processing", "off")
    mode = args.mode or default_mode
    if mode not in by_mode:
        raise SystemExit(f"--mode {mode!r} was not measured (--modes {','.join(modes)})")
    for r in by_mode.values():
        gains = [r["snr_db"][n] - by_mode["off"]["snr_db"][n] for n in NOISE_SET if n in r["snr_db"]]
        r["ns_snr_gain_db"] = round(float(np.mean(gains)), 2) if gains else None
    top = by_mode[mode]
    return {
        "mode": mode,
        "metric": "PESQ P.862.2 wideband MOS-LQO (pesq package) of the uplink ring vs the clean reference",
        "scores": top["scores"],
        "false_pauses_with_echo": top["bargein_echo"]["false_pauses"],
        "bargein_p99_ms": top["bargein_echo"]["bargein_p99_ms"],
        "bargein_missed": top["bargein_echo"]["bargein_missed"],
        "bargein_at_echo_level_p99_ms": top.get("bargein_echo_level", {}).get("bargein_p99_ms"),
        "false_pauses_with_echo_and_babble": top.get("bargein_echo_babble", {}).get("false_pauses"),
        "ns_snr_gain_db": top["ns_snr_gain_db"],
        "media_cpu_ms_per_call_second": top["media_cpu_ms_per_call_second"],
        "dsp_cpu_ms_per_call_second": top["dsp_cpu_ms_per_call_second"],
        "turns": args.turns,
        "echo_db": args.echo_db,
        "snr_db": args.snr_db,
        "by_mode": by_mode,
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "machine": {**_machine(), "loadavg_1m_start": round(load0, 2)},
    }
