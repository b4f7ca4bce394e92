"""ToolRunner (workers/ai/tools.py) against a real local HTTP server: every call gets exactly one answer —
the endpoint's JSON, or an error result — and a slow call delays no other."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.harness.toolserver import tool_server
from workers.ai.tools import MAX_IN_FLIGHT, ToolError, ToolRunner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def srv():
    with tool_server() as s:
        yield s


async def test_endpoint_gets_the_call_and_its_json_is_the_response(srv) -> None:
    r = ToolRunner(srv.url("/ok"), 5.0)
    try:
        out = await r.invoke("sess-a", "lookup_order", {"order": "1234"}, "c1")
    finally:
        await r.aclose()
    assert srv.requests == [{"session_id": "sess-a", "name": "lookup_order", "args": {"order": "1234"},
                             "call_id": "c1"}]
    assert out == {"output": {"name": "lookup_order", "echo": {"order": "1234"}}}


@pytest.mark.parametrize(("path", "needle", "retryable"), [
    ("/status/500", "HTTP 500", True),
    ("/status/404", "HTTP 404", False),
    ("/badjson", "invalid JSON", False),
    ("/big", "larger than", False),
    ("/slow/3", "did not answer within 0.5 s", True),
])
async def test_failures_become_tool_errors(srv, path: str, needle: str, retryable: bool) -> None:
    """Each failure says whether trying again could help (the model's cue not to repeat the call)."""
    r = ToolRunner(srv.url(path), 0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(ToolError, match=needle) as err:
            await r.invoke("s", "f", {}, "c")
    finally:
        await r.aclose()
    assert err.value.retryable is retryable
    assert time.monotonic() - t0 < 2.5  # the timeout bounds the whole request


async def test_non_object_json_is_wrapped_and_no_endpoint_is_an_error(srv) -> None:
    r = ToolRunner(srv.url("/list"), 2.0)
    try:
        assert await r.invoke("s", "f", {}, "c") == {"output": [1, 2, 3]}
    finally:
        await r.aclose()
    with pytest.raises(ToolError, match="no tool endpoint"):
        await ToolRunner("", 1.0).invoke("s", "f", {}, "c")
    closed = ToolRunner("http://127.0.0.1:9/", 1.0)  # discard port: nothing listens
    try:
        with pytest.raises(ToolError, match="unreachable"):
            await closed.invoke("s", "f", {}, "c")
    finally:
        await closed.aclose()


async def test_slow_call_delays_no_other_and_cancel_sends_nothing(srv) -> None:
    srv.delay["slow"] = 3.0
    r = ToolRunner(srv.url("/ok"), 5.0)
    answers: list[tuple[str, float, dict[str, Any]]] = []
    done: list[bool] = []

    def respond(fr: dict[str, Any]) -> bool:
        answers.append((fr["id"], time.monotonic(), fr["response"]))
        return True

    t0 = time.monotonic()
    r.submit((0, 1), "slow", [{"id": "s1", "name": "f", "args": {}}], respond, done.append)
    r.submit((1, 1), "fast", [{"id": "f1", "name": "f", "args": {"n": 1}},
                              {"id": "f2", "name": "g", "args": {}}], respond, done.append)
    while len(answers) < 2:
        await asyncio.sleep(0.01)
        assert time.monotonic() - t0 < 2.5, "the fast calls waited for the slow one"
    assert sorted(a[0] for a in answers) == ["f1", "f2"] and r.in_flight((0, 1)) == 1
    assert r.cancel((0, 1), ["s1"]) == 1
    await asyncio.sleep(0.1)
    assert r.in_flight((0, 1)) == 0
    await r.aclose()
    assert [a[0] for a in answers] == ["f1", "f2"] or [a[0] for a in answers] == ["f2", "f1"]
    assert done == [True, True]  # the cancelled call was never answered, nor counted


async def test_too_many_in_flight_are_answered_with_an_error_at_once(srv) -> None:
    srv.delay["s"] = 2.0
    r = ToolRunner(srv.url("/ok"), 5.0)
    answers: list[dict[str, Any]] = []
    done: list[bool] = []
    calls = [{"id": f"c{i}", "name": "f", "args": {}} for i in range(MAX_IN_FLIGHT + 2)]
    r.submit((0, 1), "s", calls, lambda fr: answers.append(fr) or True, done.append)
    assert [a["id"] for a in answers] == [f"c{MAX_IN_FLIGHT}", f"c{MAX_IN_FLIGHT + 1}"]
    assert all("too many" in a["response"]["error"] for a in answers) and done == [False, False]
    assert all(a["response"]["status"] == "error" and a["response"]["retryable"] for a in answers)
    r.cancel_all((0, 1))
    await r.aclose()


async def test_tool_posts_are_signed_like_webhooks(srv) -> None:
    from appliance.records import signing

    r = ToolRunner(srv.url("/ok"), 5.0)
    r.sign_key = b"tool-signing-key"
    try:
        await r.invoke("sess-s", "lookup_order", {"order": "9"}, "c9")
    finally:
        await r.aclose()
    ((headers, body),) = srv.raw
    signing.verify(b"tool-signing-key", body, headers["X-VA-Signature"])  # raises if wrong
    assert headers["X-VA-Event-Id"] == "c9" and headers["X-VA-Event-Type"] == "tool.call"
    with pytest.raises(signing.SignatureError):
        signing.verify(b"another-key", body, headers["X-VA-Signature"])
