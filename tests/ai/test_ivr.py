"""Degradation tiers driven by the real AI worker (workers/ai/ivr.py) against the real Live emulator.

The test plays the media worker: it reads the downlink ring (what the caller hears) and pushes keypad
events into the slot. Each prompt is found in the caller's audio by correlation with the prompt as the
worker rendered it (espeak-ng, cached), so "the caller was told" is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
import soxr

from appliance.breaker import Breaker, BreakerSettings
from appliance.config import load_config, replace
from appliance.records.spool import SpoolReader, spool_keyring_for, spool_root
from shm.segment import EventCode
from tests.ai.audio import frames, silence
from tests.ai.live_worker import NO_DISCLOSURE, running, until
from tests.harness.audio import best_correlation
from tests.harness.emulator import start_emulator
from tests.harness.shm import activate_slot, shard_segment
from workers.ai.dtmf import DIGITS
from workers.ai.live import guard

pytestmark = pytest.mark.timeout(180)

NUMBER = "5550123"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with start_emulator(tmp_path_factory.mktemp("emu"), pacing="burst") as e:
        yield e


@pytest.fixture
def seg():
    with shard_segment(slots=2, uplink_bytes=64000, downlink_bytes=384000) as s:
        yield s


def _cfg(emu, tmp_path, **degrade):
    return replace(load_config(None, env={}),
                   model={"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
                          "greeting": "", "max_retries": 1, "degraded_retry_seconds": 1.0},
                   degrade={"wait_seconds": 0.5, "menu_timeout_seconds": 20, "digit_timeout_seconds": 5,
                            **degrade},
                   records={"dsn": "postgresql://va@127.0.0.1:1/never-contacted"},
                   paths={"state_dir": str(tmp_path)}, compliance=NO_DISCLOSURE)


class Ear:
    """What the caller hears: the downlink ring, drained every 10 ms like the media worker would."""

    def __init__(self, slot) -> None:
        self.slot = slot
        self.got = bytearray()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            n = self.slot.downlink.available()
            if n:
                self.got += self.slot.downlink.read(n)
            await asyncio.sleep(0.01)

    def heard(self, pcm: bytes, since: int = 0, within: float = 0.0) -> tuple[float, int]:
        """(correlation, byte offset) of prompt ``pcm`` in what was heard from byte ``since`` on (and
        starting at most ``within`` seconds after it, when given: the next of several equal prompts)."""
        end = since + len(pcm) + int(within * 48000) if within else len(self.got)
        got = np.frombuffer(bytes(self.got[since:end]), np.int16)
        corr, lag = best_correlation(np.frombuffer(pcm, np.int16), got, 24000)
        return corr, since + round(lag * 24000) * 2

    async def wait_for(self, pcm: bytes, since: int = 0, limit: float = 20.0, what: str = "prompt",
                       within: float = 0.0) -> int:
        """Wait until ``pcm`` was heard completely after ``since``; returns where it ended."""
        deadline = time.monotonic() + limit
        while True:  # a correlation costs an FFT: poll every 100 ms
            if len(self.got) - since >= len(pcm):
                corr, where = self.heard(pcm, since, within)
                if corr > 0.9:
                    return where + len(pcm)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.task.cancel()


def press(slot, keys: str) -> None:
    for k in keys:
        assert slot.push_event(EventCode.DTMF, DIGITS.index(k))


async def test_breaker_open_caller_leaves_a_callback_number(emu, seg, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = _cfg(emu, tmp_path, transfer_target="+49301234567")
    breaker = Breaker("ivr-test", BreakerSettings(failure_threshold=1, reset_seconds=600), None)
    await breaker.record(False)  # open: no call may touch the model
    guard.install_breaker(breaker)
    connections0 = emu.health()["connections"]
    slot = seg.slot(0)
    try:
        async with running(cfg, seg, emu, tmp_path) as w:
            p = w.ivr.prompts
            prompt = lambda key: p.get("en-US", key)  # noqa: E731 — exactly what the worker plays
            activate_slot(slot, options={"greeting": ""})
            ear = Ear(slot)
            try:
                at = await ear.wait_for(prompt("trouble"), what="the spoken notice")
                at = await ear.wait_for(prompt("menu"), at, what="the keypad menu")
                press(slot, "2")
                at = await ear.wait_for(prompt("enter_number"), at, what="'enter your number'")
                press(slot, NUMBER + "#")
                at = await ear.wait_for(prompt("you_entered"), at, what="'you entered'")
                for d in NUMBER:  # read back digit by digit, in order
                    at = await ear.wait_for(prompt(f"digit-{d}"), at, what=f"digit {d} read back",
                                             within=0.2)
                at = await ear.wait_for(prompt("confirm"), at, what="'press 1 if correct'")
                press(slot, "1")
                await ear.wait_for(prompt("goodbye_callback"), at, what="goodbye")
                await until(lambda: slot.model_state == "ended:degraded_callback", 10, "call marked ended")
            finally:
                ear.stop()
            assert w.calls[0].ivr is not None and w.calls[0].ivr.ending == "callback"
            w.records.spool.sync()
    finally:
        guard.install(None)
    assert emu.health()["connections"] == connections0  # the breaker kept every attempt off the model
    # the callback request is in the record spool, the number sealed there and in no log line
    root = spool_root(str(tmp_path)) / "shard-0"
    raw = b"".join(f.read_bytes() for f in root.glob("*.spool"))
    assert NUMBER.encode() not in raw
    items = SpoolReader(root, spool_keyring_for(cfg, "shard-0")).read_batch().items
    cb = [it for it in items if it.get("type") == "callback_requested"]
    assert len(cb) == 1 and cb[0]["callback_number"] == NUMBER and cb[0]["data"] == {"digits": len(NUMBER)}
    holds = [it["data"]["outcome"] for it in items if it.get("type") == "hold"]
    assert holds == ["started", "callback"]
    assert NUMBER not in caplog.text and "5 5 5" not in caplog.text


async def test_model_back_mid_menu_returns_the_call_to_it(emu, seg, tmp_path, speech) -> None:
    cfg = _cfg(emu, tmp_path)
    slot = seg.slot(1)
    emu.configure(refuse=True)
    try:
        async with running(cfg, seg, emu, tmp_path) as w:
            prompt = lambda key: w.ivr.prompts.get("en-US", key)  # noqa: E731
            activate_slot(slot, options={"greeting": ""})
            ear = Ear(slot)
            try:
                at = await ear.wait_for(prompt("trouble"), what="the spoken notice")
                # no option 3 without a transfer target
                at = await ear.wait_for(prompt("menu_no_transfer"), at, what="the keypad menu")
                assert w.calls[1].ivr is not None
                emu.configure(refuse=False)  # the model is back while the caller sits in the menu
                at = await ear.wait_for(prompt("back"), at, what="'I'm back'")
                await until(lambda: slot.model_state == "live" and w.calls[1].ivr is None, 20,
                            "back to the model")
                await asyncio.sleep(0.3)
                mark = len(ear.got)
                for f in frames(np.concatenate([silence(0.2), speech, silence(0.8)])):
                    assert slot.uplink.write(f)
                    await asyncio.sleep(0.01)
                ref = soxr.resample(speech, 16000, 24000).astype(np.int16).tobytes()
                await ear.wait_for(ref, mark, 30, "the model's echo of the caller")
            finally:
                ear.stop()
    finally:
        emu.configure(refuse=False)


async def test_breaker_open_caller_asks_for_a_person(emu, seg, tmp_path) -> None:
    cfg = _cfg(emu, tmp_path, transfer_target="sip:desk@example.com")
    breaker = Breaker("ivr-test-3", BreakerSettings(failure_threshold=1, reset_seconds=600), None)
    await breaker.record(False)
    guard.install_breaker(breaker)
    slot = seg.slot(0)
    try:
        async with running(cfg, seg, emu, tmp_path) as w:
            prompt = lambda key: w.ivr.prompts.get("en-US", key)  # noqa: E731
            activate_slot(slot, options={"greeting": ""})
            ear = Ear(slot)
            try:
                at = await ear.wait_for(prompt("menu"), what="the keypad menu (with option 3)")
                press(slot, "3")
                await ear.wait_for(prompt("transferring"), at, what="'transferring you now'")
                await until(lambda: slot.model_state == "ended:degraded_transferred", 10,
                            "call marked ended")
            finally:
                ear.stop()
            w.records.spool.sync()
    finally:
        guard.install(None)
    root = spool_root(str(tmp_path)) / "shard-0"
    items = SpoolReader(root, spool_keyring_for(cfg, "shard-0")).read_batch().items
    tr = [it for it in items if it.get("type") == "transfer_requested"]
    assert len(tr) == 1 and tr[0]["data"] == {"target": "sip:desk@example.com"}


async def test_prompts_per_language_and_operator_recordings(tmp_path) -> None:
    import io
    import wave

    from appliance.config import ConfigError, DegradeConfig
    from workers.ai.greeting import PromptCache, wav_to_pcm24k
    from workers.ai.ivr import DegradePrompts

    texts = tmp_path / "prompts.toml"
    texts.write_text('[de-DE]\ntrouble = "Ich habe gerade Verbindungsprobleme. Einen Moment bitte."\n')
    rec = tmp_path / "audio" / "de-DE"
    rec.mkdir(parents=True)
    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(8000)
        wf.writeframes(tone.tobytes())
    (rec / "back.wav").write_bytes(buf.getvalue())
    cache = PromptCache(tmp_path / "cache")
    dcfg = DegradeConfig(prompts_file=str(texts), audio_dir=str(tmp_path / "audio"))
    p = DegradePrompts(dcfg, cache, "en-US")
    assert p.text("de-DE", "trouble").startswith("Ich habe")
    assert p.text("de-DE", "menu") == p.text("en-US", "menu")  # not translated: the English text
    assert p.text("de-DE", "digit-7") == "7"
    await p.prepare(["de-DE"])
    assert p.get("de-DE", "back") == wav_to_pcm24k(buf.getvalue())  # the operator's recording
    de, en = p.get("de-DE", "trouble"), p.get("en-US", "trouble")
    assert de != en and de == cache.cached(p.text("de-DE", "trouble"), "de-DE")  # synthesised in German
    bad = tmp_path / "bad.toml"
    bad.write_text('[de-DE]\ntroubel = "x"\n')
    with pytest.raises(ConfigError, match=r"\[de-DE\]\.troubel: unknown prompt"):
        load_config(None, env={}, overrides={"degrade": {"prompts_file": str(bad)}})
