"""Short form of `voice-appliance bench chaos` (issue 15): real workers, emulator, callers and Redis; one
fault at a time. Asserts the JSON shape the issue asks for and the targets that hold even in a few
seconds on a loaded box: no call dropped by an AI-worker SIGKILL, a 1011 storm or a Redis SIGKILL, the
AI worker really restarted, and downlink RTP never stopping for long (the media worker keeps sending
while the AI worker is gone). Full figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = ("calls", "calls_dropped", "gap_p50_ms", "gap_p99_ms", "words_lost", "recover_s")


@pytest.mark.slow
def test_chaos_smoke_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "appliance", "bench", "chaos", "--smoke", "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    faults = out["faults"]
    assert set(faults) == {"ai_worker_kill", "close_1011", "redis_kill"}
    for name, f in faults.items():
        for key in KEYS:
            assert key in f, f"{name}: missing {key}"
        assert f["calls"] == 4 and f["calls_dropped"] == 0, (name, f)
        assert f["gap_p99_ms"] is not None and f["gap_p99_ms"] < 1500, (name, f)
    assert faults["ai_worker_kill"]["worker_restarts"] >= 1
    assert out["baseline"]["answered_ratio"] > 0  # the callers' turns were answered through the model
    assert out["seconds"] < 120
