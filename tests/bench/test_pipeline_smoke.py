"""Smoke test of `voice-appliance bench pipeline`: it runs end to end and its JSON is complete and sane.

This is not a timed test: it asserts that the benchmark measured something real (RTP came back,
CPU was spent by the workers, at least one caller turn was answered through VAD → emulator → RTP),
not how fast. The full benchmark and its numbers live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

REQUIRED = ("sessions", "duty", "cpu_ms_per_session_second", "prod_turn_end_p99_ms", "prod_playout_p99_ms",
            "bargein_p99_ms", "pacing_p99_ms", "drops", "rss_mb_per_session")


@pytest.mark.slow
def test_pipeline_smoke_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "bench", "pipeline", "--smoke", "--json"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in REQUIRED:
        assert key in out, f"missing {key}"
    assert out["sessions"] == 3 and out["duty"] == "realistic"
    assert out["rx_packets"] > 0 and out["tx_packets"] > 0
    # the workers really worked, and not absurdly (a session-second of audio is far below a CPU-second)
    assert 0 < out["cpu_ms_per_session_second"] < 1000
    assert 1 < out["rss_mb_per_session"] < 4096
    assert out["pacing_p99_ms"] is not None and 0 <= out["pacing_p99_ms"] < 1000
    assert out["drops"] >= 0 and out["worker_restarts"] == 0
    # a caller turn went through VAD → the emulator (real SDK over TLS) → echo → RTP and was heard
    assert out["turn_e2e_n"] >= 1, out
    assert out["turn_e2e_p50_ms"] > 0
    # ... and the workers' production histograms (va_turn_latency_seconds) saw the same turns
    assert out["prod_turn_end_n"] >= 1 and out["prod_e2e_n"] >= 1, out
    assert out["prod_e2e_p50_ms"] > 0 and out["prod_playout_p50_ms"] is not None
