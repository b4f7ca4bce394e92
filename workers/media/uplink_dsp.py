"""Server-side uplink processing of one call: off, noise suppression, or echo cancellation + NS + AGC.

Order (the seed's audio chapter): high-pass → AEC → noise suppression → AGC, on the decoded 16 kHz
caller audio before it reaches the uplink ring — so the AI worker's VAD, the model and the media
worker's own playback pause (:mod:`workers.media.worker`) all see the processed signal.

Why WebRTC's audio processing module through ``pywebrtc-audio`` (PyPI, Apache-2.0, x86-64 and aarch64
wheels, the GIL released inside) and not RNNoise (``pyrnnoise``): measured on this 2-core box, CPU per
call-second at 16 kHz in 20 ms calls — ``NoiseSuppressor`` 0.9-1.0 ms; RNNoise 41 ms (48 kHz only, so
two resamplers, and a per-frame Python wrapper): the WebRTC NS is ~40x cheaper, and only WebRTC has
an echo canceller (AEC3) at all. On the quality bench NS is transparent on clean speech (PESQ-WB 4.247
vs 4.243 off) and gains +6.7 dB model-input SNR on babble/café noise at 10 dB SNR. Hand-written DSP
would be neither cheaper nor as well tested (Chrome runs this code).

Modes (``media.uplink_processing``, overridable per call by the slot option ``uplink_processing``):
- ``off``: nothing (the bytes the decoder produced).
- ``ns``: WebRTC NS at level 1 (12 dB) — the default: ~1 ms per call-second fits the ≤ 12 ms budget
  next to today's ~8.6 ms pipeline.
- ``aec_ns_agc``: AEC3 → NS → AGC2 (separate stages, so the pause can look between NS and AGC; the
  high-pass is part of AEC3). 12 ms per call-second while the model talks, ~9 ms in a realistic call
  (the canceller idles 1 s after the model stops): as much again as the whole pipeline, so a per-call
  option (speakerphone or kiosk tenants) — it is what removes the echo's false pauses (532 → 0 per
  100 turns with echo at -20 dB; docs/benchmarks.md "Audio quality").

AEC's far-end reference is the exact downlink audio this worker sent to the caller in each tick
(:meth:`UplinkDsp.far_frame`: the 24 kHz frame that was encoded — model audio, or zeros for the
cached silence packet — resampled to 16 kHz), paired tick by tick with the uplink frame of the next
tick: the worker's own timeline is exact, and the rest of the echo path (network, the browser's
jitter buffer and playout, the room, our jitter buffer) is a delay that AEC3's delay estimator finds;
``stream_delay_ms`` seeds it with the part we know (our jitter buffer's target plus one tick).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np
import soxr

from workers.media.echo_gate import EchoGate

log = logging.getLogger("media.uplink_dsp")

MODES = ("off", "ns", "aec_ns_agc")
UP_RATE = 16000
DOWN_RATE = 24000
FAR_QUEUE_MAX = 2  # downlink frames waiting to be paired with an uplink frame (normally 1)
AEC_WARM_TICKS = 2
AEC_TAIL_TICKS = 50  # 1 s: the echo path (network + playout + room + our jitter buffer) is ≤ ~500 ms
ECHO_DOMINANT_DB = 10.0
ECHO_DOMINANT_RATIO = 10 ** (ECHO_DOMINANT_DB / 10)
AGC_MAX_GAIN_DB = 30.0


def session_mode(options: dict[str, Any], default: str, session_id: str = "") -> str:
    """The call's mode: its slot option ``uplink_processing`` when valid, else ``default`` (config)."""
    mode = options.get("uplink_processing", default) if isinstance(options, dict) else default
    if mode not in MODES:
        log.warning("unknown uplink_processing option: using the configured default",
                    extra={"session": session_id, "option": str(mode)[:32], "default": default})
        return default
    return mode


