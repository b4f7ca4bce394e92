"""Keypad digits and tool calls end to end: the real AI worker on a real shm segment, the Live layer on the
real google-genai SDK, the Live emulator (a subprocess) and, for tools, a real local HTTP endpoint.

The test plays the media worker: it pushes DTMF events into the slot's event queue exactly as
workers/media/worker.py does (``DTMF`` digit code, then ``DTMF_END`` duration) and reads the downlink.
The emulator records every realtime text and tool response it receives per conversation, so the tests
assert what the model got, not only that something was sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.config import load_config, replace
from shm.segment import EventCode
from tests.ai.live_worker import NO_DISCLOSURE, running, until
from tests.harness.audio import dominant_frequency
from tests.harness.emulator import start_emulator
from tests.harness.shm import activate_slot, shard_segment
from tests.harness.toolserver import tool_server
from workers.ai.dtmf import DIGITS, dtmf_text
from workers.ai.worker import AiWorker

pytestmark = pytest.mark.timeout(180)

TOOLS = [{"name": "lookup_order", "description": "Find an order by its number",
          "parameters": {"type": "object", "properties": {"heard": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    # tool_calls: a turn first calls the first declared function (sessions that declare none just answer)
    with start_emulator(tmp_path_factory.mktemp("emu"), pacing="burst", reply="tone",
                        tool_calls=True) as e:
        yield e


@pytest.fixture
def seg():
    with shard_segment(slots=2, uplink_bytes=64000, downlink_bytes=384000) as s:
        yield s


@pytest.fixture
def srv():
    with tool_server() as s:
        yield s


def make_cfg(emu, tmp_path: Path, **model: Any):
    base = {"api_key": emu.api_key, "base_url": emu.base_url, "ca_file": emu.ca_file,
            "greeting": "", "hold_prompt": ""}
    return replace(load_config(None, env={}), model={**base, **model}, paths={"state_dir": str(tmp_path)},
                   compliance=NO_DISCLOSURE)


def tools_cfg(emu, tmp_path: Path, url: str, **model: Any):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return make_cfg(emu, tmp_path, tools_file=str(path), tools_url=url, **model)


async def press(slot, keys: str, gap: float = 0.15) -> None:
    """Key presses as the media worker reports them (one DTMF + one DTMF_END per key)."""
    for k in keys:
        assert slot.push_event(EventCode.DTMF, DIGITS.index(k))
        assert slot.push_event(EventCode.DTMF_END, 120)
        await asyncio.sleep(gap)


async def live_session(w: AiWorker, slot, emu) -> str:
    await until(lambda: slot.model_state == "live", what="model live")
    sid = w.calls[slot.index].live.server_session_id
    assert sid
    return sid


def model_audio(slot) -> np.ndarray:
    n = slot.downlink.available()
    return np.frombuffer(slot.downlink.read(n) if n else b"", np.int16)


async def test_keypad_entry_reaches_the_model_exactly(emu, seg, tmp_path) -> None:
    slot = seg.slot(0)
    async with running(make_cfg(emu, tmp_path), seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live_session(w, slot, emu)
        await press(slot, "1234#")  # typed like a person: 150 ms apart, well inside dtmf_flush_ms
        entry = dtmf_text("1234#")
        await until(lambda: emu.session(sid)["texts"] == [entry], what="digits at the model")
        # the model answered that entry as a turn: its transcript carries the digits, its audio plays
        await until(lambda: slot.transcript == f"model: tone reply to text: {entry}", what="reply")
        await until(lambda: slot.downlink.available() >= 24000 * 2 // 2, what="reply audio")
        assert abs(dominant_frequency(model_audio(slot), 24000) - 440) < 10
        assert slot.counters.get("dtmf_sent") == 5 and w.stats.activity_starts == 0
        await until(lambda: bool(slot.resume_handle), what="resume handle after the keypad turn")
        # a lone menu choice goes after model.dtmf_flush_ms of quiet, not with the next entry
        t0 = time.monotonic()
        await press(slot, "7", gap=0)
        await until(lambda: emu.session(sid)["texts"] == [entry, dtmf_text("7")], what="lone digit")
        assert 0.9 <= time.monotonic() - t0 < 5.0
        hist = emu.session(sid)["history"]
        assert f"user: text: {entry}" in hist and f"user: text: {dtmf_text('7')}" in hist


async def test_tool_call_is_answered_from_the_endpoint(emu, seg, tmp_path, srv) -> None:
    slot = seg.slot(0)
    async with running(tools_cfg(emu, tmp_path, srv.url("/ok")), seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live_session(w, slot, emu)
        await press(slot, "42#", gap=0.05)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="tool response at the model")
        (req,) = srv.requests
        heard = f"heard 0.00 seconds of audio and text: {dtmf_text('42#')}"
        assert req["session_id"] == slot.session_id and req["name"] == "lookup_order"
        assert req["args"] == {"heard": heard} and req["call_id"]
        (fr,) = emu.session(sid)["tool_responses"]
        result = {"output": {"name": "lookup_order", "echo": {"heard": heard}}, "status": "ok"}
        assert fr == {"id": req["call_id"], "name": "lookup_order", "response": result}
        # the turn did not hang: the model went on to speak and complete it
        await until(lambda: slot.transcript.startswith("model: tool lookup_order said"), what="reply")
        assert json.loads(slot.transcript.split(" said ", 1)[1]) == result
        await until(lambda: slot.downlink.available() >= 24000, what="reply audio")
        assert slot.counters.get("tool_calls") == 1 and slot.counters.get("tool_errors") == 0


async def test_38_non_blocking_tool_answered_with_the_files_scheduling(emu, seg, tmp_path, srv) -> None:
    """A 3.8 model: the tools file's function is declared NON_BLOCKING (nothing said in the file), the
    model answers the caller while the tool runs, and the endpoint's result goes back with the file's
    ``scheduling`` (WHEN_IDLE: spoken after the answer, as a model turn of its own)."""
    slot = seg.slot(0)
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{**TOOLS[0], "scheduling": "WHEN_IDLE"}]))
    cfg = make_cfg(emu, tmp_path, tools_file=str(path), tools_url=srv.url("/ok"),
                   model="gemini-3.8-live-preview")
    assert cfg.model.proactive_audio  # always on for 3.8
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live_session(w, slot, emu)
        setup = emu.session(sid)["setup"]
        assert setup["behaviors"] == {"lookup_order": "NON_BLOCKING"} and setup["proactive_audio"] is True
        await press(slot, "42#", gap=0.05)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="tool response at the model")
        (fr,) = emu.session(sid)["tool_responses"]
        assert fr["scheduling"] == "WHEN_IDLE" and fr["response"]["status"] == "ok"
        await until(lambda: slot.transcript.startswith("model: tool lookup_order said"), what="result spoken")
        hist = emu.session(sid)["history"]
        answer = hist.index("model: tone reply to text: " + dtmf_text("42#"))
        assert answer < max(i for i, h in enumerate(hist) if h.startswith("model: tool lookup_order said"))


@pytest.mark.parametrize(("path", "needle"), [
    ("/status/503", "tool endpoint answered HTTP 503"),
    ("/slow/5", "did not answer within 0.5 s"),
    ("", "no tool endpoint is configured"),
])
async def test_failing_tool_is_answered_with_an_error(emu, seg, tmp_path, srv, path, needle) -> None:
    slot = seg.slot(1)
    url = srv.url(path) if path else ""
    async with running(tools_cfg(emu, tmp_path, url, tools_timeout_seconds=0.5), seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live_session(w, slot, emu)
        await press(slot, "9#", gap=0.05)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="error result at the model")
        (fr,) = emu.session(sid)["tool_responses"]
        assert fr["name"] == "lookup_order" and needle in fr["response"]["error"]
        assert fr["response"]["status"] == "error" and isinstance(fr["response"]["retryable"], bool)
        await until(lambda: slot.transcript.startswith("model: tool lookup_order said"), what="reply")
        assert slot.counters.get("tool_calls") == 1 and slot.counters.get("tool_errors") == 1


async def test_slow_tool_of_one_call_delays_no_other(emu, seg, tmp_path, srv) -> None:
    a, b = seg.slot(0), seg.slot(1)
    cfg = tools_cfg(emu, tmp_path, srv.url("/ok"), tools_timeout_seconds=10.0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(a, options={"greeting": ""})
        activate_slot(b, options={"greeting": ""})
        sid_a, sid_b = await live_session(w, a, emu), await live_session(w, b, emu)
        srv.delay[a.session_id] = 4.0
        await press(a, "1#", gap=0.0)
        await until(lambda: len(srv.requests) == 1, what="slow tool in flight")
        t0 = time.monotonic()
        await press(b, "2#", gap=0.0)
        await until(lambda: len(emu.session(sid_b)["tool_responses"]) == 1, what="fast tool answered")
        fast = time.monotonic() - t0
        assert emu.session(sid_a)["tool_responses"] == []  # still waiting for its own tool
        assert fast < 3.0, fast  # ~0.2 s (event poll + round trips); the slow tool holds 4 s
        await until(lambda: len(emu.session(sid_a)["tool_responses"]) == 1, what="slow tool answered")
        assert "output" in emu.session(sid_a)["tool_responses"][0]["response"]
        assert a.counters.get("tool_errors") == 0 and b.counters.get("tool_errors") == 0


async def test_cancelled_tool_call_is_never_answered(emu, seg, tmp_path, srv) -> None:
    slot = seg.slot(0)
    cfg = tools_cfg(emu, tmp_path, srv.url("/ok"), tools_timeout_seconds=10.0)
    async with running(cfg, seg, emu, tmp_path) as w:
        activate_slot(slot, options={"greeting": ""})
        sid = await live_session(w, slot, emu)
        srv.delay[slot.session_id] = 3.0
        t0 = time.monotonic()
        await press(slot, "1#", gap=0.0)
        await until(lambda: len(srv.requests) == 1, what="tool in flight")
        assert w.tools.in_flight(w.calls[0].key) == 1
        srv.delay.clear()
        # a new caller turn (the next entry) barges in: the emulator cancels the pending call
        await press(slot, "2#", gap=0.0)
        await until(lambda: len(emu.session(sid)["tool_responses"]) == 1, what="second call answered")
        first, second = srv.requests[0]["call_id"], srv.requests[1]["call_id"]
        assert emu.session(sid)["tool_responses"][0]["id"] == second
        assert w.tools.in_flight(w.calls[0].key) == 0
        await asyncio.sleep(max(0.0, t0 + 3.5 - time.monotonic()))  # past the first tool's answer time
        assert [r["id"] for r in emu.session(sid)["tool_responses"]] == [second] and first != second
        assert slot.counters.get("tool_calls") == 2 and slot.counters.get("tool_errors") == 0
