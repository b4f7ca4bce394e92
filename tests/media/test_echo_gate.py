"""The echo gate (workers/media/echo_gate.py) inside the real AEC chain (UplinkDsp "aec_ns_agc", AEC3):
model speech comes back at -20 dB through a small room 120 ms later; the gate learns the delay and the
echo return loss, never calls the echo the caller once it has, and sees a normal caller's onset over
the echo at once — while AEC3's own output, which the pause used before, is still damping it."""

from __future__ import annotations

import numpy as np
import soxr

from tests.harness.audio import speech
from workers.levels import mean_square_of_dbfs
from workers.media.uplink_dsp import UplinkDsp

RATE = 16000
F = 320
PAUSE = mean_square_of_dbfs(-40.0)  # media.pause_on_speech_dbfs's default


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return x * (32768 * 10 ** (dbfs / 20) / np.sqrt(np.mean(x[np.abs(x) > 300] ** 2)))


def _half_ms(x: np.ndarray) -> np.ndarray:
    h = x[: len(x) // 160 * 160].reshape(-1, 160)
    return (h * h).mean(axis=1)


def test_gate_learns_the_echo_and_sees_the_caller_onset_before_aec_output_does() -> None:
    model = speech("Tomorrow will be sunny with a light breeze from the west and mild temperatures. "
                   "Let me check the timetable for you, one moment please.", 24000).astype(np.float64)
    model = np.tile(_level(model, -20.0), 2)  # ~10 s of model speech at -20 dBFS
    far16 = soxr.resample(model, 24000, RATE)
    room = np.zeros(int(0.15 * RATE))
    room[int(0.12 * RATE)], room[int(0.12 * RATE) + 40], room[int(0.12 * RATE) + 130] = 1.0, 0.5, 0.25
    room /= np.sqrt((room**2).sum())
    echo = np.convolve(far16, room)[: len(far16)] * 10 ** (-20 / 20)
    talk = _level(speech("No wait, stop. Hold on a second.", RATE).astype(np.float64), -26.0)
    at = len(echo) - len(talk) - RATE // 2
    at -= at % F  # the caller starts on a frame boundary (the test's bookkeeping, not the gate's)
    caller = np.zeros(len(echo))
    caller[at: at + len(talk)] = talk
    near = (echo + caller).clip(-32768, 32767).astype(np.int16)
    dsp = UplinkDsp("aec_ns_agc")
    dsp.set_delay_hint(40)
    down = [model[i: i + 480].astype(np.int16).tobytes() for i in range(0, len(model) - 479, 480)]
    excess, aec_out = [], []
    for k in range(len(near) // F):
        dsp.process(near[k * F: (k + 1) * F].tobytes())
        excess.append(dsp.near_excess)
        aec_out.append(np.frombuffer(dsp.pause_frame, np.int16).astype(np.float64))
        if k < len(down):
            dsp.far_frame(down[k])
    gate = dsp._gate
    assert gate is not None
    # the delay (120 ms of room + the one tick the reference pairs late) and the ERL (-20 dB) are learned
    assert gate.delay is not None and 10 <= gate.delay <= 14, gate.delay
    assert -24 < 10 * np.log10(gate.erl) < -14, 10 * np.log10(gate.erl)
    # once learned (after 6 s of model speech), the echo alone never looks like the caller
    echo_frames = range(6 * RATE // F, at // F)
    assert len(echo_frames) > 50
    assert max(excess[k] for k in echo_frames) < PAUSE
    # the caller's onset: the first 10 ms within 15 dB of the caller's active level
    ms = _half_ms(talk)
    onset = at // F + int(np.argmax(ms >= mean_square_of_dbfs(-26.0 - 15.0))) // 2
    hit = next(k for k in range(at // F, len(excess)) if excess[k] >= PAUSE)
    assert hit <= onset + 1, (hit - onset)  # in the onset's frame or the next one: 20-40 ms
    # ... while AEC3's output (what the pause looked at alone) is still damped there
    damped = [10 * np.log10(max(_half_ms(aec_out[k]).max(), 1e-9) / 32768**2)
              for k in range(at // F, hit + 1)]
    assert max(damped) < -40, damped
