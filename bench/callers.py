"""What the synthetic callers say: a speech clip and silence, pre-encoded once as real Opus RTP payloads.

The load generator must be cheap enough to drive hundreds of real-time callers from one process on a
2-core box without stealing the CPU it is measuring, so every Opus packet is encoded once here (PyAV's
bundled libopus, 48 kHz mono, VOIP, 20 ms — what a browser sends through NoSIP) and the callers only
stamp RTP headers on the stored payloads.

The clip is shaped so the benchmark can time turns from the outside without guessing:
- it starts and ends on speech (trimmed), so "the caller's last speech packet" is exact;
- pauses inside it are shortened to ≤ 60 ms, so no pause ever reaches the VAD hangover mid-turn;
- a -45 dBFS noise floor runs under the speech, and between turns the caller sends quiet room noise
  (-63 dBFS: below the VAD's -55 dBFS energy gate, like a real microphone), so anything the model
  echoes — including the pre-roll before the onset — is never digital silence, while a flushed or idle
  downlink is (the receiver tells model audio from silence by decoded level).

espeak-ng is a Debian package the appliance already depends on (the cached greeting uses it); the few
lines of WAV reading are here rather than in ``tests/harness/audio.py`` because ``bench`` ships in the
package and the tests do not.
"""

from __future__ import annotations

import fractions
import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import av
import numpy as np
import soxr

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz
ROOM_NOISE_DBFS = -63.0  # what the caller sends between turns
TEXT = "Hello, what will the weather be like tomorrow morning?"  # ~2.5 s: a typical caller turn


@dataclass(frozen=True)
class CallerAudio:
    """Pre-encoded Opus payloads (one per 20 ms) of the speech clip and of room noise (``silence``)."""

    speech: tuple[bytes, ...]
    silence: tuple[bytes, ...]
    speech_pcm: np.ndarray  # the clip at 48 kHz int16 (for content checks)

    @property
    def speech_seconds(self) -> float:
        return len(self.speech) * FRAME / RATE


def espeak(text: str, rate: int = RATE, words_per_minute: int = 160) -> np.ndarray:
    """``text`` spoken by espeak-ng, as int16 mono at ``rate``."""
    if not shutil.which("espeak-ng"):
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = subprocess.run(
        ["espeak-ng", "--stdout", "-s", str(words_per_minute), text], check=True, capture_output=True
    ).stdout
    with wave.open(io.BytesIO(out)) as w:
        src_rate = w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return soxr.resample(data, src_rate, rate).astype(np.int16) if src_rate != rate else data.copy()


def shape_clip(pcm: np.ndarray, rate: int = RATE, max_pause_ms: int = 60, noise_dbfs: float = -45.0,
               seed: int = 7) -> np.ndarray:
    """Trim leading/trailing silence, shorten inner pauses, add a noise floor (see the module docstring)."""
    x = pcm.astype(np.float64)
    hop = rate // 100  # 10 ms
    n = len(x) // hop
    if n == 0:
        raise ValueError("speech clip is empty")
    env = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))
    loud = env > 32768 * 10 ** (-40 / 20)
    if not loud.any():
        raise ValueError("speech clip has no speech above -40 dBFS")
    idx = np.flatnonzero(loud)
    keep: list[np.ndarray] = []
    quiet_run = 0
    for i in range(idx[0], idx[-1] + 1):
        quiet_run = 0 if loud[i] else quiet_run + 1
        if quiet_run * 10 <= max_pause_ms:
            keep.append(x[i * hop : (i + 1) * hop])
    y = np.concatenate(keep)
    y = y[: len(y) // FRAME * FRAME]
    rng = np.random.default_rng(seed)
    y += rng.standard_normal(len(y)) * 32768 * 10 ** (noise_dbfs / 20)
    return np.clip(y, -32768, 32767).astype(np.int16)


def encode_opus(pcm: np.ndarray, bitrate: int = 32000) -> list[bytes]:
    """Encode int16 mono 48 kHz into 20 ms Opus payloads (libopus via PyAV, VOIP application)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = bitrate
    codec.options = {"application": "voip", "frame_duration": "20"}
    out: list[bytes] = []
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[i : i + FRAME].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = i
        frame.time_base = fractions.Fraction(1, RATE)
        out.extend(bytes(p) for p in codec.encode(frame))
    out.extend(bytes(p) for p in codec.encode(None))
    return out


def prepare(text: str = TEXT) -> CallerAudio:
    """Generate, shape and encode the callers' speech and silence."""
    clip = shape_clip(espeak(text))
    speech = encode_opus(clip)
    rng = np.random.default_rng(11)
    room = (rng.standard_normal(RATE) * 32768 * 10 ** (ROOM_NOISE_DBFS / 20)).astype(np.int16)
    silence = encode_opus(room)
    n = len(clip) // FRAME
    return CallerAudio(speech=tuple(speech[:n]), silence=tuple(silence[:50]), speech_pcm=clip)


class LevelMeter:
    """Decodes received Opus payloads (48 kHz) and returns their level in dBFS; stateful like a receiver."""

    def __init__(self) -> None:
        self._dec = av.CodecContext.create("opus", "r")
        self._dec.sample_rate = RATE
        self._dec.layout = "mono"

    def dbfs(self, payload: bytes) -> tuple[float, float]:
        """Level of one packet and of its last 10 ms, in dBFS (-120: digital silence or undecodable).

        The tail level tells a frame that *ends* silent (a flushed downlink's first frame still carries
        the codec's few-ms overlap from the speech before it) without waiting for the next frame.
        """
        try:
            frames = self._dec.decode(av.Packet(payload))
        except (av.error.FFmpegError, ValueError):
            return -120.0, -120.0
        arrays = [fr.to_ndarray().reshape(-1) for fr in frames]
        if not arrays:
            return -120.0, -120.0
        a = np.concatenate(arrays).astype(np.float64)
        return _db(a), _db(a[-RATE // 100 :])


def _db(a: np.ndarray) -> float:
    if a.size == 0:
        return -120.0
    p = float(np.square(a).mean())
    return float(10 * np.log10(p)) if p > 1e-12 else -120.0
