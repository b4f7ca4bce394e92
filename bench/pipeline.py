"""`voice-appliance bench pipeline`: CPU per session-second, sessions per core and added latency at load.

The appliance's data path runs as in production — one shared-memory segment per shard, media and AI
workers spawned and pinned by the real arbiter (:mod:`bench.host`), the AI workers talking to the Live
emulator through the real google-genai SDK over TLS with zero model delay — and synthetic callers
(:mod:`bench.loadgen`) send real Opus RTP at real time where Janus NoSIP would. The generator and the
emulator are pinned to the cores the CPU plan leaves to Janus and are never counted.

Measured (see docs/benchmarks.md for what each number means and the results):
- CPU: utime+stime from /proc of the host (supervisor share) and every worker over the window, per
  session-second; memory: PSS (and RSS) of the same processes per session;
- at the caller (:mod:`bench.loadgen`): ``turn_e2e`` (last speech packet → first answer packet,
  everything included), ``bargein`` (first talking-over packet → first silent downlink frame: the media
  worker's playback pause; the AI worker's flush with pauses off; false pauses are
  ``pauses_released``) and ``pacing`` (RTP arrival error against the packet's timestamp);
- inside the workers, from the production metrics (the shard segments' histograms behind
  ``va_turn_latency_seconds`` / ``va_turn_e2e_seconds``, shm/histograms.py), as ``prod_<stage>``
  p50/p99 interpolated in the buckets like Prometheus' ``histogram_quantile``: ``turn_end`` (minus
  ``vad.hangover_ms``, as reported before), ``model_first_audio``, ``playout`` (first model audio at the
  AI worker → first RTP packet sent), ``barge_in`` and ``e2e``. Production stages start when the
  caller's audio reaches the media worker's tick (turn_metrics.py), so they read 0-20 ms (mean ~10)
  below the caller-side figures.
- drops: ring overruns, media-worker drops and late packets, downlink sequence gaps at the caller and
  downlink frames the media worker skipped (RTP timestamp jumps: a missed deadline the caller hears).

Modes: a fixed load (``--sessions``, ``--seconds``), ``--ramp`` (add ``--ramp-step`` sessions per step
until pacing p99 > 5 ms, a drop, or the generator itself falls behind; reports the last good count and
sessions per core), ``--per-session-process`` (the same load with shared shard workers, then with one
media + one AI process per session — how peers scale — and the CPU ratio), ``--duty realistic|worst``.
Experiments: ``--rt-media`` (media workers on SCHED_RR), ``--media-only`` (no AI worker: the RTP/Opus
share alone).

Environment knobs for investigations: ``VA_BENCH_REPLY=tone|silence`` changes the emulator's reply
(default ``echo``).

Hand-written orchestration because the point is to run *our* processes exactly as the supervisor does;
the only borrowed pieces are the arbiter, the CPU plan and the shm segment themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import callers, procstat
from bench.host import HostHandle, session_id
from bench.loadgen import LoadGen, LoadSpec
from shm import histograms

PACING_LIMIT_MS = 5.0
GEN_LATE_LIMIT_MS = 10.0  # the generator's own p99 send lateness (half a frame) above which results are void


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=40, help="concurrent sessions (default 40)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    parser.add_argument("--duty", choices=("realistic", "worst"), default="realistic")
    parser.add_argument("--ramp", action="store_true", help="raise sessions until pacing/drops fail")
    parser.add_argument("--ramp-step", type=int, default=10, help="sessions added per ramp step")
    parser.add_argument("--ramp-max", type=int, default=400, help="stop the ramp here")
    parser.add_argument("--per-session-process", action="store_true",
                        help="compare: the same load with shared shard workers, then one media + AI "
                             "process pair per session (the peers' model); reports the CPU ratio")
    parser.add_argument("--shards", type=int, default=0, help="shards (0: the CPU plan's default)")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds before measuring")
    parser.add_argument("--smoke", action="store_true", help="short CI form: 3 sessions, a few seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, config)")
    parser.add_argument("--rt-media", action="store_true",
                        help="experiment: put every thread of the media workers on SCHED_RR (the default "
                             "media.realtime_priority = 1 already does it for the worker itself when "
                             "allowed; --set media.realtime_priority=0 measures normal priority)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for a lever experiment, e.g. media.opus_complexity=3 "
                             "(TOML value; repeatable)")
    parser.add_argument("--media-only", action="store_true",
                        help="diagnostic: media workers only (no AI worker, no model): the RTP/Opus share")


# ---- helpers --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_udp_range(count: int) -> int:
    """A base port with ``count`` free UDP ports from it (RTP and RTCP of every slot).

    Below the kernel's ephemeral range (32768+), so the callers' own sockets never land in it later.
    """
    span = max((32000 - count - 10000) // 100, 1)
    for attempt in range(50):
        base = 10000 + ((os.getpid() * 7 + attempt * 997) % span) * 100
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no free range of {count} UDP ports found")


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"emulator did not listen on {port} within {timeout:.0f} s")


def _pct(values: Any, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _hist_lat(stage: str, hist: dict[str, tuple[list[int], float]], minus_ms: float = 0.0) -> dict[str, Any]:
    """p50/p99 (ms) and count of a production histogram's growth over the window."""
    buckets, _ = hist.get(stage, ([], 0.0))
    out: dict[str, Any] = {}
    for q in (50, 99):
        v = histograms.quantile(q / 100, buckets) if buckets else None
        out[f"prod_{stage}_p{q}_ms"] = round(v * 1000 - minus_ms, 2) if v is not None else None
    out[f"prod_{stage}_n"] = sum(buckets)
    return out


