"""`voice-appliance bench chaos`: live calls on the pipeline harness, one fault at a time, with figures.

The harness is :class:`bench.pipeline.Bench` (real media and AI workers spawned by the real arbiter,
the real google-genai SDK against the Live emulator over TLS, synthetic callers sending real Opus RTP)
plus a Redis of its own that holds the model breaker's state (the box's default Redis is never touched).
Each fault runs in its own window on the same calls, after a baseline window without a fault:

- ``ai_worker_kill`` / ``media_worker_kill``: SIGKILL of every AI (media) worker; the arbiter restarts
  them and the replacements re-attach the slots;
- ``redis_kill``: SIGKILL of the breaker's Redis (the breaker falls back to its local state);
- ``goaway_storm``: the emulator sends goAway to every live session every 5 s;
- ``close_1011``: every live session closed abruptly with 1011;
- ``refuse_window``: the emulator refuses new connections for ``--outage`` seconds and every session is
  closed with 1011 at its start (the calls must reconnect into the refusal: breaker, degradation menu,
  recovery);
- ``stall_reads``: the emulator stops reading every session (the watchdog replaces the connection).

Not here, and why: the supervisor (this harness runs workers under the arbiter without the supervisor;
its SIGKILL/restart figures come from tests/supervisor/test_supervisor_restart.py), Janus and a caller
leg with ``netem`` loss/jitter (no Janus in this harness, and this kernel has no ``sch_netem``).

Per fault (JSON ``{"faults": {NAME: {...}}}``): ``calls``; ``calls_dropped`` (callers that got no
downlink packet in the window's last 2 s, or whose slot was freed); ``gap_p50_ms``/``gap_p99_ms`` over
callers of each caller's longest downlink RTP gap in the window (what a caller's jitter buffer would
have to conceal; the media worker sends every 20 ms, model audio or not); ``answered_ratio`` (callers
that heard at least one answer after the fault); ``recover_s`` (fault → the last caller's first
answer after it, so it includes up to one conversational turn: compare the baseline's figure);
``turns_unanswered``; ``worker_restarts``. ``words_lost`` is null: comparing the emulator's record of
each conversation with what every caller said is not built yet (the single-call tests measure it:
docs/reliability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench import pipeline

# redis_kill last: its Redis stays down for the rest of the run
FAULTS = ("ai_worker_kill", "media_worker_kill", "goaway_storm", "close_1011", "refuse_window", "stall_reads",
          "redis_kill")
DROP_AGE_MS = 2000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=40, help="concurrent calls (default 40)")
    parser.add_argument("--observe", type=float, default=20.0, help="seconds per fault window (default 20)")
    parser.add_argument("--outage", type=float, default=60.0, help="refuse_window length (default 60)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma list (default: all)")
    parser.add_argument("--smoke", action="store_true", help="short CI form: 4 calls, 3 faults, ~45 s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """A private redis-server (no persistence) for the breaker state."""

    def __init__(self, work: Path) -> None:
        self.port = _free_port()
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class EmulatorControl:
    """The emulator's control channel (HTTPS, its test CA)."""

    def __init__(self, cfg: Any) -> None:
        self.base = cfg.model.base_url
        self.key = cfg.emulator.api_key
        self.ctx = ssl.create_default_context(cafile=cfg.model.ca_file)

    def get(self, name: str, **params: Any) -> Any:
        q = urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v
                                    for k, v in params.items()})
        req = urllib.request.Request(f"{self.base}/emulator/{name}?{q}", headers={"x-goog-api-key": self.key})
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
            return json.loads(resp.read())

    def live_sessions(self) -> list[str]:
        return [s["session"] for s in self.get("sessions")["sessions"] if s.get("live")]

    def fault_all(self, action: str, **params: Any) -> int:
        n = 0
        for sid in self.live_sessions():
            with contextlib.suppress(OSError):
                self.get("fault", session=sid, action=action, **params)
                n += 1
        return n


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def _bench_args(args: argparse.Namespace, redis_url: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pipeline.add_arguments(p)
    pargs = p.parse_args([])
    pargs.sessions = args.sessions
    pargs.keep = args.keep
    pargs.set = [f'redis.url="{redis_url}"', "breaker.reset_seconds=5.0", "model.degraded_retry_seconds=2.0",
                 "model.max_retries=3", "degrade.wait_seconds=10.0"]
    return pargs


def _window(b: pipeline.Bench, fault: str, args: argparse.Namespace, ctl: EmulatorControl,
            redis: Redis) -> dict[str, Any]:
    assert b.host is not None and b.gen is not None
    pids0 = b.host.call("pids")
    b.gen.mark()
    t0 = time.monotonic()
    observe = args.observe
    match fault:
        case "ai_worker_kill" | "media_worker_kill":
            role = fault.split("_")[0]
            for name, pid in pids0["workers"].items():
                if name.startswith(role) and pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        case "redis_kill":
            redis.kill()
        case "goaway_storm":
            while time.monotonic() - t0 < observe / 2:
                ctl.fault_all("goaway", time_left_s=1.0)
                time.sleep(5.0)
        case "close_1011":
            ctl.fault_all("close", code=1011)
        case "refuse_window":
            ctl.get("config", refuse=True)
            try:
                ctl.fault_all("close", code=1011)
                time.sleep(args.outage)
            finally:
                ctl.get("config", refuse=False)
            observe += args.outage
        case "stall_reads":
            ctl.fault_all("stop_reading")
        case "none":
            pass
    time.sleep(max(0.0, observe - (time.monotonic() - t0)))
    r = b.gen.collect()
    pids1 = b.host.call("pids")
    n = b.active
    ages = dict(r["rx_last_age_ms"])
    dropped = sum(1 for i in range(n) if ages.get(i, 1e9) > DROP_AGE_MS)
    gaps = [g for _, g in r["rx_gap_max_ms"]]
    fault_end_ms = (args.outage * 1000.0) if fault == "refuse_window" else 0.0
    first_answer: dict[int, float] = {}
    for i, at in r["answers_ms"]:
        if at >= fault_end_ms and i not in first_answer:
            first_answer[i] = at
    recovered = len(first_answer) == n
    return {
        "calls": n,
        "calls_dropped": dropped,
        "gap_p50_ms": _pct(gaps, 50),
        "gap_p99_ms": _pct(gaps, 99),
        "words_lost": None,
        "recover_s": round(max(first_answer.values()) / 1000.0, 2) if recovered else None,
        "answered_ratio": round(len(first_answer) / n, 3) if n else 0.0,
        "turns_unanswered": r["no_reply"],
        "worker_restarts": pids1["restarts"] - pids0["restarts"],
        "window_s": round(time.monotonic() - t0, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if args.smoke:
        args.sessions, args.observe = min(args.sessions, 4), min(args.observe, 6.0)
        faults = ["ai_worker_kill", "close_1011", "redis_kill"]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise SystemExit(f"--faults: unknown {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    work = Path(tempfile.mkdtemp(prefix="va-chaos-"))
    redis = Redis(work)
    out: dict[str, Any] = {"faults": {}}
    t_start = time.monotonic()
    try:
        with pipeline.Bench(_bench_args(args, redis.url), args.sessions) as b:
            ctl = EmulatorControl(b.cfg)
            b.add_sessions(args.sessions)
            time.sleep(6.0 if args.smoke else 8.0)  # every caller past its first turn
            out["baseline"] = _window(b, "none", args, ctl, redis)
            for fault in faults:
                out["faults"][fault] = _window(b, fault, args, ctl, redis)
                time.sleep(1.0)
    finally:
        redis.kill()
        shutil.rmtree(work, ignore_errors=True)
    out["sessions"] = args.sessions
    out["observe_s"] = args.observe
    out["outage_s"] = args.outage
    out["seconds"] = round(time.monotonic() - t_start, 1)
    out["not_covered"] = {"supervisor_kill": "no supervisor in this harness (tests/supervisor figures)",
                          "janus_kill": "no Janus in this harness (tests/supervisor/test_janus_restart.py)",
                          "netem": "this kernel has no sch_netem; no caller-leg impairment",
                          "words_lost": "not measured here (single-call tests: docs/reliability.md)"}
    out["machine"] = pipeline._machine()
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out
