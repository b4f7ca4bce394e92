"""The AI worker's tick logic on a real shm segment and the real VAD, with a scripted Live double."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from appliance.config import load_config, replace
from shm.audio import DOWN_FRAME
from shm.segment import EventCode
from tests.ai.audio import frames, silence, white_noise
from tests.ai.doubles import FakeLive
from tests.ai.live_worker import NO_DISCLOSURE
from tests.harness.audio import best_correlation, tone
from tests.harness.shm import activate_slot, shard_segment
from workers.ai.dtmf import dtmf_text
from workers.ai.greeting import PromptCache
from workers.ai.live.events import AudioOut, Interrupted, ResumeHandle, StateChanged, TurnComplete
from workers.ai.worker import AiWorker


@pytest.fixture
def cfg(tmp_path):
    model = {"greeting": "", "hold_prompt": "Please hold.", "degraded_retry_seconds": 0.5}
    return replace(load_config(None, env={}), model=model, paths={"state_dir": str(tmp_path)},
                   compliance=NO_DISCLOSURE)


@pytest.fixture
def seg():
    with shard_segment(slots=4, uplink_bytes=64000, downlink_bytes=384000) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_fake():
    FakeLive.instances = []
    FakeLive.fail_start = False
    FakeLive.fail_init = False
    yield


def make_worker(cfg, seg, tmp_path) -> AiWorker:
    return AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path))


async def ticks(worker: AiWorker, n: int = 1) -> None:
    for _ in range(n):
        worker.tick()
        await asyncio.sleep(0)


def drain_downlink(slot) -> bytes:
    n = slot.downlink.available()
    return slot.downlink.read(n) if n else b""


async def feed(worker: AiWorker, slot, pcm: np.ndarray) -> None:
    """Write 20 ms frames into the uplink as the media worker would, one tick per frame."""
    for f in frames(pcm):
        assert slot.uplink.write(f)
        await ticks(worker)


async def test_turn_preroll_and_audio_forwarding(cfg, seg, tmp_path, speech) -> None:
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(1)
    activate_slot(slot)
    await ticks(w, 2)
    live = FakeLive.instances[0]
    assert slot.model_state == "live" and live.options.resume_handle is None
    await feed(w, slot, np.concatenate([silence(0.5), speech, silence(0.8)]))
    assert live.log == ["start", "audio", "end"]
    sent = np.frombuffer(bytes(live.sent), np.int16)
    # the whole utterance reached the model, first syllable included (pre-roll)
    corr, lag = best_correlation(speech, sent, 16000)
    assert corr > 0.99 and lag <= 0.25
    assert w.stats.activity_starts == 1 and w.stats.activity_ends == 1
    # hangover (400 ms) + up to one window, no more: audio sent after the speech is bounded
    tail = len(sent) / 16000 - lag - len(speech) / 16000
    assert 0.35 <= tail <= 0.55, tail


async def test_model_audio_to_downlink_and_barge_in(cfg, seg, tmp_path, speech) -> None:
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w, 2)
    live = FakeLive.instances[0]
    reply = tone(440, 1.01, 24000)  # not a whole number of frames
    live.emit(AudioOut(reply[:12000].tobytes()))
    live.emit(AudioOut(reply[12000:].tobytes()))
    live.emit(TurnComplete())
    await ticks(w)
    got = np.frombuffer(drain_downlink(slot), np.int16)
    assert len(got) % (DOWN_FRAME // 2) == 0 and len(got) >= len(reply)
    assert np.array_equal(got[: len(reply)], reply)  # bit-exact, tail padded with silence
    # a long reply is playing; the caller starts talking -> flushed in the tick the VAD sees speech
    live.emit(AudioOut(tone(440, 3.0, 24000).tobytes()))
    assert slot.downlink.available() == 3 * 48000
    pcm = np.concatenate([silence(0.1), speech[:8000]])
    flushed_at = None
    for i, f in enumerate(frames(pcm)):
        slot.uplink.write(f)
        await ticks(w)
        if slot.downlink.available() == 0 and flushed_at is None:
            flushed_at = i
    assert flushed_at is not None and w.stats.barge_ins == 1
    # barge-in needs only one VAD window: flushed within ~100 ms of speech onset (5 frames of silence first)
    assert flushed_at * 20 - 100 <= 140, flushed_at
    assert live.log[0] == "start"
    # the rest of the interrupted model turn is dropped until the model acknowledges
    live.emit(AudioOut(tone(440, 0.2, 24000).tobytes()))
    assert slot.downlink.available() == 0
    live.emit(Interrupted())
    live.emit(AudioOut(tone(440, 0.2, 24000).tobytes()))
    assert slot.downlink.available() > 0


async def test_slot_reuse_resume_and_state_fields(cfg, seg, tmp_path) -> None:
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(2)
    gen1 = activate_slot(slot, session_id="first")
    await ticks(w, 2)
    live1 = FakeLive.instances[0]
    live1.emit(ResumeHandle("handle-1"))
    assert slot.resume_handle == "handle-1"
    slot.begin_close()
    await ticks(w, 2)
    assert live1.closed and 2 not in w.calls
    slot.free()
    gen2 = activate_slot(slot, session_id="second", options={"resume_handle": "from-redis", "greeting": ""})
    assert gen2 > gen1
    await ticks(w, 2)
    live2 = FakeLive.instances[1]
    assert live2.session_id == "second" and live2.options.resume_handle == "from-redis"
    # the old session's late events must not touch the reused slot
    live1.emit(ResumeHandle("stale"))
    live1.emit(AudioOut(tone(300, 0.5, 24000).tobytes()))
    assert slot.downlink.available() == 0


async def test_new_call_plays_greeting_resumed_call_does_not(cfg, seg, tmp_path) -> None:
    cfg = replace(cfg, model={"greeting": "Hello, this is an AI assistant."})
    w = make_worker(cfg, seg, tmp_path)
    await w.prepare()
    activate_slot(seg.slot(0))
    await ticks(w)
    assert seg.slot(0).downlink.available() > 24000 * 2  # > 0.5 s of speech, before the model is live
    s1 = seg.slot(1)
    activate_slot(s1)
    s1.resume_handle = "h"  # what a crashed worker left behind
    await ticks(w)
    assert s1.downlink.available() == 0
    assert FakeLive.instances[1].options.resume_handle == "h"


async def test_degraded_model_keeps_call_and_plays_hold(cfg, seg, tmp_path) -> None:
    FakeLive.fail_start = True
    w = make_worker(cfg, seg, tmp_path)
    await w.prepare()
    slot = seg.slot(3)
    activate_slot(slot)
    await ticks(w, 3)
    assert slot.model_state == "degraded"
    hold = slot.downlink.available()
    assert hold > 24000  # "Please hold." is in the downlink
    assert 3 in w.calls  # the call stays
    FakeLive.fail_start = False
    await asyncio.sleep(0.6)  # model.degraded_retry_seconds = 0.5
    await ticks(w, 3)
    assert len(FakeLive.instances) == 2 and slot.model_state == "live"
    FakeLive.instances[1].emit(StateChanged("degraded", "retries exhausted"))
    assert slot.model_state == "degraded"


async def test_one_failing_call_does_not_affect_others(cfg, seg, tmp_path, speech) -> None:
    w = make_worker(cfg, seg, tmp_path)
    a, b = seg.slot(0), seg.slot(1)
    activate_slot(a)
    activate_slot(b)
    await ticks(w, 2)
    live_a, live_b = FakeLive.instances

    def boom(_pcm: bytes) -> None:
        raise RuntimeError("emulated bug")

    live_a.send_audio = boom
    pcm = np.concatenate([silence(0.2), speech[:16000], silence(0.6)])
    for f in frames(pcm):
        a.uplink.write(f)
        b.uplink.write(f)
        await ticks(w)
    assert live_b.log == ["start", "audio", "end"]
    assert w.stats.session_errors >= 1
    assert live_a.closed and len(FakeLive.instances) == 3  # a re-opened on the next scan
    assert a.counters.get("errors") >= 1


async def test_crash_mid_utterance_replays_journal(cfg, seg, tmp_path, speech) -> None:
    slot = seg.slot(0)
    activate_slot(slot, options={"greeting": ""})
    w1 = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path),
                  journal_dir=tmp_path)
    await ticks(w1, 2)
    live1 = FakeLive.instances[0]
    live1.emit(ResumeHandle("h1"))
    pcm = np.concatenate([silence(0.3), speech, silence(0.8)])
    fr = frames(pcm)
    half = len(fr) // 2
    for f in fr[:half]:
        slot.uplink.write(f)
        await ticks(w1)
    assert live1.log == ["start", "audio"]  # mid-utterance
    # SIGKILL: w1 stops without any cleanup; the media worker keeps writing meanwhile
    for f in fr[half: half + 10]:
        slot.uplink.write(f)
    w2 = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path),
                  journal_dir=tmp_path)
    await ticks(w2)
    live2 = FakeLive.instances[1]
    assert live2.options.resume_handle == "h1"
    assert seg.slot(0).downlink.available() == 0  # no greeting on a resumed call
    for f in fr[half + 10:]:
        slot.uplink.write(f)
        await ticks(w2)
    assert live2.log == ["start", "audio", "end"]
    sent = np.frombuffer(bytes(live2.sent), np.int16)
    corr, _ = best_correlation(speech, sent, 16000)
    assert corr > 0.99  # the whole utterance, both halves, reached the resumed session
    assert slot.counters.get("frames_replayed") > 0
    # a handle that arrives before the model answered covers nothing new
    live2.emit(ResumeHandle("h2"))
    assert len(w2.calls[0].outbox.records()) > 2
    # once the turn is answered, the next handle confirms it: the journal empties
    live2.emit(TurnComplete())
    live2.emit(ResumeHandle("h3"))
    assert w2.calls[0].outbox.records() == []
    slot.begin_close()
    await ticks(w2)
    assert not list(tmp_path.glob("*.journal"))


async def paced(worker: AiWorker, slot, pcm: np.ndarray, until=None) -> int:
    """Like ``feed`` but in real time (holds are settled on the monotonic clock); stops when ``until()``."""
    for i, f in enumerate(frames(pcm)):
        assert slot.uplink.write(f)
        await ticks(worker)
        if until is not None and until():
            return i
        await asyncio.sleep(0.02)
    return -1


async def test_hold_confirmed_by_speech_flushes_then_releases(cfg, seg, tmp_path, speech) -> None:
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w, 2)
    live = FakeLive.instances[0]
    live.emit(AudioOut(tone(440, 3.0, 24000).tobytes()))
    epoch = slot.downlink.flush_epoch
    seq = slot.request_hold()  # the media worker paused playback on the caller's first loud frame
    await ticks(w)
    assert slot.hold_words() == (seq, 0)  # not settled: no speech seen yet, far from the deadline
    # the caller really talks (fed faster than real time: the confirm deadline cannot be what ends it)
    for f in frames(speech[:8000]):
        slot.uplink.write(f)
        await ticks(w)
        if slot.hold_words()[1] == seq:
            break
    assert slot.hold_words() == (seq, seq)
    # flushed before the release: when the media worker reads again, the old answer is gone
    assert slot.downlink.flush_epoch == epoch + 1 and slot.downlink.available() == 0
    c = slot.counters.snapshot()
    assert c["pauses_confirmed"] == 1 and c["pauses_released"] == 0 and w.stats.barge_ins == 1
    assert live.log[0] == "start"
    live.emit(AudioOut(tone(440, 0.2, 24000).tobytes()))
    assert slot.downlink.available() == 0  # the rest of the interrupted turn is dropped as before


async def test_hold_on_a_click_is_released_and_the_answer_continues_intact(cfg, seg, tmp_path) -> None:
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(1)
    activate_slot(slot)
    await ticks(w, 2)
    live = FakeLive.instances[0]
    answer = tone(440, 3.0, 24000)
    live.emit(AudioOut(answer.tobytes()))
    epoch = slot.downlink.flush_epoch
    click = np.concatenate([white_noise(0.02, -12.0), silence(0.6)])  # a knock: loud, but not speech
    seq = slot.request_hold()
    t0 = asyncio.get_running_loop().time()
    await paced(w, slot, click, until=lambda: slot.hold_words()[1] == seq)
    waited = asyncio.get_running_loop().time() - t0
    assert slot.hold_words() == (seq, seq)
    assert cfg.vad.pause_confirm_ms / 1000 <= waited < cfg.vad.pause_confirm_ms / 1000 + 0.15, waited
    c = slot.counters.snapshot()
    assert c["pauses_released"] == 1 and c["pauses_confirmed"] == 0 and w.stats.barge_ins == 0
    assert slot.downlink.flush_epoch == epoch and live.log == []  # no flush, no caller turn
    # playback resumes exactly where it stopped: the whole answer is still there, bit-exact
    live.emit(AudioOut(tone(660, 0.2, 24000).tobytes()))  # and the model turn goes on
    got = np.frombuffer(drain_downlink(slot), np.int16)
    assert np.array_equal(got[: len(answer)], answer) and len(got) == len(answer) + 4800


async def test_hold_with_nothing_playing_or_during_the_greeting_is_just_released(cfg, seg, tmp_path,
                                                                                  speech) -> None:
    cfg = replace(cfg, model={"greeting": "Hello, this is an AI assistant."})
    w = make_worker(cfg, seg, tmp_path)
    await w.prepare()
    slot = seg.slot(2)
    activate_slot(slot)
    await ticks(w)
    greeting = slot.downlink.available()
    # published for the media worker: the greeting's end (its last partial frame is still queued)
    assert greeting > 24000 and greeting <= slot.protect_until < greeting + DOWN_FRAME
    epoch = slot.downlink.flush_epoch
    seq = slot.request_hold()  # (the media worker never pauses the greeting; be robust anyway)
    await feed(w, slot, np.concatenate([silence(0.1), speech[:8000]]))
    assert slot.hold_words() == (seq, seq) and slot.downlink.flush_epoch == epoch
    assert slot.downlink.available() == greeting  # the AI disclosure plays on
    drain_downlink(slot)
    seq = slot.request_hold()  # nothing to play: released at the next tick, not counted
    await ticks(w)
    assert slot.hold_words() == (seq, seq)
    c = slot.counters.snapshot()
    assert c["pauses_confirmed"] == 0 and c["pauses_released"] == 0


async def test_restarted_worker_settles_a_stale_hold(cfg, seg, tmp_path) -> None:
    cfg = replace(cfg, model={"greeting": "Hello, this is an AI assistant."})
    w1 = make_worker(cfg, seg, tmp_path)
    await w1.prepare()
    slot = seg.slot(3)
    activate_slot(slot)
    await ticks(w1, 2)
    protect = slot.protect_until
    FakeLive.instances[0].emit(AudioOut(tone(440, 3.0, 24000).tobytes()))
    seq = slot.request_hold()
    # w1 dies (SIGKILL: nothing released); a replacement attaches the same call
    w2 = make_worker(cfg, seg, tmp_path)
    await ticks(w2)
    assert w2.calls[3].playback.protect_until == protect > 0  # the greeting stays protected after a restart
    assert slot.hold_words() == (seq, 0)
    i = await paced(w2, slot, silence(0.6), until=lambda: slot.hold_words()[1] == seq)
    assert 0 < i and slot.counters.get("pauses_released") == 1


async def test_session_that_ends_itself_is_reopened_with_the_open_turn(cfg, seg, tmp_path, speech) -> None:
    w = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path),
                 journal_dir=tmp_path)
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w, 2)
    live1 = FakeLive.instances[0]
    pcm = np.concatenate([silence(0.2), speech, silence(0.8)])
    fr = frames(pcm)
    half = len(fr) // 2
    for f in fr[:half]:
        slot.uplink.write(f)
        await ticks(w)
    live1.state = "closed"
    live1.emit(StateChanged("closed", "garbage from the server"))
    await asyncio.sleep(0.55)
    for f in fr[half:]:
        slot.uplink.write(f)
        await ticks(w)
    assert len(FakeLive.instances) == 2
    live2 = FakeLive.instances[1]
    assert live2.log[0] == "start" and live2.log[-1] == "end"
    corr, _ = best_correlation(speech[: len(speech) // 3], np.frombuffer(bytes(live2.sent), np.int16), 16000)
    assert corr > 0.99  # the beginning of the utterance was replayed into the new session


async def test_live_constructor_failure_degrades_then_recovers(cfg, seg, tmp_path) -> None:
    FakeLive.fail_init = True
    w = make_worker(cfg, seg, tmp_path)
    await w.prepare()
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w, 2)
    assert slot.model_state == "degraded" and 0 in w.calls
    FakeLive.fail_init = False
    await asyncio.sleep(0.55)
    await ticks(w, 2)
    assert slot.model_state == "live"


async def test_dtmf_events_are_consumed_and_interrupted_flushes(cfg, seg, tmp_path) -> None:
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w, 2)
    for digit in (1, 2, 11):
        assert slot.push_event(EventCode.DTMF, digit)
    await ticks(w, 5)
    assert w.calls[0].caller.dtmf == "12#" and slot.pop_events() == []
    live = FakeLive.instances[0]
    # "#" ends the entry: one turn of its own carrying the digits as text
    assert live.log == ["start", f"text:{dtmf_text('12#')}", "end"]
    assert slot.counters.get("dtmf_sent") == 3
    live.emit(AudioOut(tone(440, 1.0, 24000).tobytes()))
    epoch = slot.downlink.flush_epoch
    live.emit(Interrupted())  # the model stopped on its own: what is queued must not play
    assert slot.downlink.flush_epoch == epoch + 1 and slot.downlink.available() == 0


async def test_calls_attached_during_warm_up_are_journaled_then_replayed(cfg, seg, tmp_path, speech) -> None:
    w = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path),
                 journal_dir=tmp_path)
    w._live_ready = False  # as while the SDK import still runs in its thread
    slot = seg.slot(0)
    activate_slot(slot)
    pcm = np.concatenate([silence(0.2), speech, silence(0.8)])
    fr = frames(pcm)
    half = len(fr) // 2
    for f in fr[:half]:
        slot.uplink.write(f)
        await ticks(w)
    assert FakeLive.instances == [] and slot.model_state == "connecting"
    assert w.calls[0].caller.sending  # the caller's turn is open and journaled
    w._live_ready = True
    for f in fr[half:]:
        slot.uplink.write(f)
        await ticks(w)
    live = FakeLive.instances[0]
    assert live.log == ["start", "audio", "end"]
    corr, _ = best_correlation(speech, np.frombuffer(bytes(live.sent), np.int16), 16000)
    assert corr > 0.99


def test_tick_locks_onto_the_media_workers_grid(cfg, seg, tmp_path) -> None:
    """The AI tick is scheduled 2 ms after the media worker's beat (the end of its tick) on a 20 ms grid,
    moving at most half a tick; a stale or missing beat leaves the free-running schedule alone."""
    from shm.audio import TICK_SECONDS
    from workers.ai.clock import MEDIA_PHASE_SECONDS, phase_locked

    assert phase_locked(seg, 123.456, 123.44) == 123.456  # the media worker never beat
    seg.heartbeat("media")
    beat = seg.heartbeat_ns("media") / 1e9
    for off in (0.0, 0.004, 0.011, 0.0199, 0.031):
        got = phase_locked(seg, beat + off, beat)
        phase = (got - beat - MEDIA_PHASE_SECONDS) / TICK_SECONDS
        assert abs(phase - round(phase)) < 1e-6, (off, got - beat)
        assert abs(got - (beat + off)) <= TICK_SECONDS / 2 + 1e-9
    assert phase_locked(seg, beat + 0.5, beat + 0.2) == beat + 0.5  # beat 200 ms old: free-running


async def test_dtmf_while_the_caller_talks_joins_the_open_turn(cfg, seg, tmp_path, speech) -> None:
    cfg = replace(cfg, model={"dtmf_flush_ms": 100})
    w = make_worker(cfg, seg, tmp_path)
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w, 2)
    live = FakeLive.instances[0]
    half = len(speech) // 2
    await feed(w, slot, np.concatenate([silence(0.3), speech[:half]]))
    assert w.calls[0].caller.sending and live.log == ["start", "audio"]
    assert slot.push_event(EventCode.DTMF, 5) and slot.push_event(EventCode.DTMF_END, 120)
    await ticks(w, 5)
    assert live.log == ["start", "audio"]  # no "#": the entry waits for dtmf_flush_ms
    await asyncio.sleep(0.12)
    await ticks(w, 5)
    await feed(w, slot, np.concatenate([speech[half:], silence(0.8)]))
    # the digit went into the caller's turn: no extra turn, nothing sent outside it
    assert live.log == ["start", "audio", f"text:{dtmf_text('5')}", "audio", "end"]
    assert w.stats.activity_starts == 1 and w.stats.activity_ends == 1


async def test_keypad_entry_is_journaled_and_replayed_by_a_replacement_worker(cfg, seg, tmp_path) -> None:
    w1 = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path),
                  journal_dir=tmp_path)
    slot = seg.slot(0)
    activate_slot(slot)
    await ticks(w1, 2)
    for code in (4, 2, 11):
        assert slot.push_event(EventCode.DTMF, code)
    await ticks(w1, 5)
    entry = f"text:{dtmf_text('42#')}"
    assert FakeLive.instances[0].log == ["start", entry, "end"]
    # w1 is SIGKILLed before the model answered (no handle): its replacement replays the entry
    w2 = AiWorker(cfg, seg, live_factory=FakeLive, prompts=PromptCache(tmp_path),
                  journal_dir=tmp_path)
    await ticks(w2, 2)
    assert FakeLive.instances[1].log == ["start", entry, "end"]
    await w2.shutdown()