class UplinkDsp:
    """The processing chain of one call (one instance per session, single-threaded)."""

    def __init__(self, mode: str, *, ns_level: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"uplink processing must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._ns = None
        self._ec = None
        self._gc = None
        self.echo_dominated = False  # the last frame was mostly echo (double-talk detector, see process)
        self.pause_frame = b""  # what the playback pause checks: after AEC and NS, before AGC
        self.near_excess = 0.0  # mean square of the raw microphone above the predicted echo (EchoGate)
        self._gate: EchoGate | None = None
        self._far_active_ticks = 0  # ticks left in which the echo of sent model audio can still arrive
        self._warm_ticks = 0  # canceller restarted after a pause: its first frames are not used
        self._far: deque[np.ndarray] = deque()
        self._silence = np.zeros(UP_RATE // 50, np.int16)
        self._down = None
        if mode in ("ns", "aec_ns_agc"):
            from pywebrtc_audio import NoiseSuppressor

            self._ns = NoiseSuppressor(UP_RATE, 1, ns_level)
        if mode == "aec_ns_agc":
            from pywebrtc_audio import EchoCanceller, GainController

            self._ec = EchoCanceller(UP_RATE, 1)
            self._gc = GainController(UP_RATE, 1, max_gain_db=AGC_MAX_GAIN_DB)
            self._gate = EchoGate()
            # QQ: exactly one 16 kHz frame out per 24 kHz frame in (FACTS: HQ releases in bursts)
            self._down = soxr.ResampleStream(DOWN_RATE, UP_RATE, 1, dtype="int16", quality="QQ")

    @property
    def wants_far(self) -> bool:
        return self._ec is not None

    def set_delay_hint(self, ms: int) -> None:
        if self._ec is not None:
            self._ec.stream_delay_ms = max(0, int(ms))

    def far_frame(self, frame24: bytes | None) -> None:
        """The downlink frame sent this tick (None: the cached silence packet went out)."""
        if self._down is None:
            return
        x = self._silence24 if frame24 is None else np.frombuffer(frame24, "<i2")
        if frame24 is not None:
            if self._far_active_ticks == 0:
                self._warm_ticks = AEC_WARM_TICKS
            self._far_active_ticks = AEC_TAIL_TICKS
        y = self._down.resample_chunk(x)
        n = UP_RATE // 50
        if len(y) != n:  # QQ gives one frame per frame; be exact anyway
            y = np.resize(y, n) if len(y) else self._silence
        self._far.append(y)
        while len(self._far) > FAR_QUEUE_MAX:
            self._far.popleft()

    _silence24 = np.zeros(DOWN_RATE // 50, np.int16)

    def process(self, frame16: bytes) -> bytes:
        """One 20 ms uplink frame (int16 LE, 16 kHz) processed per the mode.

        With AEC: the canceller runs only while the echo of sent model audio can still arrive
        (``AEC_TAIL_TICKS`` after the last model frame; its cost is ~6 of the ~9 ms per call-second),
        and a frame it reduced by at least ``ECHO_DOMINANT_DB`` is flagged ``echo_dominated``: what
        was there was mostly the model's own voice, so the playback pause ignores it even if the
        residual (which AGC may lift) is loud. Caller speech over the echo loses only the echo's part.
        AEC3 also damps the first 40-160 ms of caller speech over the model, so ``near_excess`` says how
        far the *raw* microphone is above the echo level predicted from the far end
        (:mod:`workers.media.echo_gate`): the pause's early signal.
        """
        if self.mode == "off":
            self.pause_frame = frame16
            return frame16
        x = np.frombuffer(frame16, "<i2")
        far = self._far.popleft() if self._far else None
        if self._ec is not None:
            if self._far_active_ticks > 0:
                self._far_active_ticks -= 1
                y = self._ec.process(x, self._silence if far is None else far)
                if self._warm_ticks:
                    # restarted after idling: its first output carries a start-up transient (its
                    # high-pass state is a second old); these frames precede any echo of the new audio
                    self._warm_ticks -= 1
                    y = x
                xf, yf = x.astype(np.float32), y.astype(np.float32)
                e_in, e_out = float(np.dot(xf, xf)), float(np.dot(yf, yf))
                self.echo_dominated = e_out * ECHO_DOMINANT_RATIO < e_in
                if self._gate is not None:  # AEC3 damps a barge-in's onset: look at the raw microphone too
                    self.near_excess = self._gate.process(x, far, self.echo_dominated)
                x = y
            else:
                self.echo_dominated = False
                self.near_excess = 0.0
        assert self._ns is not None
        x = self._ns.process(x)
        if self._gc is None:
            out = x.tobytes()
            self.pause_frame = out
            return out
        # AGC lifts whatever it takes for speech — babble included — towards its target: good for the
        # model, bad for a level threshold, so the pause looks at the signal before it
        self.pause_frame = x.tobytes()
        return self._gc.process(x).tobytes()

    def skip(self) -> None:
        """No caller frame this tick (the stream paused): keep the far-end reference in step."""
        if self._far:
            self._far.popleft()

    def reset(self) -> None:
        """The caller's stream restarted (new SSRC): drop noise/echo estimates of the old one."""
        if self._ns is not None:
            self._ns.reset()
        for part in (self._ec, self._gc):
            if part is not None:
                part.reset()
        self._far.clear()
        self.echo_dominated = False
        self.near_excess = 0.0
        if self._gate is not None:
            self._gate.reset()
