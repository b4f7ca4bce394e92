"""The arbiter: spawns each shard's media and AI worker pinned to its CPU, watches and restarts them.

Read it top to bottom like gunicorn's arbiter:

1. ``start()`` spawns one *keeper* task per worker (shard x {media, ai}).
2. A keeper spawns its worker (``voice-appliance media-worker --shard K --segment NAME --cpu N``),
   pins every thread of the new process to the planned CPU (the worker pins itself too, via
   ``--cpu``; the parent's pin covers the time before the worker's own code runs), waits for it to
   exit, and spawns it again on the *same* CPU. A worker that keeps dying within ``min_uptime`` of
   its start backs off exponentially (a crash loop must not eat the core its shard-mate needs).
3. ``watch()`` runs every ``tick`` seconds: a worker whose heartbeat in the shard's shared-memory header
   is older than ``heartbeat_timeout`` (after a start-up grace period) is either *hung* or *overloaded*.
   The CPU time it has used (utime+stime in ``/proc/PID/stat``) tells them apart: a worker whose CPU
   time does not advance across the stale period is hung (deadlocked, stopped, blocked) — SIGKILL, and
   its keeper restarts it. A worker whose CPU time keeps advancing is alive but behind: it is counted
   (``va_worker_overloaded_total``, an ``overloaded`` event, a warning) and left alone until the
   heartbeat is ``hard_timeout`` old (default 5x the timeout). Killing it would make overload worse:
   its replacement re-attaches every session at once and falls behind again (a restart loop, seen in
   the pipeline benchmark). It also feeds the metrics (up, heartbeat age) and the watchdog callback.
4. ``stop()`` (SIGTERM/SIGINT in the supervisor, after draining sessions) sends SIGTERM to every
   worker, waits ``stop_timeout``, then SIGKILLs what is left. ``rolling_restart()`` (SIGHUP) replaces
   the workers one at a time, waiting for each replacement's heartbeat: calls survive it, because a
   restarted worker re-attaches its slots from shared memory.

Workers run in their own session (``start_new_session``) so a Ctrl-C in a terminal reaches only the
supervisor, which then stops them in order. They deliberately outlive the supervisor (no
``PR_SET_PDEATHSIG``): a supervisor that crashes or restarts in place leaves its calls running, and the
next one *adopts* each worker whose PID it finds beating in the shard's segment header (``adopt``; its
keeper then waits on a pidfd, since an adopted worker need not be its child) — docs/architecture.md
"Supervisor restart and adoption".

Hand-written rather than supervisord/circus inside the supervisor: restarts must keep the CPU plan and
the shard's segment, feed heartbeats from shared memory into the decision, and tell placement when a
shard is unavailable; those are our semantics, ~200 lines of asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter

from appliance.cpuplan import CpuPlan

log = logging.getLogger(__name__)

ROLES = ("media", "ai")

# (pid, age in seconds) of the last heartbeat written for (role, shard), or None if none yet.
HeartbeatFn = Callable[[str, int], "tuple[int, float] | None"]

OVERLOADED = Counter(
    "va_worker_overloaded", "Times a worker's heartbeat went stale while it kept using CPU (not killed)",
    ["role"])
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

def worker_cmdline_matches(pid: int, role: str, segment: str) -> bool:
    """True if ``pid`` runs ``<role>-worker --segment <segment>`` (a recycled PID is not adopted)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return f"{role}-worker" in argv and segment in argv


async def wait_pid(pid: int, poll: float = 0.2) -> None:
    """Return once ``pid`` has exited (a pidfd when the kernel has one; polling /proc otherwise)."""
    from appliance.procs import pid_gone

    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        while not pid_gone(pid):  # noqa: ASYNC110 - no pidfd: nothing to wait on but /proc
            await asyncio.sleep(poll)
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks; reap it if it was our child (after an in-place restart)


@dataclass
class WorkerSpec:
    """What to run for one worker and where."""

    role: str
    shard: int
    cpu: int
    argv: list[str]


@dataclass
class Worker:
    """A worker slot: the spec plus the current process (if any) and its history."""

    spec: WorkerSpec
    proc: asyncio.subprocess.Process | None = None
    adopted_pid: int | None = None  # a running worker found at start (not spawned by this process)
    started_at: float = 0.0  # time.monotonic()
    starts: int = 0
    restarts: int = 0
    quick_failures: int = 0
    last_exit: int | None = None
    kill_reason: str = ""
    overloaded: bool = False  # heartbeat stale but CPU time advancing (this episode already counted)
    stale_cpu: int | None = None  # CPU ticks when the heartbeat was first seen stale
    stale_since: float = 0.0  # time.monotonic() of that observation
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)  # heartbeat seen
    spawned_event: asyncio.Event = field(default_factory=asyncio.Event)  # a process is running

    @property
    def pid(self) -> int | None:
        if self.adopted_pid is not None:
            return self.adopted_pid
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def name(self) -> str:
        return f"{self.spec.role}-{self.spec.shard}"


