"""Turn-taking from VAD probabilities: speech onset → activity_start, end of speech → activity_end.

Why our own turn-taking: the Live session runs with the model's automatic activity detection disabled
(FACTS: manual ``activityStart``/``activityEnd``), so the appliance decides when the caller's turn ends
and can send ``activityEnd`` the moment the hangover has passed instead of waiting for the server's own
silence timer. Everything here is counted in audio samples, not wall time, so it is deterministic and
testable, and the hangover is measured from the end of the last speech window.

The rules (Silero's own ``VADIterator`` hysteresis, made streaming and decision-oriented):
- onset: consecutive windows with p ≥ ``threshold`` adding up to ``min_speech_ms`` → ``activity_start``;
  while model audio is playing only ``barge_in_ms`` is needed (a caller talking over the model is an
  interruption: stop playback at once), and the start is then flagged ``barge_in``.
- end: while speaking, a window with p < ``threshold - 0.15`` opens a silence at the end of the last
  audible sample before it (energy, 4 ms resolution; at most the window start, so Silero's decay after
  a word and the 32 ms window grid do not delay the end); a window with p ≥ ``threshold`` closes it;
  once ``hangover_ms`` of silence has passed → ``activity_end`` (also when the still-unanalysed tail
  is known silent from the energy gate, so the end is not held back to the next 32 ms window boundary).
- :class:`PreRoll` keeps the last ``preroll_ms`` of audio before a confirmed onset so the first
  syllable reaches the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from workers.ai.vad import SAMPLE_RATE, WINDOW


class Decision(enum.Enum):
    ACTIVITY_START = "activity_start"
    ACTIVITY_END = "activity_end"


@dataclass(frozen=True)
class TurnEvent:
    """A turn decision at ``sample`` (position in the stream's timeline); ``onset`` = where speech began."""

    decision: Decision
    sample: int
    onset: int = 0
    barge_in: bool = False
    speech_end: int = 0  # ACTIVITY_END after the hangover: where the caller's speech ended (0: unknown)


@dataclass(frozen=True)
class TurnParams:
    """Turn-taking parameters (from ``[vad]`` in the config)."""

    threshold: float = 0.5
    hangover_ms: int = 400
    min_speech_ms: int = 96
    barge_in_ms: int = 32
    preroll_ms: int = 300

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01)

    def samples(self, ms: int) -> int:
        return ms * SAMPLE_RATE // 1000


class TurnDetector:
    """Streaming onset/offset decisions for one session, fed one VAD probability per 512-sample window."""

    __slots__ = ("_hangover", "_last_loud", "_min_barge", "_min_speech", "_p", "_run", "_run_start",
                 "_silence_start",
                 "speaking", "speech_start")

    def __init__(self, params: TurnParams) -> None:
        self._p = params
        self._min_speech = max(params.samples(params.min_speech_ms), 1)
        self._min_barge = max(params.samples(params.barge_in_ms), 1)
        self._hangover = params.samples(params.hangover_ms)
        self.speaking = False
        self.speech_start = 0  # onset sample of the current turn
        self._run = 0  # samples of consecutive speech windows (not speaking yet)
        self._run_start = 0
        self._silence_start: int | None = None
        self._last_loud = 0  # end of the last audible sample seen (energy), for a precise speech end

    def feed(self, prob: float, end: int, *, playing: bool = False, quiet_tail: int = 0) -> TurnEvent | None:
        """One window's probability; ``end`` = its end sample; ``quiet_tail`` = how many samples at the
        window's end are below the energy gate (lets the speech end be placed inside the window, and
        keeps Silero's slow decay after a word from delaying the end). Returns a decision or None."""
        p = self._p
        start = end - WINDOW
        last_loud = self._last_loud
        if quiet_tail < WINDOW:
            self._last_loud = end - quiet_tail
        if not self.speaking:
            if prob >= p.threshold:
                if self._run == 0:
                    self._run_start = start
                self._run += WINDOW
                need = self._min_barge if playing else self._min_speech
                if self._run >= need:
                    self.speaking = True
                    self.speech_start = self._run_start
                    self._run = 0
                    self._silence_start = None
                    return TurnEvent(Decision.ACTIVITY_START, end, self.speech_start, barge_in=playing)
            else:
                self._run = 0
            return None
        if prob >= p.threshold:
            self._silence_start = None
        elif prob < p.neg_threshold and self._silence_start is None:
            self._silence_start = max(min(start, last_loud), self.speech_start)
        return self._check_end(end)

    def silent_until(self, sample: int) -> TurnEvent | None:
        """Samples up to ``sample`` (not yet windowed) are known to be silent: end the turn if due."""
        if not self.speaking or self._silence_start is None:
            return None
        return self._check_end(sample)

    def _check_end(self, now: int) -> TurnEvent | None:
        if self._silence_start is not None and now - self._silence_start >= self._hangover:
            self.speaking = False
            end, self._silence_start = self._silence_start, None
            return TurnEvent(Decision.ACTIVITY_END, now, self.speech_start, speech_end=end)
        return None

    def resume_speaking(self, onset: int) -> None:
        """Continue a turn that a previous worker opened (replayed from its journal)."""
        self.speaking = True
        self.speech_start = onset
        self._run = 0
        self._silence_start = onset

    def force_end(self, sample: int) -> TurnEvent | None:
        """End an open turn now (session closing or model reconnect)."""
        if not self.speaking:
            self._run = 0
            return None
        self.speaking = False
        self._silence_start = None
        return TurnEvent(Decision.ACTIVITY_END, sample, self.speech_start)


class PreRoll:
    """The most recent audio of a stream, so a confirmed onset can send speech from before it was confirmed.

    Holds at most ``keep_ms`` of PCM16 16 kHz; ``since(sample)`` returns the held audio from that stream
    position on (clipped to what is held).
    """

    __slots__ = ("_buf", "_end", "_max")

    def __init__(self, keep_ms: int) -> None:
        self._max = keep_ms * SAMPLE_RATE // 1000 * 2
        self._buf = bytearray()
        self._end = 0  # stream position (samples) of the end of _buf

    def push(self, pcm: bytes, end: int) -> None:
        """Append audio that ends at stream position ``end``."""
        self._buf += pcm
        self._end = end
        extra = len(self._buf) - self._max
        if extra > 0:
            del self._buf[: extra + (extra & 1)]

    def since(self, sample: int) -> bytes:
        start = self._end - len(self._buf) // 2
        skip = max(sample - start, 0) * 2
        return bytes(self._buf[skip:])

    def clear(self) -> None:
        self._buf.clear()
