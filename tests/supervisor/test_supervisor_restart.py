"""Calls outlive the supervisor: kill -9 of the supervisor mid-call, and `voice-appliance restart` (in
place, no drain). Real Janus (netns), aiortc caller, the echo emulator; the content of what the caller
hears is checked by envelope correlation (tests/supervisor/test_voice_loop.py).

Adoption protocol: docs/architecture.md "Supervisor restart and adoption".
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest

from appliance.arbiter import worker_cmdline_matches
from appliance.procs import pid_gone
from shm.segment import ShardSegment, segment_name
from tests.harness.audio import speech
from tests.supervisor.conftest import (
    open_call,
    relaunch_supervisor,
    start_supervisor,
    stop_supervisor,
    wait_until,
)
from tests.supervisor.rtc import RATE, caller
from tests.supervisor.test_voice_loop import say_and_hear, wait_quiet

FOX = "the quick brown fox jumps over the lazy dog"

pytestmark = [pytest.mark.janus, pytest.mark.slow]


@pytest.fixture(scope="module")
def sup(tmp_path_factory, redis_srv, janus, emulator):
    sp = start_supervisor(tmp_path_factory.mktemp("sup"), redis_srv.url, janus, slots=2, extra={
        "model": {"api_key": emulator.api_key, "base_url": emulator.base_url, "ca_file": emulator.ca_file,
                  "max_retries": 5},
    })
    yield sp
    seg = ShardSegment.attach(segment_name(sp.instance, 0))
    workers = beats(seg)
    seg.close()
    stop_supervisor(sp)
    for pid in workers.values():  # a test that failed while no supervisor ran leaves its workers
        name = segment_name(sp.instance, 0)
        if pid and not pid_gone(pid) and any(worker_cmdline_matches(pid, r, name) for r in ("media", "ai")):
            os.kill(pid, signal.SIGKILL)


def beats(seg: ShardSegment) -> dict[str, int]:
    return {role: seg.heartbeat_age(role)[0] for role in ("media", "ai")}


async def test_kill9_of_the_supervisor_keeps_the_call_and_a_new_one_adopts_it(sup, sub, janus):
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    auth = {"Authorization": f"Bearer {sup.token(sub)}"}
    pc, track, rec = await caller()
    try:
        async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
            sid = await open_call(http, auth, pc, sup)
            await wait_quiet(rec)
            corr, _ = await say_and_hear(track, rec, speech(FOX, RATE))
            assert corr > 0.6
            workers = beats(seg)
            sup.proc.kill()
            await asyncio.to_thread(sup.proc.wait, 10)
            # no supervisor at all: the workers keep the call going (audio both ways, checked by content)
            try:
                corr, _ = await say_and_hear(track, rec, speech("a red balloon floats over seven green hills",
                                                                RATE), limit=20)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{janus.log_text()[-3000:]}\n{sup.log_tail(3000)}") from exc
            print(f"echo with no supervisor running: correlation {corr:.2f}")
            assert corr > 0.5 and not any(pid_gone(p) for p in workers.values())
            await asyncio.to_thread(relaunch_supervisor, sup)  # the caller (this loop) keeps running
            assert "call adopted" in sup.log_tail(20000)
            assert beats(seg) == workers  # adopted, not respawned
            info = (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()
            assert info["state"] == "active" and info["details"]["model_state"] == "live", info
            corr, _ = await say_and_hear(track, rec, speech("please remember the number four hundred", RATE),
                                         limit=20)
            print(f"echo after adoption: correlation {corr:.2f}")
            assert corr > 0.5 and pc.connectionState == "connected"
            # the new supervisor still commands the Janus handle and the slot: DELETE ends the call
            assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204
            await wait_until(lambda: seg.slot(0).snapshot() is None, what="slot closed")
            assert (await http.get(f"/v1/sessions/{sid}", headers=auth)).status_code == 404
    finally:
        await rec.stop()
        await pc.close()
        seg.close()


async def test_restart_in_place_keeps_the_call_and_janus_events_still_arrive(sup, sub):
    seg = ShardSegment.attach(segment_name(sup.instance, 0))
    auth = {"Authorization": f"Bearer {sup.token(sub)}"}
    pc, track, rec = await caller()
    try:
        async with httpx.AsyncClient(base_url=sup.api, timeout=30) as http:
            sid = await open_call(http, auth, pc, sup)
            await wait_quiet(rec)
            workers = beats(seg)
            pid = sup.proc.pid
            before = sup.log.read_text(errors="replace").count("supervisor ready")
            out = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "appliance", "restart", "--config", str(sup.config),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(out.communicate(), 20)
            assert out.returncode == 0, err.decode()
            await wait_until(lambda: sup.log.read_text(errors="replace").count("supervisor ready") > before,
                             limit=60, what="supervisor ready again")
            assert sup.proc.poll() is None and sup.proc.pid == pid  # same PID: systemd sees a reload
            assert beats(seg) == workers
            corr, _ = await say_and_hear(track, rec, speech(FOX, RATE),
                                         limit=20)
            print(f"echo after restart in place: correlation {corr:.2f}")
            assert corr > 0.5
            # the caller hangs up: Janus's event reaches the new supervisor on the same Janus session
            await pc.close()

            async def disconnected() -> bool:
                r = await http.get(f"/v1/sessions/{sid}", headers=auth)
                return r.status_code == 200 and r.json()["state"] == "disconnected"

            await wait_until(disconnected, limit=30, what="hangup seen by the adopted Janus session")
    finally:
        await rec.stop()
        await pc.close()
        seg.close()