def worker_argv(role: str, shard: int, segment: str, cpu: int, config: str | None = None) -> list[str]:
    """The command line of a real worker (``voice-appliance media-worker|ai-worker``)."""
    argv = [sys.executable, "-m", "appliance", f"{role}-worker", "--shard", str(shard),
            "--segment", segment, "--cpu", str(cpu)]
    if config:
        argv += ["--config", config]
    return argv


def specs_for_plan(
    plan: CpuPlan, segment_of: Callable[[int], str], config: str | None = None
) -> list[WorkerSpec]:
    """One media and one AI worker per shard of the plan."""
    out = []
    for s in plan.shards:
        seg = segment_of(s.shard)
        for role, cpu in (("media", s.media_cpu), ("ai", s.ai_cpu)):
            out.append(WorkerSpec(role, s.shard, cpu, worker_argv(role, s.shard, seg, cpu, config)))
    return out


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` (all its threads) in clock ticks, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in (...) may contain spaces
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def pin_all_threads(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (sched_setaffinity acts on one thread id)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, {cpu})


class Arbiter:
    """Keeps every worker of the plan running on its CPU."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        heartbeat: HeartbeatFn | None = None,
        heartbeat_timeout: float = 2.0,
        hard_timeout: float | None = None,
        start_grace: float = 20.0,
        tick: float = 0.25,
        min_uptime: float = 1.0,
        max_backoff: float = 10.0,
        stop_timeout: float = 5.0,
        env: dict[str, str] | None = None,
        on_event: Callable[[str, Worker], None] | None = None,
    ) -> None:
        self.workers = [Worker(s) for s in specs]
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.hard_timeout = hard_timeout if hard_timeout is not None else 5.0 * heartbeat_timeout
        self.start_grace = start_grace
        self.tick = tick
        self.min_uptime = min_uptime
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self.env = env
        self.on_event = on_event or (lambda _event, _worker: None)
        self._stopping = False
        self._keepers: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None

    def worker(self, role: str, shard: int) -> Worker:
        return next(w for w in self.workers if w.spec.role == role and w.spec.shard == shard)

    # -- 1. start -------------------------------------------------------------------------------
    def adopt(self, role: str, shard: int, pid: int) -> None:
        """Take over a worker already running (found beating in the segment) instead of spawning one."""
        w = self.worker(role, shard)
        w.adopted_pid = pid
        w.started_at = time.monotonic()
        w.spawned_event.set()
        log.info("worker adopted", extra={"worker": w.name, "worker_pid": pid})

    async def start(self) -> None:
        """Spawn every worker and start watching them."""
        self._stopping = False
        self._keepers = [asyncio.create_task(self._keep(w), name=f"keep-{w.name}") for w in self.workers]
        self._watcher = asyncio.create_task(self._watch(), name="arbiter-watch")

    # -- 2. keep each worker running ----------------------------------------------------------
    async def _spawn(self, w: Worker) -> None:
        w.ready_event.clear()
        w.kill_reason = ""
        w.overloaded, w.stale_cpu = False, None
        w.proc = await asyncio.create_subprocess_exec(
            *w.spec.argv, env=self.env, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL,
        )
        pin_all_threads(w.proc.pid, w.spec.cpu)
        w.spawned_event.set()
        w.started_at = time.monotonic()
        w.starts += 1
        log.info("worker started", extra={"worker": w.name, "worker_pid": w.proc.pid, "cpu": w.spec.cpu})
        self.on_event("started", w)

    async def _keep(self, w: Worker) -> None:
        backoff = 0.0
        while not self._stopping:
            if backoff:
                log.warning("worker crash-looping, backing off",
                            extra={"worker": w.name, "backoff_seconds": backoff})
                self.on_event("backoff", w)
                await asyncio.sleep(backoff)
                if self._stopping:
                    break
            if w.adopted_pid is not None:
                self.on_event("started", w)
                await wait_pid(w.adopted_pid)
                w.adopted_pid, w.last_exit = None, None
                if self._stopping:
                    break
                w.restarts += 1
                reason = w.kill_reason or "exit"
                log.error("adopted worker exited, restarting", extra={"worker": w.name, "reason": reason})
                self.on_event(f"exited:{reason}", w)
                continue
            try:
                await self._spawn(w)
            except OSError as exc:
                log.error("cannot start worker", extra={"worker": w.name, "error": str(exc)})
                w.quick_failures += 1
                backoff = min(self.max_backoff, 0.1 * 2 ** w.quick_failures)
                continue
            assert w.proc is not None
            rc = await w.proc.wait()
            w.last_exit = rc
            if self._stopping:
                break
            uptime = time.monotonic() - w.started_at
            w.quick_failures = w.quick_failures + 1 if uptime < self.min_uptime else 0
            # First failure restarts at once; only repeated quick deaths back off.
            backoff = 0.0
            if w.quick_failures > 1:
                backoff = min(self.max_backoff, 0.1 * 2 ** (w.quick_failures - 1))
            w.restarts += 1
            reason = w.kill_reason or ("signal" if rc < 0 else "exit")
            log.error("worker exited, restarting", extra={
                "worker": w.name, "returncode": rc, "uptime_seconds": round(uptime, 3), "reason": reason})
            self.on_event(f"exited:{reason}", w)

    # -- 3. watch heartbeats ----------------------------------------------------------------------
    def heartbeat_age(self, w: Worker) -> float | None:
        """Seconds since the current process's last heartbeat, None if it has not written one yet."""
        if self.heartbeat is None or w.pid is None:
            return None
        beat = self.heartbeat(w.spec.role, w.spec.shard)
        if beat is None or beat[0] != w.pid:
            return None
        return beat[1]

    async def _watch(self) -> None:
        while not self._stopping:
            for w in self.workers:
                with contextlib.suppress(Exception):  # a bad read must never stop the watcher
                    self._check(w)
            await asyncio.sleep(self.tick)

    def _check(self, w: Worker) -> None:
        if w.pid is None or self.heartbeat is None:
            return
        age = self.heartbeat_age(w)
        running_for = time.monotonic() - w.started_at
        if age is not None and age <= self.heartbeat_timeout:
            if w.overloaded:
                log.info("worker caught up", extra={"worker": w.name, "worker_pid": w.pid})
            w.overloaded, w.stale_cpu = False, None
            if not w.ready_event.is_set():
                w.ready_event.set()
                self.on_event("ready", w)
            return
        stale = (age is not None and age > self.heartbeat_timeout) or (
            age is None and running_for > self.start_grace
        )
        if not stale or w.kill_reason:
            return
        now = time.monotonic()
        cpu = cpu_ticks(w.pid)
        if w.stale_cpu is None:  # first stale look: remember the CPU time, decide on a later tick
            w.stale_cpu, w.stale_since = cpu, now
            return
        # CPU time has a 1/CLK_TCK (10 ms) grain and a busy worker on a crowded core gets only a share:
        # compare over up to 1 s (half the timeout) so an overloaded worker is not mistaken for a hung one.
        if now - w.stale_since < max(self.tick, 3.0 / _CLK_TCK, min(1.0, self.heartbeat_timeout / 2)):
            return
        busy = cpu is not None and cpu > w.stale_cpu
        w.stale_cpu, w.stale_since = cpu, now
        past_hard = age > self.hard_timeout if age is not None else (
            running_for > self.start_grace + self.hard_timeout)
        if busy and not past_hard:
            if not w.overloaded:
                w.overloaded = True
                OVERLOADED.labels(role=w.spec.role).inc()
                log.warning("worker heartbeat stale but it is using CPU: overloaded, not restarting", extra={
                    "worker": w.name, "worker_pid": w.pid, "heartbeat_age_seconds": age,
                    "hard_timeout_seconds": self.hard_timeout})
                self.on_event("overloaded", w)
            return
        w.kill_reason = "heartbeat" if not busy else "heartbeat_hard"
        log.error("worker heartbeat stale, killing", extra={
            "worker": w.name, "worker_pid": w.pid, "heartbeat_age_seconds": age,
            "reason": "no CPU progress" if not busy else "hard timeout"})
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)

    # -- 4. stop and rolling restart --------------------------------------------------------------
    async def stop(self) -> None:
        """SIGTERM every worker, SIGKILL after ``stop_timeout``; returns when all have exited."""
        self._stopping = True
        if self._watcher:
            self._watcher.cancel()
        pids = [w.pid for w in self.workers if w.pid is not None]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if pids:
            waits = [asyncio.ensure_future(self._wait_worker(w)) for w in self.workers if w.pid is not None]
            _done, pending = await asyncio.wait(waits, timeout=self.stop_timeout)
            if pending:
                for w in self.workers:
                    if w.pid is not None:
                        log.warning("worker ignored SIGTERM, killing", extra={"worker_pid": w.pid})
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGKILL)
                await asyncio.wait(pending)
        await self._stop_keepers()
        log.info("all workers stopped")

    async def release(self) -> None:
        """Stop watching and keeping the workers but leave them running (an in-place supervisor restart:
        the next supervisor adopts them)."""
        self._stopping = True
        await self._stop_keepers()
        log.info("workers left running for the next supervisor")

    async def _stop_keepers(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        for t in self._keepers:
            t.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        if self._watcher:
            await asyncio.gather(self._watcher, return_exceptions=True)

    @staticmethod
    async def _wait_worker(w: Worker) -> None:
        if w.adopted_pid is not None:
            await wait_pid(w.adopted_pid)
            w.adopted_pid = None
        elif w.proc is not None:
            await w.proc.wait()

    async def rolling_restart(self, ready_timeout: float = 30.0) -> None:
        """Replace workers one by one (SIGTERM; the keeper respawns), waiting for each to beat again."""
        for w in self.workers:
            pid = w.pid
            if self._stopping or pid is None:
                continue
            w.kill_reason = "reload"
            w.spawned_event.clear()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._wait_worker(w)), self.stop_timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wanted = w.ready_event if self.heartbeat is not None else w.spawned_event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.spawned_event.wait(), ready_timeout)
                await asyncio.wait_for(wanted.wait(), ready_timeout)
