"""The audio contract between the media worker, the rings and the AI worker (one owner for these facts).

Uplink: PCM16 LE mono at 16 kHz (what Gemini Live takes), downlink: PCM16 LE mono at 24 kHz (what it
sends); both workers tick every 20 ms and move whole 20 ms frames through the rings. Keypad digits
cross the slot's event queue as RFC 4733 event codes (0-15), the index into ``DTMF_EVENTS``.
"""

from __future__ import annotations

UP_RATE = 16000  # Hz, caller → model
DOWN_RATE = 24000  # Hz, model → caller
SAMPLE_BYTES = 2  # PCM16
TICK_MS = 20
TICK_SECONDS = TICK_MS / 1000
TICK_NS = TICK_MS * 1_000_000
UP_FRAME = UP_RATE * TICK_MS // 1000 * SAMPLE_BYTES  # 640 bytes
DOWN_FRAME = DOWN_RATE * TICK_MS // 1000 * SAMPLE_BYTES  # 960 bytes
UP_BYTES_PER_MS = UP_RATE // 1000 * SAMPLE_BYTES  # 32
DOWN_BYTES_PER_MS = DOWN_RATE // 1000 * SAMPLE_BYTES  # 48
UP_BYTES_PER_SECOND = UP_RATE * SAMPLE_BYTES
DOWN_BYTES_PER_SECOND = DOWN_RATE * SAMPLE_BYTES
DTMF_EVENTS = "0123456789*#ABCD"  # RFC 4733 event codes 0-15


def ring_bytes(uplink_ring_ms: int, downlink_ring_ms: int) -> tuple[int, int]:
    """Ring sizes in bytes for ``shards.uplink_ring_ms`` / ``downlink_ring_ms``."""
    return uplink_ring_ms * UP_BYTES_PER_MS, downlink_ring_ms * DOWN_BYTES_PER_MS
