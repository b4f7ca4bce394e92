"""Calls survive a Janus restart from the caller's side: the demo page in Chromium is connected, Janus is
SIGKILLed and started again in its namespace; the page notices (ICE disconnected / the session reads
``disconnected``), re-offers with its resume token and is connected again on a fresh Janus leg, same
session. Measured: Janus up → page connected again, and → caller RTP at the media worker on the new leg.

Client protocol: docs/architecture.md "Client resume protocol". Own Janus per test (it gets killed).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from shm.segment import ShardSegment, segment_name
from tests.harness.janus import janus_available, janus_in_netns
from tests.supervisor.conftest import NODE_MODULES, start_supervisor, stop_supervisor, wait_until

pytestmark = [pytest.mark.janus, pytest.mark.slow]


def leg(seg: ShardSegment, sid: str) -> tuple[tuple[int, int], int] | None:
    """((slot, generation), caller RTP packets) of the slot carrying ``sid``, if any."""
    for slot in seg.slots():
        info = slot.snapshot()
        if info is not None and info.session_id == sid:
            return (slot.index, info.generation), int(slot.counters.get("rx_packets"))
    return None


async def test_demo_page_resumes_after_a_janus_restart(tmp_path, redis_srv):
    if not janus_available() or not NODE_MODULES.exists():
        pytest.skip("janus/netns or the e2e node modules not available")
    with janus_in_netns() as janus:
        sp = start_supervisor(tmp_path, redis_srv.url, janus, slots=2)
        seg = ShardSegment.attach(segment_name(sp.instance, 0))
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
        proc = await asyncio.create_subprocess_exec(
            "node", str(Path(__file__).with_name("demo_resume.js")), sp.api + "/", "8000",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 90)
            assert line, (await proc.stderr.read()).decode()[-3000:] + sp.log_tail()
            sid = json.loads(line)["session_id"]
            first = await wait_until(lambda: (leg(seg, sid) or ((0, 0), 0))[1] > 20 and leg(seg, sid),
                                     what="caller RTP on the first leg")
            janus.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(janus.start)
            t_up = time.monotonic()

            def new_leg_audio() -> bool:
                now = leg(seg, sid)
                return now is not None and now[0] != first[0] and now[1] > 0

            audio = asyncio.ensure_future(wait_until(new_leg_audio, limit=60, step=0.02,
                                                     what="caller RTP on a fresh Janus leg"))
            line = await asyncio.wait_for(proc.stdout.readline(), 90)
            t_connected = time.monotonic() - t_up
            assert line, (await proc.stderr.read()).decode()[-3000:] + sp.log_tail()
            resumed = json.loads(line)
            assert resumed["event"] == "resumed" and resumed["resumes"] >= 1, resumed
            assert resumed["session_id"] == sid  # same box: the conversation continues under its id
            # the call was created with the JWT and resumed with its own session token (a call may
            # outlive the JWT the page started with)
            assert resumed["posts"][0] == "jwt" and set(resumed["posts"][1:]) == {"session_token"}, resumed
            await audio
            t_audio = time.monotonic() - t_up
            print(f"Janus up → page connected again {t_connected:.2f} s, caller audio on the new leg "
                  f"{t_audio:.2f} s")
            # target 3 s (issue 15); the bound leaves room for a loaded 2-core CI box, the figure is printed
            assert t_audio < 10.0
            assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["event"] == "hungup"
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            seg.close()
            stop_supervisor(sp)
