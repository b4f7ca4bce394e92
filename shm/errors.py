"""Exceptions of the shm package (kept apart so ring.py and segment.py share them without a cycle)."""

from __future__ import annotations


class ShmError(Exception):
    """A shared-memory problem; the message always names the segment (and slot/ring when relevant)."""


class RingClosedError(ShmError, RuntimeError):
    """The ring's segment was closed in this process; the ring object can no longer be used."""


class RingCorruptError(ShmError):
    """The ring's cursors are impossible (fill level above capacity): the shared memory was damaged."""
