"""Audio fixtures and content checks shared by the test areas.

Speech comes from espeak-ng at test time (no binary fixtures in the repo); checks are about content —
dominant frequency of a tone and normalised cross-correlation with what was sent — not byte counts.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import soxr


def tone(freq_hz: float, seconds: float, rate: int, amplitude: float = 0.4) -> np.ndarray:
    """A sine tone as int16 samples."""
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * freq_hz * t) * amplitude * 32767).astype(np.int16)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The frequency (Hz) of the strongest FFT bin of ``samples`` (windowed)."""
    x = samples.astype(np.float64)
    if len(x) == 0:
        return 0.0
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * rate / len(x))


def speech(text: str, rate: int, path: Path | None = None) -> np.ndarray:
    """Speech for ``text`` from espeak-ng, resampled to ``rate``, as int16 mono. Also written to ``path``."""
    if not shutil.which("espeak-ng"):
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    out = subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], check=True, capture_output=True).stdout
    import io

    with wave.open(io.BytesIO(out)) as w:
        src_rate = w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    audio = soxr.resample(data, src_rate, rate).astype(np.int16) if src_rate != rate else data
    if path is not None:
        write_wav(path, audio, rate)
    return audio


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        if w.getnchannels() > 1:
            data = data.reshape(-1, w.getnchannels())[:, 0]
        return data.copy(), w.getframerate()


def best_correlation(reference: np.ndarray, received: np.ndarray, rate: int) -> tuple[float, float]:
    """Peak normalised cross-correlation of ``reference`` inside ``received`` and its lag in seconds.

    Envelope-free: both are high-passed and compared sample by sample via FFT correlation, normalised by the
    energy of the reference and of the matched window, so 1.0 is a perfect copy and noise stays near 0.
    """
    a = reference.astype(np.float64)
    b = received.astype(np.float64)
    if len(a) == 0 or len(b) < len(a):
        return 0.0, 0.0
    a -= a.mean()
    b -= b.mean()
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[: len(b) - len(a) + 1]
    c = np.concatenate(([0.0], np.cumsum(b * b)))  # sliding-window energy in O(n), not np.convolve's O(n·m)
    energy = c[len(a):] - c[: len(c) - len(a)]
    ref_energy = float(np.sum(a * a))
    denom = np.sqrt(ref_energy * np.maximum(energy, 0.0)) + 1e-9
    # a window 60 dB below the reference is no copy of it (and the running sum's rounding must not
    # turn digital silence into a match)
    norm = np.where(energy > 1e-6 * ref_energy, corr / denom, 0.0)
    lag = int(np.argmax(norm))
    return float(norm[lag]), lag / rate


def envelope_correlation(reference: np.ndarray, received: np.ndarray, rate: int, hop_ms: int = 10) -> float:
    """Correlation of the 10 ms RMS envelopes: robust to codec phase changes (Opus) where samples are not."""
    hop = rate * hop_ms // 1000

    def env(x: np.ndarray) -> np.ndarray:
        x = x[: len(x) // hop * hop].astype(np.float64).reshape(-1, hop)
        return np.sqrt((x * x).mean(axis=1))

    ea, eb = env(reference), env(received)
    if len(ea) == 0 or len(eb) < len(ea):
        return 0.0
    best = 0.0
    for lag in range(len(eb) - len(ea) + 1):
        seg = eb[lag : lag + len(ea)]
        if seg.std() == 0 or ea.std() == 0:
            continue
        best = max(best, float(np.corrcoef(ea, seg)[0, 1]))
    return best
