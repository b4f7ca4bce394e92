"""The AI worker end to end with real parts: shm segment, Silero VAD, the Live layer on the real
google-genai SDK, and the Live emulator (a subprocess) answering by echoing what it heard.

The test plays the media worker: it writes 20 ms speech frames into the uplink ring (paced like the
media worker does) and reads the downlink ring; echo content is checked by correlation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soxr

from appliance.config import load_config, replace
from appliance.procs import pid_gone
from tests.ai.audio import frames, silence, white_noise
from tests.ai.live_worker import NO_DISCLOSURE, running, until
from tests.harness.audio import best_correlation
from tests.harness.emulator import service_account, start_emulator
from tests.harness.procs import stop
from tests.harness.shm import activate_slot, shard_segment

pytestmark = pytest.mark.timeout(240)  # worst case of the generous waits below; ~25 s loaded


@pytest.fixture(scope="module")
def sa():
    return service_account()


@pytest.fixture(scope="module")
def emu(tmp_path_factory, sa):
    d = tmp_path_factory.mktemp("emu")
    (d / "sa.pub").write_bytes(sa.public_pem)
    with start_emulator(d, pacing="burst", vertex_sa_key=str(d / "sa.pub")) as e:  # both platforms
        yield e


@pytest.fixture
def cfg(emu, tmp_path):
    return replace(load_config(None, env={}),
                   model={"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
                          "greeting": "", "hold_prompt": "Please hold."},
                   paths={"state_dir": str(tmp_path)}, compliance=NO_DISCLOSURE)


@pytest.fixture
def seg():
    with shard_segment(slots=2, uplink_bytes=64000, downlink_bytes=384000) as s:
        yield s


async def speak(slot, pcm: np.ndarray, speed: float = 2.0) -> None:
    """Write 20 ms frames into the uplink like the media worker (at ``speed`` x real time)."""
    for f in frames(pcm):
        assert slot.uplink.write(f), "uplink ring full"
        await asyncio.sleep(0.02 / speed)


def collect(slot, out: bytearray) -> int:
    n = slot.downlink.available()
    if n:
        out += slot.downlink.read(n)
    return len(out)


def to24k(x: np.ndarray) -> np.ndarray:
    return soxr.resample(x, 16000, 24000).astype(np.int16)


async def test_echo_turn_through_real_sdk(cfg, seg, emu, tmp_path, speech) -> None:
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        await until(lambda: slot.model_state == "live", what="model live")
        await speak(slot, np.concatenate([silence(0.3), speech, silence(0.7)]))
        got = bytearray()
        await until(lambda: collect(slot, got) >= 2 * len(speech) * 3 // 2, what="echo")
        await asyncio.sleep(0.3)
        collect(slot, got)
        echo = np.frombuffer(bytes(got), np.int16)
        corr, _ = best_correlation(to24k(speech), echo, 24000)
        assert corr > 0.9, corr
        assert w.stats.activity_starts == 1 and w.stats.activity_ends == 1
        await until(lambda: bool(slot.resume_handle), what="resume handle")
        assert slot.counters.get("audio_received_ms") >= len(speech) // 16 - 50
        assert slot.transcript  # transcription events reached the slot


async def test_barge_in_flushes_playback(cfg, seg, emu, tmp_path, speech) -> None:
    slot = seg.slot(1)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        await until(lambda: slot.model_state == "live", what="model live")
        await speak(slot, np.concatenate([silence(0.2), speech, silence(0.6)]))
        # the echo is queued in the downlink (nobody plays it): the model is "speaking"
        await until(lambda: slot.downlink.write_cursor > 48000, what="model audio in the downlink")
        epoch = slot.downlink.flush_epoch
        await speak(slot, speech[:16000 // 2], speed=1.0)  # the caller talks over it for 0.5 s
        assert slot.downlink.flush_epoch > epoch and w.stats.barge_ins >= 1
        assert slot.downlink.available() < 48000 * 0.5  # the old reply is gone (consumer obeys the epoch)
        assert slot.counters.get("interruptions") >= 1


async def _echo_queued(slot, speech) -> bytes:
    """Have the emulator answer one turn; return the whole echo, left unplayed in the downlink ring."""
    await speak(slot, np.concatenate([silence(0.2), speech, silence(0.6)]))
    await until(lambda: slot.downlink.write_cursor > 48000, what="model audio in the downlink")
    last = -1
    while slot.downlink.write_cursor != last:  # burst pacing: the rest follows within moments
        last = slot.downlink.write_cursor
        await asyncio.sleep(0.3)
    return slot.downlink.peek(slot.downlink.available()) or b""


async def test_paused_playback_confirmed_by_speech_is_flushed_then_released(cfg, seg, emu, tmp_path,
                                                                            speech) -> None:
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        await until(lambda: slot.model_state == "live", what="model live")
        await _echo_queued(slot, speech)
        epoch = slot.downlink.flush_epoch
        seq = slot.request_hold()  # the media worker paused on the caller's first loud frame
        await speak(slot, speech[:16000 // 2], speed=1.0)  # ... because the caller talks over the answer
        assert slot.hold_words() == (seq, seq)
        assert slot.downlink.flush_epoch > epoch and slot.downlink.available() < 48000 * 0.5
        assert slot.counters.get("pauses_confirmed") == 1 and slot.counters.get("pauses_released") == 0
        assert w.stats.barge_ins >= 1


async def test_paused_playback_on_a_knock_resumes_with_the_answer_intact(cfg, seg, emu, tmp_path,
                                                                         speech) -> None:
    slot = seg.slot(1)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        await until(lambda: slot.model_state == "live", what="model live")
        queued = await _echo_queued(slot, speech)
        starts, epoch = w.stats.activity_starts, slot.downlink.flush_epoch
        seq = slot.request_hold()
        t0 = time.monotonic()
        await speak(slot, np.concatenate([white_noise(0.02, -12.0), silence(0.1)]), speed=1.0)
        await until(lambda: slot.hold_words()[1] == seq, 5, "the hold released")
        waited = time.monotonic() - t0
        assert waited >= cfg.vad.pause_confirm_ms / 1000, waited
        assert slot.counters.get("pauses_released") == 1 and slot.counters.get("pauses_confirmed") == 0
        assert w.stats.activity_starts == starts and slot.downlink.flush_epoch == epoch
        # the answer resumes where it stopped: every byte of the echo is still queued, in order
        assert slot.downlink.peek(len(queued)) == queued
        corr, _ = best_correlation(to24k(speech), np.frombuffer(queued, np.int16), 24000)
        assert corr > 0.9, corr


def _write_config(path: Path, emu, state: Path, vertex_key: Path | None = None) -> None:
    """The worker's config: the Developer API with the emulator's key, or Vertex AI with a
    service-account key file (``vertex_key``) whose token_uri is the emulator's /token."""
    auth = (f'platform = "vertex"\nproject = "va-test-project"\nlocation = "europe-west4"\n'
            f'allowed_locations = ["europe-west4"]\ncredentials_file = "{vertex_key}"\n' if vertex_key
            else f'api_key = "{emu.api_key}"\n')
    path.write_text(
        "[model]\n"
        f'{auth}base_url = "{emu.base_url}"\nca_file = "{emu.ca_file}"\n'
        'greeting = ""\n'
        "[compliance]\n"
        'ai_disclosure = false\nai_disclosure_off_reason = "test: no greeting"\n'
        "[paths]\n"
        f'state_dir = "{state}"\n'
    )


