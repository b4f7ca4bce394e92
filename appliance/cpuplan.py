"""Which CPU cores Janus gets and which each shard's media and AI workers are pinned to.

Why pin at all: a media worker is deadline-driven (a 20 ms frame must leave on time) and its cache
stays warm when the scheduler never moves it; an AI worker batches VAD for its whole shard. Putting a
shard's two workers on the *same* core keeps the uplink/downlink rings in that core's cache (the rings
are SPSC between exactly those two processes) and makes "one shard per core" the unit of capacity.

Policy for ``shards.cpu_plan = "auto"`` (``C`` = the CPUs this process may use, from
``sched_getaffinity`` so systemd's ``CPUAffinity=`` and cgroup cpusets are respected):

- ``C == 1``: everything shares that core; one shard.
- ``C == 2``: core 0 for Janus, the supervisor, Redis and coturn; one shard on core 1.
- ``C >= 3``: Janus gets ``ceil(C / 4)`` cores (the lowest ones). NoSIP costs a few ms of CPU per
  session-second against our ~12 ms, so about a quarter of the box; the supervisor, Redis and coturn
  are light and float on Janus's cores. Every other core carries one shard (media + AI worker).
- ``shards.count > 0`` overrides the number of shards; shards are then dealt round-robin over the
  worker cores (several shards on a core is fine: fewer sessions per process, same total).

Why media and AI share a core even on >= 4 cores: the contention between them (the media worker
missing 20 ms deadlines while its AI worker is busy) is solved by priority, not placement — the media
worker runs SCHED_RR when allowed (``media.realtime_priority``) and the AI worker lowers its own nice
(``shards.ai_nice``). Splitting them would leave the cores unbalanced (media ~65 %, AI ~35 % of a shard's
CPU in the pipeline benchmark) and put the rings across cores; an explicit plan (``"1:2"``) still can.

Explicit plans (``shards.cpu_plan``) name the cores per shard as ``media:ai`` pairs separated by
commas, optionally preceded by Janus's cores: ``"janus=0;1:1,2:2,3:3"``. Without ``janus=``, Janus gets
the allowed CPUs no shard uses (or every allowed CPU if the shards use them all).

Hand-written because the policy is ours; the only system call is ``os.sched_getaffinity``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.config import ConfigError


@dataclass(frozen=True)
class ShardCpus:
    """The cores one shard's workers are pinned to."""

    shard: int
    media_cpu: int
    ai_cpu: int


@dataclass(frozen=True)
class CpuPlan:
    """The whole box: Janus's cores (also the supervisor's) and one entry per shard."""

    janus_cpus: tuple[int, ...]
    shards: tuple[ShardCpus, ...]

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    def describe(self) -> str:
        """One human line, e.g. ``janus=0 shards=[0: media 1 ai 1]`` for logs and STATUS."""
        parts = ", ".join(f"{s.shard}: media {s.media_cpu} ai {s.ai_cpu}" for s in self.shards)
        return f"janus={','.join(map(str, self.janus_cpus))} shards=[{parts}]"


def available_cpus() -> list[int]:
    """CPUs this process may run on (affinity mask), sorted."""
    return sorted(os.sched_getaffinity(0))


def _parse_cpu_list(text: str, key: str) -> list[int]:
    """Parse ``0-2,5`` into ``[0, 1, 2, 5]``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo_s, _, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if hi_s else lo
        except ValueError:
            raise ConfigError(f"{key}: expected CPU numbers like 0-2,5, got {text!r}") from None
        if lo < 0 or hi < lo:
            raise ConfigError(f"{key}: bad CPU range {part!r}")
        out.extend(range(lo, hi + 1))
    if not out:
        raise ConfigError(f"{key}: empty CPU list")
    return out


def parse_explicit(plan: str, cpus: Iterable[int]) -> CpuPlan:
    """Parse an explicit ``shards.cpu_plan`` string against the allowed CPUs."""
    key = "shards.cpu_plan"
    allowed = set(cpus)
    janus: list[int] | None = None
    body = plan.strip()
    if ";" in body:
        head, _, body = body.partition(";")
        name, eq, value = head.partition("=")
        if name.strip() != "janus" or not eq:
            raise ConfigError(f"{key}: expected 'janus=CPUS;media:ai,…', got {plan!r}")
        janus = _parse_cpu_list(value, key)
    shards: list[ShardCpus] = []
    for i, pair in enumerate(p for p in body.split(",") if p.strip()):
        media_s, colon, ai_s = pair.partition(":")
        try:
            media, ai = int(media_s), int(ai_s if colon else media_s)
        except ValueError:
            raise ConfigError(f"{key}: expected media:ai CPU pairs like 1:1,2:2, got {pair!r}") from None
        shards.append(ShardCpus(i, media, ai))
    if not shards:
        raise ConfigError(f"{key}: no shards in {plan!r}")
    used = {c for s in shards for c in (s.media_cpu, s.ai_cpu)}
    if janus is None:
        janus = sorted(allowed - used) or sorted(allowed)
    bad = sorted((used | set(janus)) - allowed)
    if bad:
        raise ConfigError(
            f"{key}: CPU {bad[0]} is not available to this process (allowed: {sorted(allowed)})"
        )
    return CpuPlan(tuple(janus), tuple(shards))


def auto_plan(cpus: Iterable[int], shard_count: int = 0) -> CpuPlan:
    """The default policy (see the module docstring)."""
    cpu_list = sorted(set(cpus))
    if not cpu_list:
        raise ConfigError("no CPUs available")
    n = len(cpu_list)
    if n == 1:
        janus, workers = cpu_list, cpu_list
    elif n == 2:
        janus, workers = cpu_list[:1], cpu_list[1:]
    else:
        j = math.ceil(n / 4)
        janus, workers = cpu_list[:j], cpu_list[j:]
    count = shard_count or len(workers)
    shards = tuple(ShardCpus(k, workers[k % len(workers)], workers[k % len(workers)]) for k in range(count))
    return CpuPlan(tuple(janus), shards)


def make_plan(cpu_plan: str = "auto", shard_count: int = 0, cpus: Iterable[int] | None = None) -> CpuPlan:
    """The plan for a config's ``shards.cpu_plan`` and ``shards.count`` (explicit plans fix the count)."""
    cpu_list = available_cpus() if cpus is None else list(cpus)
    if cpu_plan.strip() in ("", "auto"):
        return auto_plan(cpu_list, shard_count)
    plan = parse_explicit(cpu_plan, cpu_list)
    if shard_count and shard_count != plan.shard_count:
        raise ConfigError(
            f"shards.count: {shard_count} disagrees with shards.cpu_plan ({plan.shard_count} shards); "
            "set count = 0 with an explicit plan"
        )
    return plan


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Pin a process to CPUs (``sched_setaffinity``)."""
    os.sched_setaffinity(pid, set(cpus))


def _main(argv: list[str] | None = None) -> int:
    """``python -m appliance.cpuplan [--janus]``: print the plan (or only Janus's CPU list, for
    systemd ``CPUAffinity=`` drop-ins) for the effective config."""
    import argparse
    import sys

    from appliance.config import load_config

    parser = argparse.ArgumentParser(prog="python -m appliance.cpuplan", description=_main.__doc__)
    parser.add_argument("--config")
    parser.add_argument("--janus", action="store_true", help="print only Janus's CPUs (e.g. 0 or 0,1)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else load_config()
        plan = make_plan(cfg.shards.cpu_plan, cfg.shards.count)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(",".join(map(str, plan.janus_cpus)) if args.janus else plan.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
