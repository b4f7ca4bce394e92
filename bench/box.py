"""`voice-appliance bench box`: the whole box with real WebRTC — N calls (ICE, DTLS-SRTP, Opus) through
Janus NoSIP into the appliance, measured at the caller.

The pipeline benchmark replaces Janus with a synthetic RTP generator; this one does not. The callers are
libdatachannel peers in one Node.js process (``bench/webrtc_load.cjs``; npm ``node-datachannel``, which
``tests/e2e/package.json`` installs): C++ ICE/DTLS/SRTP, so the generator costs little next to what it
measures (aiortc would cost more per call than the appliance). They send pre-encoded Opus
(:mod:`bench.callers`: a ~2.5 s turn, then room noise while the emulator echoes it, ~40 % speech) on one
shared 20 ms clock, each call at its own phase of the script, and log every packet both ways.

It runs against a running stack (``voice-appliance run``, or the test harness in
``tests/bench/test_box.py``): ``--api`` and a dev JWT private key (``--jwt-key``) to mint one token per
caller; ``--pids`` names Janus and the appliance processes whose CPU is measured (``janus=PID``,
``appliance=PID,PID…``). Reported per run:
- ``janus_ms_per_call_second`` / ``appliance_ms_per_call_second``: CPU (utime+stime from /proc) per call
  per second of audio;
- at the caller: ``mouth_to_ear_ms`` p50/p99 (last speech packet sent → first reply packet received
  above -70 dBFS; the echo emulator answers each turn with the caller's own speech), downlink pacing
  (|inter-arrival - 20 ms| p99), loss (sequence gaps), calls that never connected.
``--ramp`` steps N up until a criterion fails (pacing p99 > 5 ms, loss > 1 %, a call not connected)
and reports the last passing N: the box's maximum on this machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import callers, procstat

SCRIPT = Path(__file__).with_name("webrtc_load.cjs")
DEFAULT_NODE_PATH = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "node_modules"
REPLY_DBFS = -70.0  # a reply packet (the echo carries the callers' -45 dBFS noise floor; idle is silence)


@dataclass(frozen=True)
class Timeline:
    """What every caller sends, frame by frame: the payloads and which frames end a speech turn."""

    payloads: list[bytes]
    turn_ends: list[int]  # frame index of the last speech frame of each turn

    @staticmethod
    def build(audio: callers.CallerAudio, seconds: float, lead_s: float = 3.0,
              gap_s: float = 4.0) -> Timeline:
        frames = int(seconds * 50)
        out: list[bytes] = []
        ends: list[int] = []
        quiet = audio.silence

        def room(n: int) -> None:
            for _ in range(n):
                out.append(quiet[len(out) % len(quiet)])

        room(int(lead_s * 50))  # the greeting plays first
        while len(out) < frames:
            out.extend(audio.speech)
            ends.append(len(out) - 1)
            room(int(gap_s * 50))
        return Timeline(out[:frames], [e for e in ends if e < frames - 50])

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            for p in self.payloads:
                f.write(struct.pack("<H", len(p)) + p)


def _read_rx(path: Path) -> list[tuple[int, int, int, bytes]]:
    data = path.read_bytes() if path.exists() else b""
    out, off = [], 0
    while off + 16 <= len(data):
        t, seq, ts, n = struct.unpack_from("<QHIH", data, off)
        off += 16
        out.append((t, seq, ts, data[off:off + n]))
        off += n
    return out


def _read_tx(path: Path) -> dict[int, int]:
    data = path.read_bytes() if path.exists() else b""
    return {n: t for t, n in (struct.unpack_from("<QI", data, off) for off in range(0, len(data) - 11, 12))}


def analyse_call(rx: list[tuple[int, int, int, bytes]], tx: dict[int, int],
                 timeline: Timeline) -> dict[str, Any]:
    """Mouth-to-ear per turn, downlink pacing and loss for one call."""
    meter = callers.LevelMeter()
    levels = [meter.dbfs(p)[0] for (_t, _s, _ts, p) in rx]
    times = np.array([t for (t, _s, _ts, _p) in rx], dtype=np.int64)
    m2e: list[float] = []
    for end in timeline.turn_ends:
        if end not in tx:
            continue
        t_end = tx[end]
        nxt = tx.get(end + 1 + int(3.5 * 50), t_end + int(3.5e9))
        for t, lvl in zip(times, levels, strict=True):
            if t_end < t < nxt and lvl > REPLY_DBFS:
                m2e.append((t - t_end) / 1e6)
                break
    gaps = np.diff(times) / 1e6 if len(times) > 1 else np.array([])
    seqs = [s for (_t, s, _ts, _p) in rx]
    lost = 0
    for a, b in itertools.pairwise(seqs):
        d = (b - a) & 0xFFFF
        if 1 < d < 1000:
            lost += d - 1
    return {"rx": len(rx), "lost": lost, "turns": len(timeline.turn_ends), "replies": len(m2e), "m2e": m2e,
            "pacing_err": list(np.abs(gaps[1:] - 20.0)) if len(gaps) > 1 else []}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def mint_tokens(key: bytes, n: int) -> list[str]:
    """One caller token per call (own ``sub`` each, as real callers). ``iss`` is `voice-appliance run`'s
    development issuer (a stack without ``auth.issuer`` ignores it)."""
    from appliance.runner import DEV_ISSUER
    from appliance.token import mint

    return [mint(key, sub=f"box-bench-{i}", audience="voice-appliance", scope="voice:session",
                 issuer=DEV_ISSUER, ttl_seconds=900) for i in range(n)]


def run_load(api: str, tokens: list[str], calls: int, seconds: float, pids: dict[str, list[int]],
             node_path: Path = DEFAULT_NODE_PATH, bind: str | None = None,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run of ``calls`` WebRTC callers for ``seconds``; returns the measured figures."""
    if shutil.which("node") is None:
        raise RuntimeError("node is not installed (apt-get install nodejs)")
    audio = callers.prepare()
    timeline = Timeline.build(audio, seconds)
    with tempfile.TemporaryDirectory(prefix="va-box-") as tmp:
        out = Path(tmp)
        timeline.write(out / "payloads.bin")
        cfg = {"api": api, "tokens": tokens, "calls": calls, "seconds": seconds,
               "payloads": str(out / "payloads.bin"), "out_dir": str(out), **({"bind": bind} if bind else {})}
        all_pids = [p for group in pids.values() for p in group]
        proc = subprocess.Popen(["node", str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {}), "NODE_PATH": str(node_path)})
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(cfg))
        proc.stdin.close()
        events: list[dict[str, Any]] = []
        before = after = None
        t_start = t_end = 0.0
        for line in proc.stdout:
            ev = json.loads(line)
            events.append(ev)
            if ev["event"] == "up":
                before, t_start = procstat.sample(all_pids), time.monotonic()
            elif ev["event"] == "done":
                after, t_end = procstat.sample(all_pids), time.monotonic()
        proc.wait(60)
        err = proc.stderr.read() if proc.stderr else ""
        up = next((e for e in events if e["event"] == "up"), None)
        if up is None:
            raise RuntimeError(f"callers never came up: {events[-5:]} {err[-2000:]}")
        results = [analyse_call(_read_rx(out / f"call{i}.rx"), _read_tx(out / f"call{i}.tx"), timeline)
                   for i in range(calls) if (out / f"call{i}.tx").exists()]
    audio_seconds = max(t_end - t_start - 3.0, 1e-6)  # the node script waits 3 s after its last frame

    def cpu_ms(group: str) -> float | None:
        if before is None or after is None or not pids.get(group):
            return None
        used = sum(after.cpu.get(p, 0.0) - before.cpu.get(p, 0.0) for p in pids[group])
        return round(used * 1000 / (max(up["open"], 1) * audio_seconds), 3)

    m2e = [v for r in results for v in r["m2e"]]
    pacing = [v for r in results for v in r["pacing_err"]]
    rx = sum(r["rx"] for r in results)
    lost = sum(r["lost"] for r in results)
    return {
        "calls": calls, "connected": up["open"], "errors": [e for e in events if e["event"] == "error"][:5],
        "setup_retries": sum(1 for e in events if e["event"] == "retry"),
        "audio_seconds": round(audio_seconds, 1),
        "answer_ms_p50": _pct([e["ms"] for e in events if e["event"] == "answer_ms"], 50),
        "mouth_to_ear_ms_p50": _pct(m2e, 50), "mouth_to_ear_ms_p99": _pct(m2e, 99),
        "turns": sum(r["turns"] for r in results), "replies": len(m2e),
        "pacing_ms_p99": _pct(pacing, 99), "loss_ratio": round(lost / max(rx + lost, 1), 4),
        "janus_ms_per_call_second": cpu_ms("janus"), "appliance_ms_per_call_second": cpu_ms("appliance"),
    }


