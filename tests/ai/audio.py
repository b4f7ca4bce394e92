"""Audio helpers for AI-worker tests: espeak-ng speech at 16 kHz, noise, correlation."""

from __future__ import annotations

import io
import subprocess
import wave

import numpy as np
import soxr


def speech16k(text: str = "Hello there, this is a test of the voice activity detector.") -> np.ndarray:
    """espeak-ng speech as int16 samples at 16 kHz (leading/trailing silence trimmed)."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "--stdout", text],
                         capture_output=True, check=True, timeout=30).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    out = soxr.resample(pcm, rate, 16000, quality="HQ").astype(np.int16)
    loud = np.flatnonzero(np.abs(out.astype(np.int32)) > 300)
    return out[loud[0]: loud[-1] + 1]


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def white_noise(seconds: float, dbfs: float, rate: int = 16000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = 32768.0 * 10 ** (dbfs / 20)
    return np.clip(rng.normal(0, amp, int(seconds * rate)), -32768, 32767).astype(np.int16)


def frames(pcm: np.ndarray, frame_bytes: int = 640) -> list[bytes]:
    """Split int16 samples into whole frames of ``frame_bytes`` (zero-padding the last)."""
    raw = pcm.astype("<i2").tobytes()
    raw += b"\0" * (-len(raw) % frame_bytes)
    return [raw[i: i + frame_bytes] for i in range(0, len(raw), frame_bytes)]


def best_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Peak normalised cross-correlation of two signals (1.0 = identical up to a shift and gain)."""
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    if len(a) < len(b):
        a, b = b, a
    n = len(a) + len(b)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    # normalise by the energy of b and of the best-matching window of a
    peak = int(np.argmax(np.abs(corr)))
    shift = peak if peak < len(a) else peak - size
    seg = a[max(shift, 0): max(shift, 0) + len(b)]
    bb = b[max(-shift, 0): max(-shift, 0) + len(seg)]
    seg = seg[: len(bb)]
    denom = np.sqrt(np.dot(seg, seg) * np.dot(bb, bb))
    return float(np.dot(seg, bb) / denom) if denom > 0 else 0.0
