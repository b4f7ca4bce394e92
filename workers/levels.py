"""Audio level thresholds shared by both workers.

Level checks on the hot paths (the AI worker's energy gate and quiet tail, the VAD's gate, the media
worker's playback pause) compare the mean square of int16 samples with a threshold instead of taking a
log per frame; this converts the configured dBFS once.
"""

from __future__ import annotations

import math

FULL_SCALE_MEAN_SQUARE = 32768.0 * 32768.0  # mean square of int16 samples at 0 dBFS


def mean_square_of_dbfs(dbfs: float) -> float:
    """The mean square of int16 samples at ``dbfs`` (0.0 for -inf: every frame is above it)."""
    return 0.0 if dbfs == -math.inf else 10.0 ** (dbfs / 10.0) * FULL_SCALE_MEAN_SQUARE
