"""Cached spoken prompts (AI disclosure / greeting, "please hold") as 24 kHz PCM, ready to play at once.

Why cached audio: the caller must hear the AI disclosure the moment the call connects, before the
Live session is up (model setup takes hundreds of ms to seconds), and must hear "please hold" when the
model is unreachable — exactly when no model can speak it. The prompts are synthesised once with
espeak-ng (a Debian package the appliance already depends on; no network, no model) and resampled to
the downlink rate with soxr; the PCM is kept in memory and on disk under the state directory, so a
restarted worker does not pay synthesis again. If espeak-ng is missing the prompt is a short two-tone
chime rather than silence, and the reason is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import soxr

from shm.audio import DOWN_RATE

log = logging.getLogger(__name__)

OUT_RATE = DOWN_RATE  # shm/audio.py
DEFAULT_GREETING = "Hello! You are talking with an AI assistant. How can I help?"
DEFAULT_HOLD = "Please hold on. I am reconnecting."


def espeak_voice(language: str) -> str:
    """espeak-ng voice name for a BCP-47 language tag ("en-US" → "en-us", "de-DE" → "de")."""
    lang = (language or "en-US").lower()
    if lang.startswith("en-"):
        return "en-us" if lang == "en-us" else "en-gb" if lang in ("en-gb", "en-uk") else "en-us"
    return lang.split("-")[0] or "en-us"


def wav_to_pcm24k(data: bytes) -> bytes:
    """Mono 16-bit WAV bytes → PCM16 LE mono at 24 kHz."""
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit WAV, got {8 * w.getsampwidth()}-bit")
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
    if rate != OUT_RATE:
        pcm = soxr.resample(pcm, rate, OUT_RATE, quality="HQ")
    return np.asarray(pcm, dtype="<i2").tobytes()


def _espeak_cmd(text: str, language: str) -> list[str]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    return [exe, "-v", espeak_voice(language), "-s", "165", "--stdout", text]


def synthesize(text: str, language: str = "en-US") -> bytes:
    """Speak ``text`` with espeak-ng; PCM16 24 kHz mono. Raises if espeak-ng fails."""
    out = subprocess.run(_espeak_cmd(text, language), capture_output=True, timeout=30, check=True)
    return wav_to_pcm24k(out.stdout)


async def synthesize_async(text: str, language: str = "en-US") -> bytes:
    """Like :func:`synthesize` without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *_espeak_cmd(text, language), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {stderr.decode(errors='replace')[:200]}")
    return await asyncio.to_thread(wav_to_pcm24k, stdout)


def chime(seconds: float = 0.6) -> bytes:
    """A soft two-tone chime (fallback prompt when speech synthesis is unavailable)."""
    n = int(OUT_RATE * seconds / 2)
    t = np.arange(n) / OUT_RATE
    env = np.minimum(1.0, np.minimum(t, t[::-1]) * 50)
    tones = [np.sin(2 * np.pi * f * t) * env for f in (660.0, 880.0)]
    return (np.concatenate(tones) * 6000).astype("<i2").tobytes()


class PromptCache:
    """Prompt text → 24 kHz PCM, in memory and (if ``cache_dir`` is writable) on disk."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self._dir = Path(cache_dir) if cache_dir else None
        self._mem: dict[str, bytes] = {}

    def _key(self, text: str, language: str) -> str:
        return hashlib.sha256(f"espeak-ng\0{espeak_voice(language)}\0{text}".encode()).hexdigest()[:24]

    def cached(self, text: str, language: str = "en-US") -> bytes | None:
        """The prompt if already synthesised (memory or disk), else None; never synthesises."""
        key = self._key(text, language)
        pcm = self._mem.get(key)
        if pcm is None and self._dir is not None:
            try:
                pcm = (self._dir / f"prompt-{key}.pcm").read_bytes()
            except OSError:
                return None
            self._mem[key] = pcm
        return pcm

    def _store(self, key: str, pcm: bytes) -> None:
        self._mem[key] = pcm
        if self._dir is None:
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = self._dir / f".prompt-{key}.{os.getpid()}.tmp"
            tmp.write_bytes(pcm)
            tmp.replace(self._dir / f"prompt-{key}.pcm")
        except OSError as exc:
            log.warning("prompt cache not writable; keeping in memory", extra={"dir": str(self._dir),
                                                                                 "error": str(exc)})
            self._dir = None

    def get(self, text: str, language: str = "en-US") -> bytes:
        """The prompt, synthesising it (blocking) on first use; a chime if synthesis fails."""
        pcm = self.cached(text, language)
        if pcm is not None:
            return pcm
        try:
            pcm = synthesize(text, language)
        except (OSError, subprocess.SubprocessError, ValueError, wave.Error) as exc:
            log.warning("prompt synthesis failed; using a chime", extra={"error": str(exc)})
            return chime()
        self._store(self._key(text, language), pcm)
        return pcm

    async def get_async(self, text: str, language: str = "en-US") -> bytes:
        """Like :meth:`get` without blocking the event loop."""
        pcm = self.cached(text, language)
        if pcm is not None:
            return pcm
        try:
            pcm = await synthesize_async(text, language)
        except (OSError, RuntimeError, ValueError, wave.Error, TimeoutError) as exc:
            log.warning("prompt synthesis failed; using a chime", extra={"error": str(exc)})
            return chime()
        self._store(self._key(text, language), pcm)
        return pcm
