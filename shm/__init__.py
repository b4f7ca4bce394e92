"""Shared-memory segment per shard: slot table and lock-free SPSC audio rings.

Public API: ``shm.segment`` (``ShardSegment``, ``Slot``, ``SlotState``, ``SlotInfo``, ``ShmError``,
``segment_name``, ``cleanup_stale``, ``ring_bytes``, ``local_rtp_port``) and ``shm.ring.Ring``.
See docs/architecture.md for who writes what.
"""
