"""Traces through a running AI worker: the real worker process (``voice-appliance ai-worker``, as the
arbiter starts it) on a real shm segment, the real google-genai SDK against the Live emulator, a real
tool endpoint, and a real OTLP/HTTP receiver decoding the protobuf export (opentelemetry-proto).

The test plays the media worker: it writes the caller's speech into the uplink and takes the answer out
of the downlink (its first read is the turn's ``playback`` moment). One call gives: one trace whose id
derives from the session id (so the supervisor's ``call`` span is its root), ``turn`` spans with caller
speech → ``activity_end`` → ``model_first_audio`` → ``playback`` → ``turn_complete`` and, for a turn the
caller talks over, ``barge_in``; a ``tool_call`` span and a ``resume`` span (goAway); and the worker's
JSON log lines carry the trace id, and inside a span that span's id."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance import tracing
from appliance.procs import pid_gone
from tests.ai.audio import frames, silence
from tests.ai.live_worker import until
from tests.harness.emulator import start_emulator
from tests.harness.otlp import OtlpReceiver
from tests.harness.procs import stop
from tests.harness.shm import activate_slot, shard_segment
from tests.harness.toolserver import tool_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SID = "box1.TrAcEsThRoUgHaWoRkEr0"
TOOLS = [{"name": "lookup_order", "description": "Find an order by its number",
          "parameters": {"type": "object", "properties": {"heard": {"type": "string"}}}}]


async def speak(slot, pcm: np.ndarray, speed: float = 2.0) -> None:
    for f in frames(pcm):
        assert slot.uplink.write(f), "uplink ring full"
        await asyncio.sleep(0.02 / speed)


def play(slot) -> int:
    """The media worker's part: take what the downlink holds (moves its read cursor)."""
    n = slot.downlink.available()
    if n:
        slot.downlink.read(n)
    return n


