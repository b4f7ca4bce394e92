"""Turn-taking: onset/offset timing on real speech through the real VAD, hysteresis, barge-in, pre-roll."""

from __future__ import annotations

import numpy as np

from tests.ai.audio import frames, silence
from workers.ai.turns import Decision, PreRoll, TurnDetector, TurnParams
from workers.ai.vad import WINDOW, BatchedVad, WindowBuffer, rms_dbfs


def quiet_tail(chunk: np.ndarray, gate_db: float) -> int:
    """Like AiWorker._quiet_tail: trailing samples of the window below the gate, in 64-sample blocks."""
    x = chunk.astype(np.float64).reshape(8, 64)
    loud = np.flatnonzero((x * x).mean(axis=1) >= (10 ** (gate_db / 10)) * 32768.0**2)
    return 512 if loud.size == 0 else (7 - int(loud[-1])) * 64


def decisions(pcm: np.ndarray, params: TurnParams, gate_db: float = -55.0) -> list:
    vad = BatchedVad(energy_gate_dbfs=gate_db)
    det = TurnDetector(params)
    wb = WindowBuffer()
    out = []
    for f in frames(pcm):
        wb.push(f)
        while wb.has_window():
            chunk, end = wb.pop_window()
            ev = det.feed(float(vad.process([("k", chunk)])[0]), end, quiet_tail=quiet_tail(chunk, gate_db))
            if ev:
                out.append(ev)
        if rms_dbfs(wb.remainder()) < gate_db:
            ev = det.silent_until(wb.position)
            if ev:
                out.append(ev)
    return out


def test_two_utterances_start_and_end_on_time(speech: np.ndarray) -> None:
    params = TurnParams(hangover_ms=400, min_speech_ms=96)
    sig = np.concatenate([silence(1.0), speech, silence(1.5), speech, silence(1.0)])
    evs = decisions(sig, params)
    assert [e.decision for e in evs] == [Decision.ACTIVITY_START, Decision.ACTIVITY_END] * 2
    s1, e1 = 16000, 16000 + len(speech)
    s2 = e1 + 24000
    e2 = s2 + len(speech)
    for ev, s in ((evs[0], s1), (evs[2], s2)):
        # confirmed within min_speech + Silero's ~2-window rise + one window of alignment
        assert s < ev.sample <= s + 96 * 16 + 4 * WINDOW
        assert s - WINDOW <= ev.onset <= s + 3 * WINDOW
    hang = 400 * 16
    for ev, e in ((evs[1], e1), (evs[3], e2)):
        # the end is placed at the last audible sample (4 ms blocks), so activity_end comes at most one
        # 20 ms frame (+ one block) after hangover; earlier only if Silero calls the trailing sound noise
        assert e + hang - 3 * WINDOW <= ev.sample <= e + hang + 24 * 16, (ev.sample - e - hang) / 16


def test_pauses_shorter_than_hangover_do_not_end_the_turn(speech: np.ndarray) -> None:
    sig = np.concatenate([silence(0.5), speech, silence(0.25), speech, silence(1.0)])
    evs = decisions(sig, TurnParams(hangover_ms=400))
    assert [e.decision for e in evs] == [Decision.ACTIVITY_START, Decision.ACTIVITY_END]


def test_min_speech_filters_blips_but_barge_in_is_fast() -> None:
    p = TurnParams(min_speech_ms=96, barge_in_ms=32, hangover_ms=64)
    det = TurnDetector(p)
    # two speech windows, then silence: shorter than min_speech → no turn
    assert det.feed(0.9, 512) is None and det.feed(0.9, 1024) is None
    assert det.feed(0.1, 1536) is None and not det.speaking
    # third consecutive window confirms
    for i, end in enumerate((2048, 2560, 3072)):
        ev = det.feed(0.9, end)
        assert (ev is None) == (i < 2)
    assert ev is not None and ev.decision is Decision.ACTIVITY_START and ev.onset == 1536
    assert not ev.barge_in
    # between neg_threshold and threshold: neither speech nor silence
    assert det.feed(0.4, 3584) is None and det.speaking
    assert det.feed(0.1, 4096) is None  # silence from 3584
    ev = det.feed(0.1, 4608)  # 1024 samples = 64 ms of silence
    assert ev is not None and ev.decision is Decision.ACTIVITY_END
    # while the model plays, one window of speech is a barge-in start
    ev = det.feed(0.95, 5120, playing=True)
    assert ev is not None and ev.barge_in and ev.onset == 4608


def test_silent_tail_ends_turn_before_next_window() -> None:
    det = TurnDetector(TurnParams(min_speech_ms=32, hangover_ms=100))
    assert det.feed(0.9, 512).decision is Decision.ACTIVITY_START
    assert det.feed(0.0, 1024) is None  # silence from 512
    assert det.silent_until(512 + 1599) is None
    ev = det.silent_until(512 + 1600)
    assert ev is not None and ev.decision is Decision.ACTIVITY_END and ev.sample == 2112
    assert det.force_end(3000) is None


def test_preroll_returns_audio_from_onset() -> None:
    pre = PreRoll(keep_ms=100)  # 1600 samples
    pos = 0
    for i in range(20):
        pos += 320
        pre.push(np.full(320, i, np.int16).tobytes(), pos)
    held = np.frombuffer(pre.since(0), np.int16)
    assert len(held) == 1600 and held[0] == 15 and held[-1] == 19
    tail = np.frombuffer(pre.since(pos - 400), np.int16)
    assert len(tail) == 400 and tail[0] == 18
