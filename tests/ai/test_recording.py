"""Call recording end to end: the real AI worker loop, Silero VAD, the real google-genai SDK against the
Live emulator (echoing what it heard), recording on for one call and off for the other.

The test plays the media worker (one 20 ms uplink frame per 20 ms, for the whole call, like the real
one) and decodes the result with a real Opus decoder (PyAV: FFmpeg's Ogg demuxer and Opus decoder).
"""

from __future__ import annotations

import asyncio
import io
import json

import av
import numpy as np
import pytest
import soxr

from appliance.compliance.atrest import load_master
from appliance.compliance.recordings import RecordingStore, recordings_root
from appliance.config import load_config, replace
from tests.ai.audio import best_correlation, frames, silence, white_noise
from tests.ai.live_worker import NO_DISCLOSURE, running, until
from tests.harness.emulator import start_emulator
from tests.harness.shm import activate_slot, shard_segment

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with start_emulator(tmp_path_factory.mktemp("emu"), pacing="burst") as e:
        yield e


class Feeder:
    """The media worker's uplink: one frame per 20 ms on every active slot, silence unless told."""

    def __init__(self, slots) -> None:
        self.slots = slots
        self.queued: dict[int, list[bytes]] = {s.index: [] for s in slots}

    def say(self, slot, pcm: np.ndarray) -> None:
        self.queued[slot.index] += frames(pcm)

    def idle(self, slot) -> bool:
        return not self.queued[slot.index]

    async def run(self) -> None:
        quiet = bytes(640)
        loop = asyncio.get_running_loop()
        t = loop.time()
        while True:
            for s in self.slots:
                q = self.queued[s.index]
                s.uplink.write(q.pop(0) if q else quiet)
            t += 0.02
            await asyncio.sleep(max(0.0, t - loop.time()))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if x.size else 0.0


def decode(ogg: bytes) -> tuple[np.ndarray, int, dict[str, str]]:
    with av.open(io.BytesIO(ogg)) as c:
        tags = dict(c.streams.audio[0].metadata)
        chunks, rate = [], 48000
        for fr in c.decode(audio=0):
            rate = fr.sample_rate
            chunks.append(fr.to_ndarray())  # fltp: (2, n)
    return np.concatenate(chunks, axis=1), rate, tags


