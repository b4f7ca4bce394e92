"""Admission and placement: which shard and slot a new session gets, and its RTP port.

Per-shard capacity is ``shards.slots``. A new session goes to the least-loaded shard that is up
(fewest sessions; ties → lowest shard number, so a lightly loaded box keeps its sessions together and
the other cores idle). A full box, or one that is draining, refuses with a ``retry_after`` hint the API
turns into ``503`` + ``Retry-After``.

Inside a shard, slots are handed out least-recently-freed first (a FIFO of free slots): a slot's RTP
port is deterministic (``media.rtp_port_min + 2 * (shard * slots + slot)``, see docs/architecture.md),
so reusing the slot that was just freed would put a new call on a port Janus may still be sending the
old call's last packets to. The slot's generation counter in shared memory guards the rest.

This is the supervisor's in-memory view; it is the source of truth for allocation (only the
supervisor writes slot states). Pure Python, no I/O, so it is unit-tested exhaustively.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from appliance.config import Config, ConfigError


class AdmissionRefused(Exception):
    """No capacity (or draining): the caller should retry after ``retry_after`` seconds, elsewhere."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class Placed:
    """Where an admitted session lives."""

    shard: int
    slot: int
    rtp_port: int


def rtp_port(rtp_port_min: int, slots_per_shard: int, shard: int, slot: int) -> int:
    """The media worker's RTP port for (shard, slot); RTCP is the next port."""
    return rtp_port_min + 2 * (shard * slots_per_shard + slot)


class Placement:
    """Per-shard slot allocation with least-loaded placement."""

    def __init__(
        self,
        shard_count: int,
        slots_per_shard: int,
        rtp_port_min: int,
        rtp_port_max: int,
        *,
        retry_after_full: int = 5,
        retry_after_draining: int = 30,
    ) -> None:
        if shard_count < 1 or slots_per_shard < 1:
            raise ConfigError("shards: need at least one shard with at least one slot")
        highest = rtp_port(rtp_port_min, slots_per_shard, shard_count - 1, slots_per_shard - 1) + 1
        if highest > rtp_port_max:
            raise ConfigError(
                f"media.rtp_port_max: {shard_count} shards x {slots_per_shard} slots need RTP/RTCP ports "
                f"{rtp_port_min}-{highest}, got max {rtp_port_max}"
            )
        self.shard_count = shard_count
        self.slots_per_shard = slots_per_shard
        self.rtp_port_min = rtp_port_min
        self.retry_after_full = retry_after_full
        self.retry_after_draining = retry_after_draining
        self.draining = False
        self._free: list[deque[int]] = [deque(range(slots_per_shard)) for _ in range(shard_count)]
        self._used: list[dict[int, str]] = [{} for _ in range(shard_count)]
        self._up = [True] * shard_count

    @classmethod
    def from_config(cls, cfg: Config, shard_count: int) -> Placement:
        return cls(shard_count, cfg.shards.slots, cfg.media.rtp_port_min, cfg.media.rtp_port_max)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Total slots on shards that are up."""
        return sum(self.slots_per_shard for k in range(self.shard_count) if self._up[k])

    @property
    def active(self) -> int:
        return sum(len(u) for u in self._used)

    def load(self, shard: int) -> int:
        return len(self._used[shard])

    def free_fraction(self) -> float:
        """Free share of the up shards' capacity, 0.0 to 1.0 (0 while draining)."""
        if self.draining or not self.capacity:
            return 0.0
        free = sum(len(self._free[k]) for k in range(self.shard_count) if self._up[k])
        return free / self.capacity

    def session_at(self, shard: int, slot: int) -> str | None:
        return self._used[shard].get(slot)

    def port(self, shard: int, slot: int) -> int:
        return rtp_port(self.rtp_port_min, self.slots_per_shard, shard, slot)

    # -- changes ---------------------------------------------------------------------------------
    def set_up(self, shard: int, up: bool) -> None:
        """Mark a shard (not) accepting new sessions; its existing sessions stay."""
        self._up[shard] = up

    def admit(self, session_id: str) -> Placed:
        """Reserve a slot for a new session or raise :class:`AdmissionRefused`."""
        if self.draining:
            raise AdmissionRefused("draining", self.retry_after_draining)
        candidates = [k for k in range(self.shard_count) if self._up[k] and self._free[k]]
        if not candidates:
            raise AdmissionRefused("at capacity", self.retry_after_full)
        shard = min(candidates, key=lambda k: (len(self._used[k]), k))
        slot = self._free[shard].popleft()
        self._used[shard][slot] = session_id
        return Placed(shard, slot, self.port(shard, slot))

    def claim(self, shard: int, slot: int, session_id: str) -> Placed:
        """Take a specific slot (re-attaching a session found in shared memory after a restart)."""
        if not 0 <= shard < self.shard_count or not 0 <= slot < self.slots_per_shard:
            raise ValueError(f"no slot {shard}/{slot}")
        owner = self._used[shard].get(slot)
        if owner is not None and owner != session_id:
            raise ValueError(f"slot {shard}/{slot} is held by another session")
        if owner is None:
            self._free[shard].remove(slot)
            self._used[shard][slot] = session_id
        return Placed(shard, slot, self.port(shard, slot))

    def release(self, shard: int, slot: int) -> None:
        """Free a slot (idempotent); it goes to the back of the free queue."""
        if self._used[shard].pop(slot, None) is not None:
            self._free[shard].append(slot)
