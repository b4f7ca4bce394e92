"""Cached prompts: espeak-ng synthesis at 24 kHz, disk cache reuse, fallback chime."""

from __future__ import annotations

import numpy as np

from workers.ai import greeting
from workers.ai.greeting import PromptCache, chime, espeak_voice


def test_greeting_is_speech_at_24k_and_cached(tmp_path) -> None:
    cache = PromptCache(tmp_path)
    pcm = cache.get("Hello, you are talking with an AI assistant.", "en-US")
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    assert 1.5 < len(x) / 24000 < 5.0
    assert np.sqrt(np.mean(x ** 2)) > 1000  # audible
    # energy concentrated in the speech band (espeak formants), not DC or a single tone
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / 24000)
    band = spec[(freqs > 100) & (freqs < 4000)].sum() / spec.sum()
    assert band > 0.8
    files = list(tmp_path.glob("prompt-*.pcm"))
    assert len(files) == 1 and files[0].read_bytes() == pcm
    # a new cache (a restarted worker) reads the file instead of synthesising
    assert PromptCache(tmp_path).cached("Hello, you are talking with an AI assistant.", "en-US") == pcm


async def test_async_synthesis_and_fallback(tmp_path, monkeypatch) -> None:
    cache = PromptCache(tmp_path)
    pcm = await cache.get_async("Please hold.", "en-GB")
    assert len(pcm) > 24000  # > 0.5 s
    monkeypatch.setattr(greeting.shutil, "which", lambda _name: None)
    assert await PromptCache(None).get_async("Anything else", "en-US") == chime()
    assert PromptCache(None).get("Anything else", "en-US") == chime()


def test_espeak_voice_names() -> None:
    assert espeak_voice("en-US") == "en-us"
    assert espeak_voice("en-GB") == "en-gb"
    assert espeak_voice("de-DE") == "de"
    assert espeak_voice("") == "en-us"