def _start_worker(seg, cfg_path: Path, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "voice-appliance"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "appliance"]
    args = ["ai-worker", "--shard", "0", "--segment", seg.name, "--config", str(cfg_path)]
    return subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=log.open("ab"))


_gone = pid_gone


@pytest.mark.parametrize("platform", ["developer", "vertex"])
async def test_sigkill_mid_utterance_restart_resumes_without_losing_audio(seg, emu, sa, tmp_path, speech,
                                                                         platform) -> None:
    cfg_path = tmp_path / "appliance.toml"
    key = sa.key_file(tmp_path / "sa.json", f"{emu.base_url}/token") if platform == "vertex" else None
    _write_config(cfg_path, emu, tmp_path / "state", key)
    log = tmp_path / "worker.log"
    slot = seg.slot(0)
    activate_slot(slot, options={"greeting": ""})
    proc = _start_worker(seg, cfg_path, log)
    procs = [proc]
    try:
        await until(lambda: slot.model_state == "live", 30, "model live")
        pid, age = seg.heartbeat_age("ai")
        assert pid == proc.pid and age is not None and age < 3.0  # the arbiter's stale limit; ~0.02 s idle
        # turn 1: a complete exchange, so the model issues a resume handle
        await speak(slot, np.concatenate([silence(0.2), speech, silence(0.7)]))
        await until(lambda: bool(slot.resume_handle), 20, "resume handle")
        first_handle = slot.resume_handle
        sessions = emu.sessions()
        conv = next(s["session"] for s in sessions if s["live"])
        assert emu.session(conv)["live"]["platform"] == platform
        before = len(emu.audio(conv))
        # turn 2: SIGKILL halfway through the utterance; the media worker keeps writing meanwhile
        utter = np.concatenate([silence(0.2), speech, silence(0.7)])
        fr = frames(utter)
        half = len(fr) // 2
        for f in fr[:half]:
            slot.uplink.write(f)
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        for f in fr[half: half + 15]:  # 300 ms of speech while no AI worker runs
            slot.uplink.write(f)
            await asyncio.sleep(0.01)
        proc = _start_worker(seg, cfg_path, log)
        procs.append(proc)
        cursor = slot.downlink.write_cursor
        for f in fr[half + 15:]:
            slot.uplink.write(f)
            await asyncio.sleep(0.01)
        t_end = time.monotonic()
        # the restarted worker resumed the same conversation and the model got the whole utterance
        # generous limits: a replacement worker's start (imports, VAD model, Live connect) takes ~1 s idle
        # and ~10 s on a loaded 2-core box; the content check below is what matters
        await until(lambda: emu.session(conv)["resumes"] >= 1, 40, "resume")
        # every handle reaches the slot now (the journal follows it), so wait for the content itself
        await until(lambda: len(emu.audio(conv)) - before >= speech.size * 2, 40, "turn 2 held by the model")
        await until(lambda: slot.resume_handle != first_handle, 40, "a new handle after turn 2")
        rec = np.frombuffer(emu.audio(conv)[before:], np.int16)
        corr, _ = best_correlation(speech, rec, 16000)
        assert corr > 0.98, corr
        # and the echo of turn 2 reached the downlink, soon after the caller stopped
        await until(lambda: slot.downlink.write_cursor > cursor, 30, "echo")
        print(f"echo {time.monotonic() - t_end:.2f} s after the caller stopped")
    finally:
        for p in procs:
            stop(p, 10)
            assert _gone(p.pid)