def passes(r: dict[str, Any]) -> bool:
    return (r["connected"] == r["calls"] and (r["pacing_ms_p99"] or 99) <= 5.0 and r["loss_ratio"] <= 0.01
            and r["replies"] >= 0.9 * r["turns"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", required=False, default="", help="session API base URL of a running stack")
    p.add_argument("--jwt-key", type=Path, help="dev JWT private key (of `voice-appliance run`: var/…)")
    p.add_argument("--pids", default="", help="janus=PID;appliance=PID,PID,... (CPU measured)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--ramp", default="", help="comma-separated call counts, e.g. 10,20,40,60")
    p.add_argument("--smoke", action="store_true", help="2 calls for 12 s")


def parse_pids(text: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for part in filter(None, text.split(";")):
        name, _, values = part.partition("=")
        out[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.api or not args.jwt_key:
        raise SystemExit("bench box needs --api and --jwt-key of a running stack (see the module docstring)")
    pids = parse_pids(args.pids)
    if args.smoke:
        args.calls, args.seconds, args.ramp = 2, 12.0, ""
    steps = [int(x) for x in args.ramp.split(",")] if args.ramp else [args.calls]
    rows = []
    for n in steps:
        r = run_load(args.api, mint_tokens(args.jwt_key.read_bytes(), n), n, args.seconds, pids)
        r["pass"] = passes(r)
        rows.append(r)
        if args.ramp and not r["pass"]:
            break
    best = max((r["calls"] for r in rows if r["pass"]), default=0)
    return {"bench": "box", "runs": rows, "max_calls_passing": best}
