"""Fixed-bucket latency histograms in a shard segment's header: workers observe, the supervisor exports.

Why not prometheus_client's multiprocess mode: it keeps one mmap'd file per process and metric, and every
``observe`` takes a lock and does a dict lookup (~3-5 µs); a restarted worker leaves a file behind that
the exporter must merge. Here each worker role owns a 1 KiB block of the segment header (one writer, plain
aligned u64 stores), an observation is a ``bisect`` plus two stores (~0.4 µs, measured by
``tests/shm/test_histograms.py::test_observe_cost``), and the counts survive worker restarts because the
segment does. The supervisor reads the blocks at scrape time (racy but untorn, like ``Counters``) and
turns them into Prometheus histograms labelled only by shard (and stage): no per-session label.

Block layout (``layout.H_HIST[role]``): the role's histograms in ``HISTOGRAMS[role]`` order, each
``len(BOUNDS) + 1`` non-cumulative bucket counts (the last is +Inf) followed by the sum of observations
in nanoseconds; all u64.

Stages (docs/operations.md lists the exported names):
* AI worker: ``turn_end`` (caller's last speech → activityEnd sent), ``model_first_audio`` (activityEnd →
  first model audio at the worker), ``barge_in`` (caller's speech onset → model audio stopped: the media
  worker's playback pause as the AI worker sees it, or the flush);
* media worker: ``playout`` (first model audio at the AI worker → its first RTP packet), ``e2e`` (caller's
  last speech → first answer RTP packet out), from the slot's ``CB_ANSWER`` words the AI worker writes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Literal

from shm import layout as L

Role = Literal["media", "ai"]

# seconds; fine around the design targets (40 ms turn end, 25 ms playout), around hangover + answer
# (E2E is ~420-500 ms with the default 400 ms hangover) and at the seed's E2E alerts (1.5 / 2.5 s)
BOUNDS: tuple[float, ...] = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
    0.35, 0.4, 0.42, 0.44, 0.46, 0.48, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0,
)
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ai": ("turn_end", "model_first_audio", "barge_in"),
    "media": ("playout", "e2e"),
}
NB = len(BOUNDS) + 1  # buckets incl. +Inf
STRIDE = NB + 1  # + sum_ns
for _names in HISTOGRAMS.values():
    assert len(_names) * STRIDE * 8 <= L.H_HIST_SIZE


class ShardHistograms:
    """One role's histogram block of a mapped segment (``ShardSegment.histograms(role)``)."""

    __slots__ = ("_base", "_q", "role")

    def __init__(self, header: memoryview, role: Role) -> None:
        off = L.H_HIST[role]
        self.role = role
        self._q = header[off:off + L.H_HIST_SIZE].cast("Q")
        self._base = {name: i * STRIDE for i, name in enumerate(HISTOGRAMS[role])}

    def observe(self, name: str, seconds: float) -> None:
        """Record one value (the writer role's process only). Negative values count as 0."""
        base = self._base[name]
        if seconds < 0.0:
            seconds = 0.0
        q = self._q
        i = base + bisect_left(BOUNDS, seconds)
        q[i] = q[i] + 1
        s = base + NB
        q[s] = (q[s] + int(seconds * 1e9)) & L.U64

    def snapshot(self, name: str) -> tuple[list[int], float]:
        """(non-cumulative bucket counts incl. +Inf, sum in seconds) of ``name``."""
        base = self._base[name]
        q = self._q
        return list(q[base:base + NB]), q[base + NB] / 1e9

    def snapshot_all(self) -> dict[str, tuple[list[int], float]]:
        return {name: self.snapshot(name) for name in self._base}

    def release(self) -> None:
        self._q.release()


def quantile(q: float, buckets: list[int]) -> float | None:
    """``histogram_quantile`` on non-cumulative counts (linear within a bucket, like Prometheus);
    None when empty. Observations above the last bound report that bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    cum = 0
    for i, n in enumerate(buckets):
        if n and cum + n >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            lo = BOUNDS[i - 1] if i else 0.0
            return lo + (BOUNDS[i] - lo) * (rank - cum) / n
        cum += n
    return BOUNDS[-1]


def diff(after: Mapping[str, tuple[list[int], float]],
         before: Mapping[str, tuple[list[int], float]]) -> dict[str, tuple[list[int], float]]:
    """Per-name bucket growth between two ``snapshot_all`` readings (a benchmark window)."""
    out = {}
    for name, (b_after, s_after) in after.items():
        b0, s0 = before.get(name, ([0] * NB, 0.0))
        out[name] = ([a - b for a, b in zip(b_after, b0, strict=True)], s_after - s0)
    return out