@pytest.mark.parametrize("platform", ["developer", "vertex"])
async def test_goaway_mid_utterance_through_the_worker_loses_no_audio(seg, emu, sa, tmp_path, speech,
                                                                       platform) -> None:
    """goAway while the caller speaks: the worker's Live session resumes the same conversation and the
    model holds the whole utterance once (Vertex: replayed from lastConsumedClientMessageIndex)."""
    cfg_path = tmp_path / "appliance.toml"
    key = sa.key_file(tmp_path / "sa.json", f"{emu.base_url}/token") if platform == "vertex" else None
    _write_config(cfg_path, emu, tmp_path / "state", key)
    cfg = load_config(cfg_path, env={})
    settings = None if key else emu.client_settings()  # Vertex: the worker's own settings from [model]
    slot = seg.slot(0)
    async with running(cfg, seg, emu, tmp_path, settings=settings) as w:
        activate_slot(slot, options={"greeting": ""})
        await until(lambda: slot.model_state == "live", 30, "model live")
        await speak(slot, np.concatenate([silence(0.2), speech, silence(0.7)]))
        await until(lambda: bool(slot.resume_handle), 20, "resume handle")
        conv = w.calls[0].live.server_session_id
        assert emu.session(conv)["live"]["platform"] == platform
        before = len(emu.audio(conv))
        fr = frames(np.concatenate([silence(0.2), speech, silence(0.7)]))
        half = len(fr) // 2
        for i, f in enumerate(fr):
            if i == half:
                emu.fault(conv, "goaway", time_left_s=0.3)
            assert slot.uplink.write(f)
            await asyncio.sleep(0.01)
        await until(lambda: emu.session(conv)["resumes"] >= 1, 30, "resume after goAway")
        await until(lambda: len(emu.audio(conv)) - before >= speech.size * 2, 30, "turn 2 held by the model")
        await until(lambda: slot.counters.get("reconnects") >= 1, 10, "reconnect counted")
        rec = np.frombuffer(emu.audio(conv)[before:], np.int16)
        corr, _ = best_correlation(speech, rec, 16000)
        assert corr > 0.98, corr
        print(f"model holds {len(rec)} samples for {speech.size} of speech")
        assert len(rec) < speech.size + 16000 * 1.0  # once: speech, pre-roll and hangover, nothing twice


async def test_unreachable_model_keeps_call_plays_hold_then_recovers(cfg, seg, emu, tmp_path, speech) -> None:
    cfg = replace(cfg, model={"max_retries": 1, "degraded_retry_seconds": 1.0})
    slot = seg.slot(0)
    emu.configure(refuse=True)
    try:
        async with running(cfg, seg, emu, tmp_path) as w:
            activate_slot(slot, options={"greeting": ""})
            await until(lambda: slot.model_state == "degraded", 30, "degraded")
            # the caller hears "please hold" (espeak speech, > 0.5 s) and the call stays attached
            await until(lambda: slot.downlink.available() > 24000, 15, "hold prompt")
            assert 0 in w.calls and slot.counters.get("degraded") >= 1
            emu.configure(refuse=False)
            await until(lambda: slot.model_state == "live", 30, "recovered")
            slot.downlink.skip(slot.downlink.available())
            await speak(slot, np.concatenate([silence(0.2), speech, silence(0.7)]))
            got = bytearray()
            await until(lambda: collect(slot, got) >= 2 * len(speech) * 3 // 2, 30, "echo after recovery")
            corr, _ = best_correlation(to24k(speech), np.frombuffer(bytes(got), np.int16), 24000)
            assert corr > 0.9, corr
    finally:
        emu.configure(refuse=False)
