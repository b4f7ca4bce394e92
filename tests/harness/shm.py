"""Shared-memory segments for tests: a unique instance id per use, always unlinked afterwards.

    with shard_segment(slots=4) as seg:          # supervisor side (creates)
        gen = activate_slot(seg.slot(0))         # a plausible direct-mode session
        worker = ShardSegment.attach(seg.name)   # what a worker process would do
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from shm.segment import ShardSegment, Slot, cleanup_stale, segment_name


def unique_instance_id(prefix: str = "t") -> str:
    """An instance id no other test run on this machine uses."""
    return f"{prefix}{os.getpid()}x{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def shard_segment(*, slots: int = 4, uplink_bytes: int = 64000, downlink_bytes: int = 384000,
                  shard: int = 0, instance_id: str | None = None) -> Iterator[ShardSegment]:
    """Create a fresh segment; on exit close it and unlink every segment of its instance."""
    iid = instance_id or unique_instance_id()
    seg = ShardSegment.create(segment_name(iid, shard), slots=slots, uplink_bytes=uplink_bytes,
                              downlink_bytes=downlink_bytes, instance_id=iid)
    try:
        yield seg
    finally:
        seg.close()
        cleanup_stale(iid)


def activate_slot(slot: Slot, **overrides: Any) -> int:
    """Activate ``slot`` with plausible direct-mode defaults; returns the generation."""
    kw: dict[str, Any] = {
        "session_id": f"sess-{uuid.uuid4().hex[:12]}",
        "local_rtp_port": 40000 + 2 * slot.index,
        "remote_rtp_ip": "127.0.0.1",
        "remote_rtp_port": 20000 + 2 * slot.index,
        "payload_type": 111,
        "channels": 2,
        "dtmf_payload_type": 101,
        "mode": "direct",
        "options": {"voice": "Puck", "language": "en-US"},
    }
    kw.update(overrides)
    return slot.activate(**kw)
