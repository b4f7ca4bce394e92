"""The shm benchmark's short form runs and reports the keys `voice-appliance bench shm --json` promises."""

from __future__ import annotations

import argparse

from bench import shm_bench


def test_bench_smoke_reports_required_keys() -> None:
    p = argparse.ArgumentParser()
    shm_bench.add_arguments(p)
    res = shm_bench.run(p.parse_args(["--smoke", "--latency-frames", "100"]))
    for key in ("cpu_us_per_frame_write", "cpu_us_per_frame_read", "cross_process_latency_p99_us"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["latency_frames"] >= 90
    assert res["cross_process_latency_p50_us"] <= res["cross_process_latency_p99_us"]
