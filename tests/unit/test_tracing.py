"""OpenTelemetry traces and JSON logs: a real local OTLP/HTTP receiver decodes what the SDK exports
(``ExportTraceServiceRequest`` from opentelemetry-proto): one trace per call, a ``turn`` span per caller
turn with its events (from the AI worker's TurnClock fed like the worker feeds it), a ``tool_call``
span (the real ToolRunner), a ``resume`` span, all children of the supervisor's ``call`` span; and JSON
log lines carry the session's trace id (and the current span id)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from appliance import tracing
from appliance.logs import FrameSampler, JsonFormatter
from shm.segment import ShardSegment
from tests.harness.otlp import OtlpReceiver
from tests.harness.shm import shard_segment
from workers.ai.tools import ToolRunner
from workers.ai.turn_metrics import TurnClock

SID = "box1.AbCdEfGhIjKlMnOpQrStUv"


@pytest.fixture
def seg():
    with shard_segment(slots=1) as s:
        yield s


@pytest.fixture
def receiver():
    rx = OtlpReceiver()
    assert tracing.configure(rx.url, role="test")
    yield rx
    tracing.shutdown()
    rx.close()


def test_off_by_default_is_a_no_op() -> None:
    assert not tracing.configure("")
    assert not tracing.enabled()
    assert tracing.start_call(SID) is None and tracing.start_child(SID, "turn") is None
    with tracing.child(SID, "tool_call") as span:
        assert span is None


def test_one_trace_per_call_with_turn_tool_and_resume_spans(receiver, seg: ShardSegment) -> None:
    call = tracing.start_call(SID, box="box1")
    clock = TurnClock(seg.slot(0), seg.slot(0).generation, seg.histograms("ai"), SID)
    t = time.monotonic()
    # turn 1: speech, activityEnd, model audio, its playback, turnComplete
    for name, dt in (("speech_start", 0.0), ("activity_start", 0.1), ("speech_end", 1.0),
                     ("activity_end", 1.4), ("first_audio", 1.5), ("playback", 1.52), ("turn_complete", 2.5)):
        clock[name] = t + dt
    # turn 2: the caller talks over the answer
    for name, dt in (("speech_start", 3.0), ("activity_start", 3.1), ("speech_end", 4.0),
                     ("activity_end", 4.4), ("first_audio", 4.5), ("playback", 4.52), ("speech_start", 5.0),
                     ("barge_in", 5.05), ("interrupted", 5.1)):
        clock[name] = t + dt

    async def tools_and_resume() -> None:
        runner = ToolRunner("", 1.0)  # no endpoint: the call is answered with an error (span status)
        done = asyncio.Event()
        runner.submit((0, 1), SID, [{"id": "c1", "name": "lookup", "args": {}}],
                      lambda _r: True, lambda _ok: done.set())
        await asyncio.wait_for(done.wait(), 5)
        with tracing.child(SID, "resume", reason="goAway"):
            await asyncio.sleep(0.01)
        await runner.aclose()

    asyncio.run(tools_and_resume())
    tracing.end(call, reason="deleted")
    tracing.flush()
    deadline = time.monotonic() + 10
    while len(receiver.spans) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(ct == "application/x-protobuf" for ct in receiver.content_types)
    spans = {}
    for svc, s in receiver.spans:
        spans.setdefault(s.name, []).append(s)
        assert svc["service.name"] == "voice-appliance" and svc["va.role"] == "test"
    trace_id, call_span_id = tracing.call_ids(SID)
    assert set(spans) == {"call", "turn", "tool_call", "resume"}, list(spans)
    # turn 3 (opened by the barge-in onset) is still open: not exported
    assert len(spans["call"]) == 1 and len(spans["turn"]) == 2
    (root,) = spans["call"]
    assert int.from_bytes(root.trace_id, "big") == trace_id
    assert int.from_bytes(root.span_id, "big") == call_span_id and not root.parent_span_id
    for _svc, s in receiver.spans:
        assert int.from_bytes(s.trace_id, "big") == trace_id, s.name  # one trace per call
        if s.name != "call":
            assert int.from_bytes(s.parent_span_id, "big") == call_span_id, s.name
    t1, t2 = sorted(spans["turn"], key=lambda s: s.start_time_unix_nano)
    assert [e.name for e in t1.events] == ["activity_end", "model_first_audio", "playback", "turn_complete"]
    assert (t1.end_time_unix_nano - t1.start_time_unix_nano) / 1e9 == pytest.approx(2.5, abs=0.05)
    assert [e.name for e in t2.events] == ["activity_end", "model_first_audio", "playback", "barge_in",
                                           "interrupted"]
    assert (t2.end_time_unix_nano - t2.start_time_unix_nano) / 1e9 == pytest.approx(2.1, abs=0.05)
    (tool,) = spans["tool_call"]
    assert {a.key: a.value.string_value for a in tool.attributes}["tool"] == "lookup"
    assert tool.status.code == 2  # STATUS_CODE_ERROR: no endpoint
    assert {a.key: a.value.string_value for a in spans["resume"][0].attributes}["reason"] == "goAway"


def _json_line(logger: logging.Logger, fn) -> dict:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_json_log_format_carries_session_and_trace_ids(receiver) -> None:
    log = logging.getLogger("va.test.logs")
    log.setLevel(logging.INFO)
    line = _json_line(log, lambda: log.info("session created", extra={"session": SID, "shard": 0}))
    assert set(line) >= {"ts", "level", "logger", "msg", "pid", "session", "shard", "trace_id"}
    assert line["msg"] == "session created" and line["level"] == "info"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert line["trace_id"] == f"{tracing.call_ids(SID)[0]:032x}" and "span_id" not in line

    def inside_span() -> None:
        with tracing.child(SID, "tool_call") as span:
            log.warning("tool call failed", extra={"session": SID})
            inside_span.span_id = f"{span.get_span_context().span_id:016x}"  # type: ignore[attr-defined]

    line = _json_line(log, inside_span)
    assert line["trace_id"] == f"{tracing.call_ids(SID)[0]:032x}"
    assert line["span_id"] == inside_span.span_id  # type: ignore[attr-defined]
    # a line without a session has no trace id (nothing to join on)
    assert "trace_id" not in _json_line(log, lambda: log.info("supervisor ready"))


def test_frame_sampler_writes_one_in_ten_only_at_debug() -> None:
    log = logging.getLogger("va.test.frames")
    log.setLevel(logging.INFO)
    s = FrameSampler(log, 0.1)
    assert sum(s.due() for _ in range(1000)) == 0  # INFO: no frame line is even formatted
    log.setLevel(logging.DEBUG)
    assert sum(s.due() for _ in range(1000)) == 100
    assert sum(FrameSampler(log, 0.0).due() for _ in range(100)) == 0
    assert sum(FrameSampler(log, 1.0).due() for _ in range(100)) == 100
    best = float("inf")
    for _ in range(7):  # best of 7: a shared machine's load inflates single rounds
        t0 = time.perf_counter()
        for _ in range(10_000):
            s.due()
        best = min(best, (time.perf_counter() - t0) / 10_000)
    assert best < 2e-6, best  # ~0.1-0.2 µs: cheap enough for the tick