def _lat(name: str, values: Any, minus: float = 0.0) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64) - minus
    return {
        f"{name}_p50_ms": _pct(v, 50),
        f"{name}_p99_ms": _pct(v, 99),
        f"{name}_max_ms": round(float(v.max()), 2) if len(v) else None,
        f"{name}_n": len(v),
    }


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["media.opus_complexity=3"]`` → ``{"media": {"opus_complexity": 3}}`` (values parsed as TOML)."""
    import tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (eq and dot and section and name):
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def _write_config(path: Path, values: dict[str, dict[str, Any]]) -> None:
    def lit(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = []
    for section, kv in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {lit(v)}" for k, v in kv.items()]
        lines.append("")
    path.write_text("\n".join(lines))


# ---- the benchmark --------------------------------------------------------------------------------
class Bench:
    """Emulator + appliance host + load generator for one run; a context manager that tears all down."""

    def __init__(self, args: argparse.Namespace, capacity: int) -> None:
        self.args = args
        self.capacity = capacity
        self.work = Path(tempfile.mkdtemp(prefix="va-bench-"))
        self.emulator: subprocess.Popen[bytes] | None = None
        self.host: HostHandle | None = None
        self.gen: LoadGen | None = None
        self.active = 0
        self.model_problem = ""
        self.keep = False
        self.slot_of: list[tuple[int, int]] = []

    def __enter__(self) -> Bench:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from appliance.config import load_config
        from appliance.cpuplan import make_plan
        from appliance.emulator.certs import ensure_certs

        args = self.args
        if args.per_session_process:
            shards, slots = self.capacity, 1
        else:
            shards = args.shards or make_plan("auto").shard_count
            slots = -(-self.capacity // shards)
        # The plan is fixed here and written out explicitly, so the host (which must not be pinned while
        # it plans: cpuplan validates against its own affinity) and this report use the same cores.
        auto = make_plan("auto", shards)
        plan_text = (f"janus={','.join(map(str, auto.janus_cpus))};"
                     + ",".join(f"{s.media_cpu}:{s.ai_cpu}" for s in auto.shards))
        port_min = _free_udp_range(2 * shards * slots)
        emu_port = _free_port()
        emu_dir = self.work / "emulator"
        certs = ensure_certs(emu_dir, ["127.0.0.1"])
        cfg_path = self.work / "appliance.toml"
        values: dict[str, dict[str, Any]] = {
            "paths": {"state_dir": str(self.work), "run_dir": str(self.work / "run"),
                      "instance_id": f"bench{os.getpid()}"},
            "emulator": {"host": "127.0.0.1", "port": emu_port},
            "model": {"base_url": f"https://127.0.0.1:{emu_port}", "ca_file": str(certs.ca_file)},
            "shards": {"count": 0, "slots": slots, "cpu_plan": plan_text},
            "media": {"rtp_port_min": port_min, "rtp_port_max": port_min + 2 * shards * slots + 1,
                      # no playback pauses without an AI worker to settle them, or in the worst duty
                      **({"pause_on_speech_dbfs": 0.0} if args.duty == "worst" or args.media_only else {})},
            "log": {"level": "warning"},
            # worst duty: the caller talks over every answer; keep the answer playing as long as the
            # config allows so both directions stay busy, without playback pauses (docs/benchmarks.md)
            **({"vad": {"barge_in_ms": 2000}} if args.duty == "worst" else {}),
        }
        for section, kv in _overrides(args.set).items():
            values.setdefault(section, {}).update(kv)
        _write_config(cfg_path, values)
        self.cfg = load_config(cfg_path)
        plan = make_plan(self.cfg.shards.cpu_plan, 0)
        worker_cpus = {c for s in plan.shards for c in (s.media_cpu, s.ai_cpu)}
        self.side_cpus = (set(plan.janus_cpus) - worker_cpus) or set(plan.janus_cpus)
        self.worker_cpus = worker_cpus
        self.segs_plan = plan
        env = {**os.environ, "VA_CONFIG": str(cfg_path), "PYTHONUNBUFFERED": "1"}
        with open(self.work / "emulator.log", "wb") as log:
            self.emulator = subprocess.Popen(
                [sys.executable, "-m", "appliance", "emulator", "--config", str(cfg_path),
                 "--state-dir", str(emu_dir), "--reply", os.environ.get("VA_BENCH_REPLY", "echo"),
                 "--first-byte-delay-ms", "0",
                 "--log-level", "warning"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(self.emulator.pid, self.side_cpus)
        self.audio = callers.prepare()
        self.gen = LoadGen(LoadSpec(audio=self.audio, n_sessions=self.capacity, duty=args.duty,
                                    worst_gap_s=(self.cfg.vad.hangover_ms + 80) / 1000))
        with contextlib.suppress(OSError):
            os.sched_setaffinity(self.gen.proc.pid, self.side_cpus)
        try:
            _wait_tcp(emu_port, self.emulator)
        except RuntimeError as exc:  # measure what runs; the result says the model was missing
            self.model_problem = f"{exc} (see {self.work / 'emulator.log'})"
        worker_env = env
        log_path = self.work / "workers.log"
        roles = ("media",) if args.media_only else ("media", "ai")
        self.host = HostHandle(str(cfg_path), worker_env, str(log_path), roles=roles)
        ready = self.host.call("ready", 90.0, timeout=120)
        if not ready.get("ok"):
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
            raise RuntimeError(f"workers did not come up: {ready}; workers.log ends with:\n{tail}")
        if args.rt_media:
            self.host.call("realtime", "media")
        if args.per_session_process:
            self.slot_of = [(i, 0) for i in range(self.capacity)]
        else:
            self.slot_of = [(i % shards, i // shards) for i in range(self.capacity)]

    def add_sessions(self, n: int) -> None:
        """Activate ``n`` more slots and start their callers."""
        assert self.host is not None and self.gen is not None
        idx = list(range(self.active, min(self.active + n, self.capacity)))
        items = [(*self.slot_of[i], self.gen.ports[i]) for i in idx]
        self.host.call("activate", (items, 111, 1))
        from shm.segment import local_rtp_port

        starts = []
        for i in idx:
            shard, slot = self.slot_of[i]
            port = local_rtp_port(self.cfg.media.rtp_port_min, shard, self.cfg.shards.slots, slot)
            starts.append((i, port, session_id(shard, slot)))
        self.gen.start(starts)
        self.active += len(idx)

    def measure(self, seconds: float) -> dict[str, Any]:
        """One measurement window at the current load."""
        assert self.host is not None and self.gen is not None
        pids_info = self.host.call("pids")
        pids = [pids_info["host"], *[p for p in pids_info["workers"].values() if p]]
        self.gen.mark()
        c0 = self.host.call("counters")
        h0 = self.host.call("histograms")
        s0 = procstat.sample(pids)
        t0 = time.monotonic()
        time.sleep(seconds)
        s1 = procstat.sample(pids)
        window = time.monotonic() - t0
        c1 = self.host.call("counters")
        hist = histograms.diff(self.host.call("histograms"), h0)
        r = self.gen.collect()
        pss, rss = procstat.memory_total_mb(pids)
        restarts = self.host.call("pids")["restarts"] - pids_info["restarts"]
        cpu, lost = procstat.cpu_between(s0, s1)
        role_of = {pids_info["host"]: "supervisor"}
        role_of.update({pid: name.split("-")[0] for name, pid in pids_info["workers"].items() if pid})
        by_role: dict[str, float] = {}
        for pid, c in s1.cpu.items():
            if pid in s0.cpu:
                by_role[role_of[pid]] = by_role.get(role_of[pid], 0.0) + c - s0.cpu[pid]
        delta = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        n = self.active
        cfg = self.cfg
        up_overruns = 0 if self.args.media_only else delta.get("uplink_overruns", 0)  # no consumer there
        drops = (up_overruns + delta.get("downlink_overruns", 0)
                 + delta.get("rx_dropped", 0) + delta.get("late", 0) + r["rx_lost"] + r["rx_skipped"])
        gen_late_p99 = _pct(r["send_late_ms"], 99) or 0.0
        out: dict[str, Any] = {
            "sessions": n,
            "duty": self.args.duty,
            "per_session_process": bool(self.args.per_session_process),
            "media_only": bool(self.args.media_only),
            "rt_media": bool(self.args.rt_media),
            "overrides": list(self.args.set),
            "shards": len(self.segs_plan.shards),
            "cpu_plan": self.segs_plan.describe(),
            "worker_cpus": len(self.worker_cpus),
            "window_seconds": round(window, 2),
            "cpu_ms_per_session_second": round(cpu * 1000 / (n * window), 3) if n else None,
            "cpu_cores_used": round(cpu / window, 3),
            "sessions_per_core_by_cpu": round(1000 * n * window / (cpu * 1000), 1) if cpu > 0 else None,
            "cpu_ms_per_session_second_by_role": {
                role: round(v * 1000 / (n * window), 3) for role, v in sorted(by_role.items())} if n else {},
            "rss_mb_per_session": round(rss / n, 2) if n else None,
            "pss_mb_per_session": round(pss / n, 2) if n else None,
            "pss_mb_total": round(pss, 1),
            **_lat("bargein", r["bargein_ms"]),
            **_lat("turn_e2e", r["turn_e2e_ms"]),
            **_hist_lat("turn_end", hist, cfg.vad.hangover_ms),
            **{k: v for stage in ("model_first_audio", "playout", "barge_in", "e2e")
               for k, v in _hist_lat(stage, hist).items()},
            **_lat("pacing", r["pacing_ms"]),
            "drops": int(drops),
            "uplink_overruns": delta.get("uplink_overruns", 0),
            "downlink_overruns": delta.get("downlink_overruns", 0),
            "media_rx_dropped": delta.get("rx_dropped", 0),
            "media_late": delta.get("late", 0),
            "media_lost": delta.get("lost", 0),
            "media_concealed": delta.get("concealed", 0),
            "downlink_underruns": delta.get("downlink_underruns", delta.get("downlink_underruns", 0)),
            "downlink_rtp_lost": r["rx_lost"],
            "downlink_skipped_frames": r["rx_skipped"],
            "turns": r["turns"],
            "no_reply": r["no_reply"],
            "bargeins": r["bargeins"],
            "bargein_missed": r["bargein_missed"],
            "pauses": delta.get("pauses", 0),
            "pauses_confirmed": delta.get("pauses_confirmed", 0),
            "pauses_released": delta.get("pauses_released", 0),  # false alarms: playback resumed
            "pause_timeouts": delta.get("pause_timeouts", 0),
            "caller_speech_fraction": r["tx_speech_fraction"],
            "model_audio_fraction": round(r["rx_model_audio"] / r["rx_packets"], 3) if r["rx_packets"] else 0,
            "rx_packets": r["rx_packets"],
            "tx_packets": r["tx_packets"],
            "worker_restarts": restarts,
            "generator_late_p99_ms": gen_late_p99,
        }
        problems = []
        if gen_late_p99 > GEN_LATE_LIMIT_MS:
            problems.append(f"load generator fell behind (send lateness p99 {gen_late_p99} ms)")
        if restarts or lost:
            problems.append(f"worker restarts during the window ({restarts}; pids lost {lost})")
        if self.model_problem:
            problems.append(f"no model: {self.model_problem}")
        if r["rx_packets"] == 0:
            problems.append("no RTP came back from the media workers")
        if problems:  # keep the logs of a run that went wrong
            self.keep = True
            problems.append(f"logs kept in {self.work}")
        out["valid"] = not problems
        out["problems"] = problems
        return out

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None
        if self.host is not None:
            self.host.stop()
            self.host = None
        if self.emulator is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.emulator.pid, signal.SIGTERM)
            try:
                self.emulator.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.emulator.pid, signal.SIGKILL)
                self.emulator.wait(5)
            self.emulator = None
        if not (self.args.keep or self.keep):
            shutil.rmtree(self.work, ignore_errors=True)


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": model, "python": platform.python_version(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def _failures(step: dict[str, Any]) -> list[str]:
    """Why a ramp step does not count as good (empty: it does)."""
    out = []
    p99 = step.get("pacing_p99_ms")
    if p99 is None or p99 > PACING_LIMIT_MS:
        out.append(f"pacing p99 {p99} ms > {PACING_LIMIT_MS}")
    if step["drops"]:
        out.append(f"{step['drops']} drops")
    if not step["valid"]:
        out.extend(step["problems"])
    return out


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    with Bench(args, args.sessions) as b:
        b.add_sessions(args.sessions)
        time.sleep(args.warmup)
        return b.measure(args.seconds)


COMPARED = ("cpu_ms_per_session_second", "pss_mb_per_session", "rss_mb_per_session", "prod_turn_end_p99_ms",
            "prod_playout_p99_ms", "bargein_p99_ms", "pacing_p99_ms", "drops", "valid")


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    """The same load twice in one run: shared shard processes, then one media + AI process per session."""
    shared = _fixed(argparse.Namespace(**{**vars(args), "per_session_process": False}))
    per = _fixed(args)
    ratio = None
    if shared.get("cpu_ms_per_session_second") and per.get("cpu_ms_per_session_second"):
        ratio = round(per["cpu_ms_per_session_second"] / shared["cpu_ms_per_session_second"], 2)
    return {**per, "shared": {k: shared.get(k) for k in COMPARED}, "cpu_ratio_per_session_vs_shared": ratio,
            "machine": _machine()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        args.sessions, args.seconds, args.warmup = min(args.sessions, 3), min(args.seconds, 10.0), 6.0
        args.ramp = False
    if args.sessions < 1 or args.seconds <= 0:
        raise SystemExit("--sessions must be ≥ 1 and --seconds > 0")
    if not args.ramp and args.per_session_process:
        return _compare(args)
    if not args.ramp:
        return {**_fixed(args), "machine": _machine()}
    steps: list[dict[str, Any]] = []
    last_good: dict[str, Any] | None = None
    with Bench(args, args.ramp_max) as b:
        while b.active < args.ramp_max:
            b.add_sessions(args.ramp_step)
            time.sleep(args.warmup)
            step = b.measure(args.seconds)
            failures = _failures(step)
            steps.append({**{k: step[k] for k in ("sessions", "cpu_ms_per_session_second", "pacing_p99_ms",
                                                  "drops", "prod_turn_end_p99_ms", "prod_playout_p99_ms",
                                                  "bargein_p99_ms", "valid", "cpu_cores_used")},
                          "failed": failures})
            if failures:
                break
            last_good = step
    result = dict(last_good or steps[-1])
    result["ramp_max_sessions"] = last_good["sessions"] if last_good else 0
    cores = result.get("worker_cpus") or 1
    result["sessions_per_core"] = round(result["ramp_max_sessions"] / cores, 1)
    result["ramp_steps"] = steps
    result["machine"] = _machine()
    return result
