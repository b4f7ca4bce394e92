"""Early double-talk detection for the playback pause: caller energy above the echo we predict from the
far-end reference we hold (docs/architecture.md "Barge-in").

Why: with ``aec_ns_agc`` the pause looked at AEC3's output, and AEC3's suppressor damps the caller's first
40-160 ms by ~40 dB while the model talks (it takes the onset of double-talk for echo), so a real
barge-in paused 73 ms (p50) / 173 ms (p99) after its onset. The raw microphone has the onset at once;
what it also has is the model's echo, at the far-end level minus the echo return loss (ERL). So this
gate predicts the echo's *level* (not its waveform) per 10 ms: ``ERL x`` the loudest far-end 10 ms in a
short window around the echo delay, and reports how much the microphone exceeds that bound. The media
worker pauses when the excess alone is above its pause threshold (or when AEC's output is, as before).

Both parameters are learned per call, from the call itself:
- **delay**: normalised cross-correlation of the log energy envelopes (10 ms) of the microphone and of
  the far end at lags 0..``MAX_LAG`` (640 ms), exponentially averaged over halves AEC3 called echo;
  a new lag replaces the current one only when clearly better (hysteresis: the envelope of speech is
  periodic, and a jumping delay would move the window off the echo);
- **ERL**: a peak tracker of microphone / far-window energy on those halves: it decays slowly (the
  bound tightens until echo peaks hold it), rises at once to a new peak within ``OUTLIER`` of it, and
  only creeps up (+``CREEP_DB`` per half) for larger ratios AEC3 still calls echo — a caller's onset
  (AEC3 calls it echo too) must not teach the gate that the caller is echo.
Until the first delay is found the window is the whole history and the ERL starts at 0 dB: the gate is
inert (the pause behaves as before) for the first seconds of model speech.

Cost: a handful of numpy calls on 64-element vectors per 20 ms frame (measured in ``bench quality``'s
``dsp_cpu_ms_per_call_second``); it runs only in the ``aec_ns_agc`` mode, where the far end is there.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

HALF = 160  # 10 ms at 16 kHz
MAX_LAG = 64  # halves of far-end history: 640 ms of echo path (network + playout + room + jitter buffer)
WIN_BEFORE = 1  # the echo window: the delay -1 .. +3 halves (reverberation and codec smear come after)
WIN_AFTER = 3
EMA = 0.01  # delay statistics: ~2 s of echo frames (one sample per 20 ms frame)
DELAY_EVERY = 5  # frames between delay decisions (the argmax is the costly part)
DELAY_MIN_RHO = 0.4
DELAY_SWITCH = 0.05  # a new lag must correlate this much better than the current one
FLOOR = 32768.0 ** 2 * 1e-7  # -70 dBFS mean square: the log envelopes' floor (digital silence)
FAR_ACTIVE = 32768.0 ** 2 * 10 ** (-50 / 10)  # far window this loud: its echo can matter
MIC_LEARN = 32768.0 ** 2 * 10 ** (-60 / 10)  # quieter microphone halves say nothing about the ERL
ERL_WINDOW = 150  # halves (1.5 s of audible echo) per window of the ERL's minimum statistics
ERL_WINDOWS = 8  # ... the ERL is the smallest window maximum of the last 8 (12 s of model speech)
MARGIN = 10 ** (3 / 10)  # the bound used for detection: 3 dB over the tracked ERL x far window


class EchoGate:
    """One call's echo-level predictor; feed every uplink frame with its paired far-end frame."""

    def __init__(self) -> None:
        self._far = np.full(MAX_LAG, 0.0)  # far-end half energies, newest first (index = lag in halves)
        self._lf = np.full(MAX_LAG, np.log(FLOOR))
        self._c = np.zeros(MAX_LAG)  # EMA of centred log-envelope products per lag
        self._vf = np.full(MAX_LAG, 1e-6)
        self._vm = 1e-6
        self._mm = float(np.log(FLOOR))
        self._mf = float(np.log(FLOOR))
        self.delay: int | None = None
        self.erl = 1.0  # echo return loss as an energy ratio (0 dB: inert until learned)
        self._maxes: deque[float] = deque(maxlen=ERL_WINDOWS)
        self._win_max = 0.0
        self._win_n = 0
        self._frames = 0
        self.excess = 0.0  # the last frame's largest half: microphone energy above the echo bound

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def process(self, mic: np.ndarray, far: np.ndarray | None, echo_like: bool) -> float:
        """Mean-square excess of the louder 10 ms half of ``mic`` over the predicted echo (int16 arrays,
        320 samples each; ``far`` None: silence went out). ``echo_like``: AEC3 reduced this frame
        strongly (the learning label)."""
        m = mic.astype(np.float64)
        m0, m1 = m[:HALF], m[HALF:]
        em = (float(np.dot(m0, m0)) / HALF, float(np.dot(m1, m1)) / HALF)
        if far is None:
            ef = (0.0, 0.0)
        else:
            f = far.astype(np.float64)
            f0, f1 = f[:HALF], f[HALF:]
            ef = (float(np.dot(f0, f0)) / HALF, float(np.dot(f1, f1)) / HALF)
        hist, lf = self._far, self._lf
        hist[2:] = hist[:-2]  # newest first: index 0 = this frame's second half, 1 = its first
        hist[0], hist[1] = ef[1], ef[0]
        lf[2:] = lf[:-2]
        lf[0], lf[1] = math.log(max(ef[1], FLOOR)), math.log(max(ef[0], FLOOR))
        d = self.delay
        best = 0.0
        for k, lag0 in ((0, 1), (1, 0)):  # half k of the frame sees the history from index lag0 on
            if d is None:
                fwin = float(hist[lag0:].max())
            else:
                lo = lag0 + max(d - WIN_BEFORE, 0)
                fwin = float(hist[lo: lag0 + d + WIN_AFTER + 1].max()) if lo < MAX_LAG else 0.0
            best = max(best, em[k] - MARGIN * self.erl * fwin)
            if echo_like and fwin >= FAR_ACTIVE and d is not None and em[k] >= MIC_LEARN:
                self._erl_sample(em[k] / fwin)
        if echo_like and float(hist[: MAX_LAG // 2].max()) >= FAR_ACTIVE:
            self._learn_delay(em[1])
        self.excess = best
        return best

    def _learn_delay(self, em: float) -> None:
        """One frame of the delay statistics (its newer half against the far history at each lag)."""
        lm = math.log(max(em, FLOOR))
        a = EMA
        self._mm += a * (lm - self._mm)
        self._mf += a * (float(self._lf.mean()) - self._mf)
        cm = lm - self._mm
        cf = self._lf - self._mf
        self._c += a * (cm * cf - self._c)
        self._vf += a * (cf * cf - self._vf)
        self._vm += a * (cm * cm - self._vm)
        self._frames += 1
        if self._frames % DELAY_EVERY:
            return
        rho = self._c / np.sqrt(self._vf * self._vm)
        lag = int(np.argmax(rho))
        if rho[lag] >= DELAY_MIN_RHO and (self.delay is None or rho[lag] > rho[self.delay] + DELAY_SWITCH):
            self.delay = lag

    def _erl_sample(self, ratio: float) -> None:
        """Minimum statistics: the ERL is the smallest per-window maximum of microphone / far window."""
        if ratio > self._win_max:
            self._win_max = ratio
        self._win_n += 1
        if self._win_n >= ERL_WINDOW:
            self._maxes.append(self._win_max)
            self.erl = min(min(self._maxes), 1.0)
            self._win_n, self._win_max = 0, 0.0