async def test_recording_both_legs_encrypted_paused_and_off(emu, tmp_path, speech, monkeypatch) -> None:
    cfg = replace(load_config(None, env={}),
                  model={"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
                         "greeting": "", "hold_prompt": ""},
                  paths={"state_dir": str(tmp_path)}, compliance={**NO_DISCLOSURE, "recording": "audio"})
    with shard_segment(slots=2, uplink_bytes=64000, downlink_bytes=384000) as seg:
        on, off = seg.slot(0), seg.slot(1)
        feeder = Feeder([on, off])
        feed = asyncio.create_task(feeder.run())
        try:
            async with running(cfg, seg, emu, tmp_path) as w:
                activate_slot(on, options={"greeting": ""}, session_id="box.rec-on")
                activate_slot(off, options={"greeting": "", "recording": "off"}, session_id="box.rec-off")
                await until(lambda: on.model_state == "live" and off.model_state == "live", what="live")
                feeder.say(on, np.concatenate([speech, silence(0.8)]))
                feeder.say(off, np.concatenate([speech, silence(0.8)]))
                echo = bytearray()

                def drain() -> int:  # the media worker playing the downlink
                    n = on.downlink.available()
                    if n:
                        echo.extend(on.downlink.read(n))
                    m = off.downlink.available()
                    if m:
                        off.downlink.read(m)
                    return len(echo)

                await until(lambda: drain() >= len(speech) * 3, what="the echo")  # 24 kHz, 2 bytes
                await asyncio.sleep(0.5)
                drain()
                await asyncio.sleep(len(echo) / 48000 + 0.3)  # until the caller has heard it all
                # an operator pauses the recording: 1 s of (loud) caller noise must not be recorded
                store = RecordingStore(recordings_root(cfg), load_master(cfg))
                noise = white_noise(1.0, -20)
                store.set_paused("box.rec-on", True, by="op")
                await asyncio.sleep(0.5)  # the writer polls the flag every 0.2 s
                feeder.say(on, noise)
                await until(lambda: feeder.idle(on), what="noise sent")
                await asyncio.sleep(0.3)
                store.set_paused("box.rec-on", False, by="op")
                await asyncio.sleep(0.5)
                # secure keypad entry on the call: the recorder polls the call's read-only
                # ``secure_entry_active`` (PCI keypad entry, workers/ai/call.py); here it is driven directly
                secure = {"on": False}
                call = w.calls[0]
                monkeypatch.setattr(type(call), "secure_entry_active",
                                    property(lambda c: secure["on"] and c is call), raising=False)
                secure["on"] = True
                feeder.say(on, noise)
                await until(lambda: feeder.idle(on), what="noise sent")
                secure["on"] = False
                feeder.say(on, white_noise(0.6, -20, seed=2))  # recorded: after the gaps
                await until(lambda: feeder.idle(on), what="noise sent")
                await asyncio.sleep(0.3)
                on.free()
                off.free()
                await until(lambda: not w.calls, what="calls detached")
                await asyncio.to_thread(w.recordings.close)
                assert w.recordings.dropped_bytes == 0 and w.recordings.writer_errors == 0
        finally:
            feed.cancel()

    store = RecordingStore(recordings_root(cfg), load_master(cfg))
    assert store.parts("box.rec-off") == []  # recording off → no file
    assert not list(recordings_root(cfg).rglob("box.rec-off*"))
    (part,) = store.parts("box.rec-on")
    raw = part.audio.read_bytes()
    assert b"OggS" not in raw and b"OpusHead" not in raw and b"OpusTags" not in raw  # sealed at rest
    ogg = b"".join(store.open_session("box.rec-on"))
    assert ogg.startswith(b"OggS") and b"OpusHead" in ogg
    pcm, rate, tags = decode(ogg)
    assert rate == 48000 and pcm.shape[0] == 2
    assert tags.get("CHANNEL_LEFT") == "caller" and "ai-generated" in tags.get("CHANNEL_RIGHT", "")
    meta = json.loads(part.sidecar.read_text())
    assert meta["complete"] and meta["channels"] == {"left": "caller", "right": "ai"}
    assert meta["ended_at"] is not None
    left, right = pcm[0], pcm[1]
    ms = rate // 1000

    # left = the caller's speech, right = the model's audio (the echo as the downlink got it)
    speech48 = soxr.resample(speech, 16000, rate).astype(np.float32) / 32768
    echo48 = soxr.resample(np.frombuffer(bytes(echo), np.int16), 24000, rate).astype(np.float32) / 32768
    first_ai = meta["ai_generated"]["segments"][0]
    span = left[: first_ai["start_ms"] * ms]
    assert best_correlation(speech48, span) > 0.85  # FFT-based: the span may be seconds long
    ai_span = right[first_ai["start_ms"] * ms: first_ai["end_ms"] * ms + 200 * ms]
    assert best_correlation(echo48, ai_span) > 0.85
    # the legs do not leak into each other: the right channel is silent while the caller speaks,
    # the left while the model answers (the caller is quiet then)
    assert rms(right[: first_ai["start_ms"] * ms]) < 1e-3
    assert rms(left[first_ai["start_ms"] * ms: first_ai["end_ms"] * ms]) < 1e-3
    assert rms(ai_span) > 0.02 and rms(span) > 0.02
    # the AI segment is the length of the echo (± 300 ms)
    assert abs((first_ai["end_ms"] - first_ai["start_ms"]) - len(echo) // 48) < 300

    # both pauses are marked gaps with silence in them; the noise after them was recorded
    gaps = {g["reason"]: g for g in meta["gaps"]}
    assert set(gaps) == {"operator", "secure_entry"}, meta["gaps"]
    for g in gaps.values():
        assert g["end_ms"] - g["start_ms"] >= 900, g
        inside = pcm[:, (g["start_ms"] + 20) * ms: (g["end_ms"] - 20) * ms]
        assert np.max(np.abs(inside)) < 1e-3
    after = left[(gaps["secure_entry"]["end_ms"] + 100) * ms: (gaps["secure_entry"]["end_ms"] + 500) * ms]
    assert rms(after) > 0.03
    assert gaps["operator"]["start_ms"] < gaps["secure_entry"]["start_ms"]
    assert abs(meta["duration_ms"] - pcm.shape[1] // ms) < 100


async def test_unheard_audio_cut_overload_gap_restart_new_part(tmp_path, monkeypatch) -> None:
    """The tick with a scripted Live double (no emulator): model audio the caller never heard (cut by
    ``interrupted``) is not in the recording; audio dropped under overload is a marked gap; a worker
    that lets go of a live call (restart) finishes its part and the next worker starts part 2."""
    from tests.ai.doubles import FakeLive
    from tests.harness.audio import dominant_frequency, tone
    from workers.ai import recording
    from workers.ai.greeting import PromptCache
    from workers.ai.live.events import AudioOut, Interrupted
    from workers.ai.worker import AiWorker

    FakeLive.instances = []
    cfg = replace(load_config(None, env={}), model={"greeting": "", "hold_prompt": ""},
                  paths={"state_dir": str(tmp_path)}, compliance={**NO_DISCLOSURE, "recording": "audio"})
    quiet = bytes(640)
    with shard_segment(slots=1, uplink_bytes=64000, downlink_bytes=384000) as seg:
        slot = seg.slot(0)

        async def run(w: AiWorker, n: int) -> None:
            for _ in range(n):
                slot.uplink.write(quiet)
                w.tick()
                await asyncio.sleep(0)

        w = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path))
        activate_slot(slot, options={"greeting": ""}, session_id="box.rec-cut")
        await run(w, 10)  # 200 ms of call, then 2 s of model audio arrives at once
        FakeLive.instances[-1].emit(AudioOut(pcm24k=tone(1000, 2.0, 24000).tobytes()))
        await run(w, 25)  # 500 ms of it is played ...
        FakeLive.instances[-1].emit(Interrupted())  # ... and the model stops: the rest never plays
        await run(w, 25)
        monkeypatch.setattr(recording, "MAX_QUEUED_BYTES", 0)
        await run(w, 15)  # 300 ms that do not fit the writer's queue
        monkeypatch.undo()
        await run(w, 10)
        await w.shutdown()  # the worker stops; the call goes on
        assert w.recordings.dropped_bytes == 15 * 640
        w2 = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path))
        await run(w2, 10)
        slot.free()
        await run(w2, 2)
        await w2.shutdown()

    store = RecordingStore(recordings_root(cfg), load_master(cfg))
    one, two = store.parts("box.rec-cut")
    m1, m2 = one.meta(), two.meta()
    assert (one.part, two.part) == (1, 2) and m1["ended_at"] is None and m2["ended_at"] is not None
    assert m1["complete"] and m2["complete"]
    (seg_ai,) = m1["ai_generated"]["segments"]
    assert abs(seg_ai["start_ms"] - 200) <= 20 and abs(seg_ai["end_ms"] - 700) <= 40, seg_ai
    (gap,) = m1["gaps"]
    assert gap["reason"] == "overload" and abs(gap["start_ms"] - 1200) <= 40
    assert abs(gap["end_ms"] - gap["start_ms"] - 300) <= 20
    assert abs(m1["duration_ms"] - 1700) <= 40 and abs(m2["duration_ms"] - 240) <= 40
    pcm, rate, _ = decode(b"".join(store.open_part(one)))
    ms = rate // 1000
    right = pcm[1]
    assert abs(dominant_frequency(right[250 * ms: 650 * ms], rate) - 1000) < 10
    assert rms(right[760 * ms:]) < 1e-3  # the 1.5 s the caller never heard are not there
    assert rms(right[300 * ms: 600 * ms]) > 0.2
    # the chained download holds both parts
    both = b"".join(store.open_session("box.rec-cut"))
    assert both.count(b"OpusHead") == 2
