"""Fixtures for the shm tests: a fresh segment per test, unlinked afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shm.segment import ShardSegment
from tests.harness.shm import shard_segment


@pytest.fixture
def seg() -> Iterator[ShardSegment]:
    """A 4-slot segment with default ring sizes (uplink 64 KiB, downlink 512 KiB after rounding)."""
    with shard_segment(slots=4) as s:
        yield s


@pytest.fixture
def small_seg() -> Iterator[ShardSegment]:
    """A 2-slot segment with the smallest rings (4 KiB each) so wraparound happens quickly."""
    with shard_segment(slots=2, uplink_bytes=4096, downlink_bytes=4096) as s:
        yield s