def start_worker(segment: str, cfg: Path, log: Path) -> subprocess.Popen:
    """The AI worker process as the arbiter starts it, JSON logs to ``log``."""
    exe = Path(sys.executable).parent / "voice-appliance"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "appliance"]
    return subprocess.Popen([*cmd, "ai-worker", "--shard", "0", "--segment", segment, "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                            env={"VA_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"})


def span_id(s) -> str:
    return s.span_id.hex()


async def test_one_trace_per_call_through_the_running_worker(tmp_path: Path, speech) -> None:
    rx = OtlpReceiver()
    with (start_emulator(tmp_path / "emu", pacing="burst", tool_calls=True) as emu, tool_server() as srv,
          shard_segment(slots=1, uplink_bytes=64000, downlink_bytes=384000) as seg):
        tools = tmp_path / "tools.json"
        tools.write_text(json.dumps(TOOLS))
        cfg = tmp_path / "appliance.toml"
        cfg.write_text(
            "[model]\n"
            f'api_key = "{emu.api_key}"\nbase_url = "{emu.base_url}"\nca_file = "{emu.ca_file}"\n'
            f'greeting = ""\ntools_file = "{tools}"\ntools_url = "{srv.url("/ok")}"\n'
            "[compliance]\nai_disclosure = false\nai_disclosure_off_reason = \"test: no greeting\"\n"
            f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
            f'[otel]\nendpoint = "{rx.url}"\n')
        slot = seg.slot(0)
        activate_slot(slot, session_id=SID, options={"greeting": ""})
        log = tmp_path / "worker.log"
        proc = start_worker(seg.name, cfg, log)
        try:
            await until(lambda: slot.model_state == "live", 40, "model live")
            # turn 1: the model calls the tool, then answers; the "media worker" plays the answer
            await speak(slot, np.concatenate([silence(0.3), speech, silence(0.8)]))
            await until(lambda: play(slot) > 0, 30, "answer audio")
            await until(lambda: bool(slot.resume_handle), 30, "turn 1 complete (resume handle)")
            await asyncio.sleep(0.5)
            play(slot)
            conv = next(s["session"] for s in emu.sessions() if s["live"])
            assert len(emu.session(conv)["tool_responses"]) == 1
            # turn 2: the answer waits in the downlink; the caller talks over it (barge-in)
            emu.fault(conv, "set", pacing="realtime")
            cursor = slot.downlink.write_cursor
            await speak(slot, np.concatenate([silence(0.3), speech, silence(0.8)]))
            await until(lambda: slot.downlink.write_cursor > cursor + 9600, 30,
                        "turn 2 answer in the downlink")
            epoch = slot.downlink.flush_epoch
            await speak(slot, speech[:16000], speed=1.0)
            await until(lambda: slot.downlink.flush_epoch > epoch, 10, "barge-in flush")
            await speak(slot, silence(1.0))
            # the model's goAway: the worker resumes the conversation on a new connection
            emu.fault(conv, "goaway", time_left_s=0.2)
            await until(lambda: emu.session(conv)["resumes"] >= 1, 40, "resume")
            await asyncio.sleep(0.5)
            slot.begin_close()  # the call ends: the worker detaches it (ending its open turn span)
            await until(lambda: b"call detached" in log.read_bytes(), 20, "call detached")
        finally:
            stop(proc, 20)
            assert pid_gone(proc.pid)
    try:
        assert proc.returncode == 0, log.read_text()[-3000:]
        await until(lambda: {s.name for _, s in rx.spans} >= {"turn", "tool_call", "resume"}, 10, "spans")
        spans: dict[str, list] = {}
        trace_id, call_span = tracing.call_ids(SID)
        for svc, s in rx.spans:
            assert svc["va.role"] == "ai" and svc["service.name"] == "voice-appliance"
            assert int.from_bytes(s.trace_id, "big") == trace_id, s.name  # one trace per call
            assert int.from_bytes(s.parent_span_id, "big") == call_span, s.name  # under the call span
            spans.setdefault(s.name, []).append(s)
        assert set(spans) == {"turn", "tool_call", "resume"}, set(spans)
        turns = sorted(spans["turn"], key=lambda s: s.start_time_unix_nano)
        assert len(turns) >= 3, [[e.name for e in t.events] for t in turns]  # 1, 2 and the talk-over
        t1 = [e.name for e in turns[0].events]
        assert t1[:2] == ["activity_end", "model_first_audio"], t1
        assert {"playback", "turn_complete"} <= set(t1), t1
        at = {e.name: e.time_unix_nano for e in turns[0].events}
        assert turns[0].start_time_unix_nano < at["activity_end"] < at["model_first_audio"] <= at["playback"]
        # the span lasts until the answer both arrived (turnComplete) and started playing
        assert abs(turns[0].end_time_unix_nano - max(at["playback"], at["turn_complete"])) < 1e6
        # the start is the caller's speech onset: before activityEnd by about the utterance (written at
        # twice real time here, so between half of it and all of it, plus the end-of-turn silence)
        speech_s = (at["activity_end"] - turns[0].start_time_unix_nano) / 1e9
        dur = len(speech) / 16000
        assert 0.4 * dur < speech_s < dur + 1.5, speech_s
        t2 = [e.name for e in turns[1].events]
        assert t2[:2] == ["activity_end", "model_first_audio"] and "barge_in" in t2, t2
        assert "playback" not in t2  # nobody played turn 2's answer
        tool, *_ = sorted(spans["tool_call"], key=lambda s: s.start_time_unix_nano)  # turn 2 calls one too
        attrs = {a.key: a.value.string_value for a in tool.attributes}
        assert attrs["tool"] == "lookup_order" and tool.status.code != 2  # answered by the endpoint
        assert turns[0].start_time_unix_nano < tool.start_time_unix_nano < at["model_first_audio"]
        resume = spans["resume"][0]
        assert {a.key: a.value.string_value for a in resume.attributes}["reason"] == "goAway"
        # JSON logs: every line naming the session carries its trace id; inside a span, that span's id
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        mine = [x for x in lines if x.get("session") == SID]
        assert {"call attached", "tool call", "resuming the Live session", "call detached"} <= {
            x["msg"] for x in mine}, [x["msg"] for x in mine]
        assert all(x["trace_id"] == f"{trace_id:032x}" for x in mine)
        by_call = {a.value.string_value: span_id(s) for s in spans["tool_call"] for a in s.attributes
                   if a.key == "call_id"}
        tool_lines = [x for x in mine if x["msg"] == "tool call"]
        assert len(tool_lines) == len(spans["tool_call"])
        assert all(x["span_id"] == by_call[x["call_id"]] for x in tool_lines)
        assert attrs["call_id"] == tool_lines[0]["call_id"]
        resume_line = next(x for x in mine if x["msg"] == "resuming the Live session")
        assert resume_line["span_id"] in {span_id(s) for s in spans["resume"]}
        assert "span_id" not in next(x for x in mine if x["msg"] == "call attached")
    finally:
        rx.close()
