"""`voice-appliance bench records --smoke --json`: a real PostgreSQL, per-call costs reported."""

from __future__ import annotations

import json
import subprocess
import sys


def test_records_bench_smoke_json() -> None:
    out = subprocess.run([sys.executable, "-m", "appliance", "bench", "records", "--smoke", "--json"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    result = json.loads(out)
    assert result["calls"] == 20 and result["items_per_call"] == 83
    for key in ("append_us_per_item", "writer_cpu_ms_per_call", "writer_wall_ms_per_call",
                "postgres_cpu_ms_per_call"):
        assert result[key] > 0, key
