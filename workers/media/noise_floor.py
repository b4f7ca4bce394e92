"""The caller's room level, for the playback pause: a frame must stand out of it, not only be loud.

Why: café babble 10 dB below a normal caller is itself above ``media.pause_on_speech_dbfs`` (-40 dBFS),
and no uplink mode removes it (NS does not remove speech-like noise), so every babble syllable paused
the model (`bench quality`: 650-740 false pauses per 100 turns). Speech that addresses the assistant
is close to the microphone: its 10 ms peaks stand far above the room's *floor*, while babble's
syllables rise only a few dB above the babble's own floor (many voices summed are rarely quiet).
So a pause also needs the raw (decoded, unprocessed) 10 ms level ``STAND_OUT_DB`` above the floor.

The floor is the ~20th percentile of the raw 10 ms levels, tracked by a stochastic quantile estimator
in the log domain (up ``UP_DB`` per half above it, down ``4 x UP_DB`` below: the fixed point has 80 %
of the halves above), so it costs a comparison and an addition per 10 ms, follows a room in ~1-2 s and
ignores the caller's own pauses. A quiet room's floor is at the codec's noise (-70 dBFS and below):
the rule then changes nothing.
"""

from __future__ import annotations

import math

UP_DB = 0.25
DOWN_DB = 4 * UP_DB  # 20th percentile: P(above) x UP = P(below) x DOWN
STAND_OUT_DB = 14.0
FLOOR_MIN_DB = -90.0  # relative to full scale (digital silence would drag the floor to -inf)
_FULL = 32768.0**2


class NoiseFloor:
    """One call's floor of raw 10 ms mean squares (int16 scale)."""

    __slots__ = ("_db",)

    def __init__(self) -> None:
        self._db = FLOOR_MIN_DB

    @property
    def floor_dbfs(self) -> float:
        return self._db

    def update(self, mean_square: float) -> None:
        db = 10.0 * math.log10(max(mean_square, 1e-12) / _FULL)
        self._db = max(self._db + UP_DB if db > self._db else self._db - DOWN_DB, FLOOR_MIN_DB)

    def stands_out(self, mean_square: float) -> bool:
        """``mean_square`` (one 10 ms half) is ``STAND_OUT_DB`` above the floor."""
        return mean_square >= _FULL * 10 ** ((self._db + STAND_OUT_DB) / 10)
