"""The AI worker's tick schedule: locked to the media worker's 20 ms grid, 2 ms behind its beat.

Why: the AI tick runs ``MEDIA_PHASE_SECONDS`` after the media worker's tick ends (its heartbeat), so the
uplink frames of that tick are all in the rings and the VAD sees a caller frame within ~2 ms instead of
0-20 ms later (a free-running tick has a random phase per worker start, which shifted turn-end and
barge-in by up to a tick between runs). The media beat is the end of its tick, so any per-tick work
already happened.
"""

from __future__ import annotations

from shm.audio import TICK_SECONDS
from shm.segment import ShardSegment, ShmError

MEDIA_PHASE_SECONDS = 0.002
MEDIA_BEAT_FRESH_SECONDS = 0.1  # older beat: the media worker is down or stalled; tick free-running


def phase_locked(seg: ShardSegment, nominal: float, now: float) -> float:
    """The tick time on the media worker's grid (+ ``MEDIA_PHASE_SECONDS``) nearest ``nominal``.

    Moves the schedule by at most half a tick per tick, so a media worker restart (new phase) or a late
    media beat only nudges it; without a fresh beat the nominal time stands.
    """
    try:
        beat_ns = seg.heartbeat_ns("media")
    except ShmError:
        return nominal
    beat = beat_ns / 1e9
    if not beat_ns or now - beat > MEDIA_BEAT_FRESH_SECONDS:
        return nominal
    base = beat + MEDIA_PHASE_SECONDS
    return base + round((nominal - base) / TICK_SECONDS) * TICK_SECONDS
