"""Smoke test of `bench box`: real WebRTC callers (libdatachannel in Node.js) through a real Janus (NoSIP,
in a netns) into a running supervisor with the echo emulator. Asserts the callers connected, each turn
was answered (mouth-to-ear measured at the caller from the echo), RTP came back paced, and the CPU of
Janus and of the appliance was measured. Not timed: the figures go to docs/benchmarks.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import box
from tests.harness.emulator import start_emulator
from tests.harness.janus import janus_in_netns
from tests.harness.redis import redis_server
from tests.supervisor.conftest import NODE_MODULES, start_supervisor, stop_supervisor

pytestmark = [pytest.mark.janus, pytest.mark.slow]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_box_smoke_real_webrtc_through_janus(tmp_path) -> None:
    (tmp_path / "sup").mkdir()
    with redis_server(tmp_path) as redis_srv, janus_in_netns() as janus, \
            start_emulator(tmp_path / "emu", reply="echo") as emu:
        sp = start_supervisor(tmp_path / "sup", redis_srv.url, janus, slots=4, extra={
            "model": {"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file},
            "limits": {"session_creates_per_minute": 1000, "signalling_per_minute": 10000},
        })
        try:
            pids = {"janus": [janus.pid], "appliance": [sp.proc.pid, *_children(sp.proc.pid)]}
            r = box.run_load(sp.api, box.mint_tokens(sp.private_key, 2), 2, 14.0, pids,
                             node_path=NODE_MODULES, bind=janus.host_ip)
        finally:
            stop_supervisor(sp)
    print("\nbox smoke:", r)
    assert r["connected"] == 2 and not r["errors"], (r, sp.log_tail())
    assert r["turns"] >= 2 and r["replies"] >= r["turns"] - 1, r  # the echo of each turn came back
    assert 50 < r["mouth_to_ear_ms_p50"] < 5000
    assert r["pacing_ms_p99"] is not None and r["loss_ratio"] < 0.05
    assert r["janus_ms_per_call_second"] and r["janus_ms_per_call_second"] > 0
    assert r["appliance_ms_per_call_second"] and r["appliance_ms_per_call_second"] > 0
