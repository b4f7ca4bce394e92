"""The whole call through the supervisor: aiortc caller → Janus (NoSIP) → media worker → AI worker →
the Live emulator (real google-genai SDK) → back; and kill -9 of each worker mid-call.

The emulator echoes the caller's utterance; the test checks the reply's content by envelope correlation
with what was spoken, and records mouth-to-ear latency (end of speech → first loud reply audio).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import numpy as np
import pytest

from shm.segment import ShardSegment, segment_name
from tests.harness.audio import speech
from tests.supervisor.conftest import (
    NODE_MODULES,
    demo_page_call,
    open_call,
    start_supervisor,
    stop_supervisor,
    wait_until,
)
from tests.supervisor.rtc import RATE, caller

pytestmark = [
    pytest.mark.janus,
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def sup(tmp_path_factory, redis_srv, janus, emulator):
    sp = start_supervisor(tmp_path_factory.mktemp("sup"), redis_srv.url, janus, slots=2, extra={
        "model": {"api_key": emulator.api_key, "base_url": emulator.base_url, "ca_file": emulator.ca_file,
                  "max_retries": 5},
    })
    yield sp
    stop_supervisor(sp)


def envelope(x: np.ndarray, hop: int) -> np.ndarray:
    x = x[: len(x) // hop * hop].astype(np.float64).reshape(-1, hop)
    return np.sqrt((x * x).mean(axis=1))


def find_echo(reference: np.ndarray, heard: np.ndarray, rate: int = RATE) -> tuple[float, float]:
    """(best envelope correlation, its offset in seconds) of ``reference`` inside ``heard``."""
    er, eh = envelope(reference, rate // 100), envelope(heard, rate // 100)
    best, best_lag = 0.0, 0
    for lag in range(max(0, len(eh) - len(er) + 1)):
        seg = eh[lag: lag + len(er)]
        if seg.std() > 0 and er.std() > 0:
            c = float(np.corrcoef(er, seg)[0, 1])
            if c > best:
                best, best_lag = c, lag
    return best, best_lag / 100


async def say_and_hear(track, rec, utterance: np.ndarray, limit: float = 15.0,
                       reference: np.ndarray | None = None) -> tuple[float, float]:
    """Play ``utterance`` (after what is already queued); find the echo of ``reference`` (default: the
    utterance) in what comes back; return (envelope correlation, mouth-to-ear seconds: end of
    playback → start of the echo)."""
    reference = utterance if reference is None else reference
    if len(utterance):
        track.play(utterance)
    await wait_until(lambda: track.play_ended is not None, what="utterance played")
    end = track.play_ended
    await wait_until(lambda: rec.first_loud_after(end + 0.05), limit=limit, what="reply audio")
    await asyncio.sleep(len(reference) / RATE + 2.0)  # the whole echo, even if it starts late
    heard = rec.since(end)
    corr, offset = find_echo(reference, heard)
    first_ts = next((ts for ts, _ in rec.chunks if ts >= end), end)
    return corr, first_ts + offset - end


async def wait_quiet(rec, seconds: float = 1.0, limit: float = 20.0) -> None:
    """Wait until nothing loud was heard for ``seconds`` (the greeting is over)."""
    def quiet() -> bool:
        now = time.time()
        recent = [c for ts, c in rec.chunks if ts >= now - seconds]
        if len(recent) < seconds * 40:  # ~50 frames/s expected; need most of the window
            return False
        return all(float(np.sqrt(np.mean(c.astype(np.float64) ** 2))) < 300 for c in recent)

    await wait_until(quiet, limit=limit, step=0.1, what="quiet line (greeting over)")


def media_path_losses(slot) -> dict[str, int]:
    """Frames the media worker lost, received too late or concealed (the caller's path, not the AI's)."""
    return {k: int(slot.counters.get(k)) for k in ("late", "lost", "concealed")}


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


async def test_echo_through_the_appliance_and_worker_crashes(sup, emulator, sub, tmp_path):
    utterance = speech("the quick brown fox jumps over the lazy dog", RATE)
    # a different sentence for each phase, so each echo (and each check of what the model received)
    # can only match its own phase
    during_ai_restart = speech("please remember the number four hundred and twelve", RATE)
    after_media_restart = speech("a red balloon floats over seven green hills", RATE)
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    pc, track, rec = await caller()
    try:
        async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
            sid = await open_call(http, auth, pc, sup)
            await wait_quiet(rec)  # the greeting is not interruptible: let it finish
            corr, m2e = await say_and_hear(track, rec, utterance)
            print(f"echo correlation {corr:.2f}, mouth-to-ear {m2e * 1000:.0f} ms")
            assert corr > 0.6

            # kill -9 the AI worker while the caller speaks: the call stays up and the reply comes
            ai_pid, _ = seg.heartbeat_age("ai")
            path_before = media_path_losses(seg.slot(0))
            track.play(silence(0.3))
            await asyncio.sleep(0.1)
            os.kill(ai_pid, signal.SIGKILL)
            t_kill = time.time()
            track.play(during_ai_restart)  # the caller speaks while the AI worker is dead and restarting

            def ai_back():
                pid, age = seg.heartbeat_age("ai")
                return pid != ai_pid and age is not None and age < 0.5

            await wait_until(ai_back, step=0.01, what="AI worker back")
            print(f"AI worker kill -9 → replacement beating after {(time.time() - t_kill) * 1000:.0f} ms")
            drops_before = seg.slot(0).uplink.overruns
            corr2, m2e2 = await say_and_hear(track, rec, np.zeros(0, dtype=np.int16), limit=20,
                                             reference=during_ai_restart)
            print(f"after AI kill -9 mid-utterance: correlation {corr2:.2f}, m2e {m2e2 * 1000:.0f} ms")
            assert corr2 > 0.5
            # no caller audio lost: the model (emulator) received the whole utterance across the resume
            import soxr

            conv = [c for c in emulator.sessions() if c["resumes"] >= 1][-1]
            got = np.frombuffer(emulator.audio(conv["session"]), dtype=np.int16)
            ref16 = soxr.resample(during_ai_restart, RATE, conv["rate"]).astype(np.int16)
            corr_in, _ = find_echo(ref16, got, conv["rate"])
            path = {k: v - path_before[k] for k, v in media_path_losses(seg.slot(0)).items()}
            print(f"model received the utterance spoken during the AI restart: correlation {corr_in:.2f} "
                  f"(uplink ring drops: {drops_before}, caller→media worker path: {path})")
            assert corr_in > 0.8
            assert pc.connectionState == "connected"

            # kill -9 the media worker: the call stays up and caller audio flows again within ~1 s
            # (packets that arrive while no process owns the port are lost: that is the gap)
            slot = seg.slot(0)
            media_pid, _ = seg.heartbeat_age("media")
            os.kill(media_pid, signal.SIGKILL)
            t_kill = time.monotonic()
            await asyncio.sleep(0.05)
            rx = slot.counters.get("rx_packets")
            await wait_until(lambda: slot.counters.get("rx_packets") > rx + 2, step=0.01, what="RTP again")
            gap = time.monotonic() - t_kill
            print(f"media worker kill -9 → caller RTP processed again after {gap * 1000:.0f} ms")
            # ~0.25-0.8 s idle; 2.6 s seen with real-time (SCHED_RR) load next to the suite: the bound only
            # proves the replacement takes over the call's port (what comes next checks the content)
            assert gap < 8.0
            corr3, m2e3 = await say_and_hear(track, rec, after_media_restart, limit=20)
            print(f"after media kill -9: correlation {corr3:.2f}, mouth-to-ear {m2e3 * 1000:.0f} ms")
            got = np.frombuffer(emulator.audio(conv["session"]), dtype=np.int16)
            ref16 = soxr.resample(after_media_restart, RATE, conv["rate"]).astype(np.int16)
            corr_in3, _ = find_echo(ref16, got, conv["rate"])
            print(f"model received the utterance spoken after the media restart: correlation {corr_in3:.2f}")
            assert corr_in3 > 0.8 and corr3 > 0.5
            assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
    finally:
        await rec.stop()
        await pc.close()
        seg.close()


async def test_room_mode_echo_through_audiobridge(sup, sub):
    utterance = speech("seven eight nine ten", RATE)
    token = sup.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    pc, track, rec = await caller()
    try:
        async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
            sid = await open_call(http, auth, pc, sup, mode="room", active=False, what="model live")
            await wait_quiet(rec)
            corr, m2e = await say_and_hear(track, rec, utterance)
            print(f"room mode: echo correlation {corr:.2f}, mouth-to-ear {m2e * 1000:.0f} ms")
            assert corr > 0.6
            assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
    finally:
        await rec.stop()
        await pc.close()




@pytest.mark.skipif(not (NODE_MODULES / "playwright-core").exists(), reason="npm install in tests/e2e first")
async def test_demo_page_talks_in_chromium(sup, tmp_path):
    """A person on the demo page: fake microphone speaking, transcripts shown, the answer audible."""

    from tests.harness.audio import write_wav

    wav = tmp_path / "speech.wav"
    write_wav(wav, np.concatenate([speech("hello appliance, can you hear me", RATE), silence(2.0)]), RATE)
    heard = (await demo_page_call(sup.api + "/", 3000, wav, sup.log_tail, wait_quality=True))["heard"]
    print(f"demo page heard: max RMS {heard['maxRms']:.3f}, transcript {heard['transcript']}, "
          f"line {heard['quality']!r}, round trips {heard['turns']}")
    # the line quality from GET /v1/sessions/{id} (loopback: no loss) and the browser's own round trip
    assert re.match(r"MOS 4\.\d\d · loss 0\.0 % up / 0\.0 % down · jitter \d+ ms · RTT \d+ ms$",
                    heard["quality"]), heard["quality"]
    trips = [int(t.split()[0]) for t in heard["turns"]]
    assert trips and all(100 < t < 10000 for t in trips), trips
