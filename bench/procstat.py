"""CPU and memory of a set of processes, from /proc (not wall clock).

CPU is ``utime + stime`` of each process (all its threads) in clock ticks; memory is PSS from
``smaps_rollup`` (shared libraries and the shared-memory segment split fairly between the processes
mapping them, so a sum over processes does not count onnxruntime or the rings N times) with RSS beside
it for comparison. A process that has exited reads as absent (the caller sees it in ``missing``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie: its counters are final but it no longer works for us
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) in KiB of ``pid``, or None if it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    return pss, rss


@dataclass
class Sample:
    """CPU seconds per pid at one instant."""

    cpu: dict[int, float] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


def sample(pids: list[int]) -> Sample:
    out = Sample()
    for pid in pids:
        c = cpu_seconds(pid)
        if c is None:
            out.missing.append(pid)
        else:
            out.cpu[pid] = c
    return out


def cpu_between(a: Sample, b: Sample) -> tuple[float, list[int]]:
    """Total CPU seconds spent between two samples by the pids alive in both, and the pids not."""
    total = sum(b.cpu[p] - a.cpu[p] for p in a.cpu if p in b.cpu)
    lost = sorted(set(a.cpu) ^ set(b.cpu) | set(a.missing) | set(b.missing))
    return total, lost


def memory_total_mb(pids: list[int]) -> tuple[float, float]:
    """Summed (PSS, RSS) in MiB."""
    pss = rss = 0
    for pid in pids:
        m = memory_kb(pid)
        if m:
            pss += m[0]
            rss += m[1]
    return pss / 1024, rss / 1024
