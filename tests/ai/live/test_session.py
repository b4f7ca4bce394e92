"""The Live session layer (workers/ai/live/session.py) on the real google-genai SDK against the emulator.

These are issue 2's "Done when" checks: echo content, manual activity, barge-in, goAway and abrupt
closes mid-utterance with the emulator's record proving no caller audio was lost or repeated, unknown
handle → fresh session, wrong key → clear error, tool call round trip, a garbage frame ends one session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import soxr

from tests.harness.emulator import (
    Emulator,
    chirp,
    counter_signal,
    dominant_frequency,
    max_normalized_correlation,
    start_emulator,
    tone,
)
from workers.ai.live import events as L
from workers.ai.live.outbox import Kind
from workers.ai.live.session import LiveSession
from workers.ai.live.settings import GEMINI_BASE_URL, LiveOptions, LiveUnavailable, client_settings

pytestmark = pytest.mark.timeout(90)
FRAME = 640  # 20 ms at 16 kHz


class Recorder:
    """Collects a session's events; ``wait`` polls for a condition (no fixed sleeps)."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.hook: Callable[[Any], None] | None = None

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)
        if self.hook:
            self.hook(ev)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def audio(self, since: int = 0) -> bytes:
        return b"".join(e.pcm24k for e in self.events[since:] if isinstance(e, L.AudioOut))

    def states(self) -> list[str]:
        return [e.state for e in self.of(L.StateChanged)]

    async def wait(self, pred: Callable[[], bool], limit: float = 15.0, what: str = "condition") -> None:
        deadline = time.monotonic() + limit
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events[-8:]!r:.600}")
            await asyncio.sleep(0.01)

    async def turns(self, n: int) -> None:
        await self.wait(lambda: len(self.of(L.TurnComplete)) >= n, what=f"{n} turn(s)")

    def _handle_after_turn(self) -> bool:
        last_turn = max((i for i, e in enumerate(self.events) if isinstance(e, L.TurnComplete)), default=-1)
        return any(isinstance(e, L.ResumeHandle) for e in self.events[last_turn + 1 :])

    async def handle_after_turn(self) -> None:
        """A ResumeHandle event after the last TurnComplete (the handle that covers that turn)."""
        await self.wait(self._handle_after_turn, what="a handle after the turn")


async def speak(live: LiveSession, pcm: bytes, realtime: bool = False) -> None:
    for off in range(0, len(pcm), FRAME):
        live.send_audio(pcm[off : off + FRAME])
        await asyncio.sleep(0.02 if realtime else 0)


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with start_emulator(tmp_path_factory.mktemp("emu"), pacing="burst") as e:
        yield e


def options(**kw: Any) -> LiveOptions:
    return LiveOptions(voice="Puck", language="en-US", system_instruction="test", **kw)


@pytest.fixture
async def session(emu: Emulator) -> AsyncIterator[Callable[..., Any]]:
    made: list[LiveSession] = []

    async def make(rec: Recorder | None = None, *, start: bool = True, model: dict[str, Any] | None = None,
                   **opts: Any) -> tuple[LiveSession, Recorder]:
        rec = rec or Recorder()
        cfg = emu.model_config(retry_base_seconds=0.05, retry_max_seconds=0.2, **(model or {}))
        s = LiveSession(cfg, f"call-{len(made)}", options(**opts), rec, ssl_context=emu.ssl_context())
        made.append(s)
        if start:
            await s.start()
        return s, rec

    yield make
    for s in made:
        await s.close()


def echo_of(pcm16k: bytes) -> bytes:
    return soxr.resample(np.frombuffer(pcm16k, "<i2"), 16000, 24000).astype("<i2").tobytes()


async def test_full_turn_echoes_with_transcripts_usage_and_handle(emu: Emulator, session: Any) -> None:
    live, rec = await session()
    assert live.state == "live" and live.server_session_id
    said = chirp(1.0)
    live.activity_start()
    await speak(live, said)
    live.activity_end()
    await rec.turns(1)
    assert max_normalized_correlation(rec.audio(), echo_of(said)) > 0.95
    finals = {(t.role, t.text) for t in rec.of(L.Transcript) if t.final}
    assert finals == {("user", "heard 1.00 seconds of audio"), ("model", "echo reply")}
    usage = rec.of(L.Usage)[-1]
    assert (usage.prompt_tokens, usage.response_tokens, usage.total_tokens) == (26, 25, 51)
    await rec.handle_after_turn()
    assert live.resume_handle == rec.of(L.ResumeHandle)[-1].handle
    assert emu.audio(live.server_session_id) == said
    assert emu.session(live.server_session_id)["live"]["manual"] is True


async def test_barge_in_interrupts_the_reply(emu: Emulator, session: Any) -> None:
    emu.configure_next(pacing="realtime")
    live, rec = await session()
    live.activity_start()
    await speak(live, tone(440, 1.5))
    live.activity_end()
    await rec.wait(lambda: len(rec.audio()) >= 24000 * 2 * 0.2, what="the reply to start")
    live.activity_start()  # the caller talks over the model
    await rec.wait(lambda: rec.of(L.Interrupted), what="interrupted")
    await speak(live, tone(880, 0.5))
    cut = len(rec.events)
    live.activity_end()
    await rec.turns(1)
    at = rec.events.index(rec.of(L.Interrupted)[0])
    first_reply = len(b"".join(e.pcm24k for e in rec.events[:at] if isinstance(e, L.AudioOut)))
    assert first_reply < 24000 * 2 * 1.5  # the 1.5 s reply was cut short...
    assert not [e for e in rec.events[at:cut] if isinstance(e, L.AudioOut)]  # ...and nothing followed it
    second = rec.audio(cut)
    assert abs(dominant_frequency(second, 24000) - 880) < 5
    assert len(rec.of(L.TurnComplete)) == 1  # the interrupted turn never completed


async def _resume_mid_utterance(emu: Emulator, session: Any, inject: Callable[[str], Any]) -> None:
    live, rec = await session()
    sid = live.server_session_id
    first = counter_signal(8000)
    live.activity_start()
    await speak(live, first)
    live.activity_end()
    await rec.turns(1)
    await rec.handle_after_turn()
    second = counter_signal(16000 * 2, start=8000)  # 2 s, streamed in real time
    live.activity_start()
    half = len(second) // 2 // FRAME * FRAME
    await speak(live, second[:half], realtime=True)
    inject(sid)  # mid-utterance
    await speak(live, second[half:], realtime=True)
    live.activity_end()
    await rec.turns(2)
    assert live.stats.reconnects == 1
    assert "reconnecting" in rec.states() and rec.states()[-1] == "live"
    assert live.server_session_id == sid  # resumed, not a new conversation
    assert emu.session(sid)["resumes"] == 1
    got = emu.audio(sid)
    assert len(got) == len(first) + len(second), "caller audio lost or repeated across the resume"
    assert got == first + second
    # the model answered the whole second utterance (the echo has its length, at 24 kHz)
    after_first = rec.events.index(rec.of(L.TurnComplete)[0]) + 1
    assert abs(len(rec.audio(after_first)) - len(second) * 3 // 2) <= 24000 * 2 * 0.05


async def test_goaway_mid_utterance_loses_no_caller_audio(emu: Emulator, session: Any) -> None:
    await _resume_mid_utterance(emu, session, lambda sid: emu.fault(sid, "goaway", time_left_s=0.5))


@pytest.mark.parametrize("code", [1011, 1006])
async def test_abrupt_close_mid_utterance_resumes_without_loss(
    emu: Emulator, session: Any, code: int
) -> None:
    await _resume_mid_utterance(emu, session, lambda sid: emu.fault(sid, "close", code=code))


async def test_server_that_stops_reading_is_replaced_without_loss(emu: Emulator, session: Any) -> None:
    live, rec = await session()
    live.response_timeout = 0.5
    sid = live.server_session_id
    first = counter_signal(4000)
    live.activity_start()
    await speak(live, first)
    live.activity_end()
    await rec.turns(1)
    await rec.handle_after_turn()
    emu.fault(sid, "stop_reading")
    second = counter_signal(8000, start=4000)
    live.activity_start()
    await speak(live, second, realtime=True)
    live.activity_end()
    await rec.turns(2)
    assert "server stopped answering" in [e.reason for e in rec.of(L.StateChanged)]
    assert emu.audio(sid) == first + second


async def test_a_handle_never_covers_an_open_activity(emu: Emulator, session: Any) -> None:
    """Every resumable handle is reported; the outbox keeps exactly what it does not cover, so the
    crash journal and the slot's handle always describe the same point."""
    emu.configure_next(pacing="realtime")
    live, rec = await session()
    live.activity_start()
    await speak(live, tone(400, 0.3))
    live.activity_end()
    await rec.wait(lambda: rec.of(L.AudioOut), what="reply started")
    live.activity_start()  # the caller speaks again before the turn's handle arrives...
    await speak(live, tone(400, 0.1))
    await rec.wait(lambda: rec.of(L.Interrupted) or rec.of(L.TurnComplete), what="turn outcome")
    n_events = len(rec.of(L.ResumeHandle))
    await asyncio.sleep(0.1)
    # ...so whatever handle came meanwhile, the open activity is still to be replayed
    assert [it.kind for it in live.outbox.replay()][:1] == [Kind.START]
    live.activity_end()
    await rec.turns(1)
    await rec.wait(lambda: len(rec.of(L.ResumeHandle)) > n_events and live.outbox.empty,
                   what="a handle covering everything")
    assert live.resume_handle == rec.of(L.ResumeHandle)[-1].handle


async def test_silence_reply_mode(emu: Emulator, session: Any) -> None:
    emu.configure_next(reply="silence")
    live, rec = await session()
    live.activity_start()
    await speak(live, tone(440, 0.6))
    live.activity_end()
    await rec.turns(1)
    audio = rec.audio()
    assert len(audio) == 24000 * 2 * 0.6 and audio == bytes(len(audio))


async def test_close_while_starting_leaves_no_connection(emu: Emulator, session: Any) -> None:
    live, _ = await session(start=False)
    task = asyncio.create_task(live.start())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await live.close()
    assert live.state == "closed"
    await Recorder().wait(lambda: emu.health()["live"] == 0, limit=5, what="no open session at the emulator")


async def test_replay_log_is_bounded(emu: Emulator, session: Any) -> None:
    live = LiveSession(emu.model_config(), "bounded", options(), Recorder(), ssl_context=emu.ssl_context(),
                         max_replay_seconds=1.0)
    live.activity_start()  # not started: everything stays in the log
    live.send_audio(tone(440, 3.0))
    assert live.outbox.uncovered_audio_bytes <= 32000 and live.outbox.dropped_bytes >= 2 * 32000 - 1280
    await live.close()


async def test_unknown_handle_starts_a_fresh_session(emu: Emulator, session: Any) -> None:
    live, rec = await session(resume_handle="no-such-handle")
    assert live.state == "live"
    assert live.stats.fresh_after_unknown_handle == 1
    live.activity_start()
    await speak(live, tone(500, 0.4))
    live.activity_end()
    await rec.turns(1)
    assert abs(dominant_frequency(rec.audio(), 24000) - 500) < 5


async def test_resume_handle_from_a_previous_session_restores_the_conversation(
    emu: Emulator, session: Any
) -> None:
    a, rec_a = await session()
    a.activity_start()
    await speak(a, tone(300, 0.3))
    a.activity_end()
    await rec_a.turns(1)
    await rec_a.handle_after_turn()
    handle, sid = a.resume_handle, a.server_session_id
    await a.close()
    b, _ = await session(resume_handle=handle)
    assert b.server_session_id == sid and b.stats.fresh_after_unknown_handle == 0
    assert emu.session(sid)["history"][-1] == "model: echo reply"


async def test_wrong_api_key_is_a_clear_error(emu: Emulator, session: Any) -> None:
    live, rec = await session(start=False, model={"api_key": "wrong-key"})
    with pytest.raises(LiveUnavailable, match=r"rejected the API key \(1008\)"):
        await live.start()
    assert live.state == "degraded" and rec.states() == ["degraded"]


async def test_retries_exhausted_degrade_without_raising(emu: Emulator, session: Any) -> None:
    live, rec = await session(model={"max_retries": 2})
    emu.configure(refuse=True)
    try:
        emu.fault(live.server_session_id, "close", code=1011)
        await rec.wait(lambda: live.state == "degraded", what="degraded")
    finally:
        emu.configure(refuse=False)
    assert rec.states()[-2:] == ["reconnecting", "degraded"]
    live.send_audio(tone(440, 0.1))  # still safe to call
    live.activity_end()


async def test_tool_call_round_trip(tmp_path: Any) -> None:
    with start_emulator(tmp_path, pacing="burst", tool_calls=True, reply="tone") as e:
        rec = Recorder()
        tools = [{"name": "lights", "description": "x"}]
        ctx = e.ssl_context()
        live = LiveSession(e.model_config(), "tools", options(tools=tools), rec, ssl_context=ctx)

        def answer(ev: Any) -> None:
            if isinstance(ev, L.ToolCall):
                c = ev.calls[0]
                live.send_tool_response([{"id": c.id, "name": c.name, "response": {"on": True}}])

        rec.hook = answer
        await live.start()
        try:
            live.activity_start()
            await speak(live, tone(300, 0.3))
            live.activity_end()
            await rec.turns(1)
        finally:
            await live.close()
    call = rec.of(L.ToolCall)[0].calls[0]
    assert call.name == "lights" and call.args == {"heard": "heard 0.30 seconds of audio"}
    assert ("model", 'tool lights said {"on": true}') in {(t.role, t.text) for t in rec.of(L.Transcript)}
    assert abs(dominant_frequency(rec.audio(), 24000) - 440) < 5


async def test_garbage_frame_ends_only_that_session(emu: Emulator, session: Any) -> None:
    a, rec_a = await session()
    b, rec_b = await session()
    emu.fault(a.server_session_id, "garbage")
    await rec_a.wait(lambda: a.state == "closed", what="session a closed")
    assert rec_a.of(L.StateChanged)[-1].reason.startswith("unparseable server frame")
    a.send_audio(tone(440, 0.1))  # harmless after the end
    b.activity_start()
    await speak(b, tone(700, 0.3))
    b.activity_end()
    await rec_b.turns(1)
    assert abs(dominant_frequency(rec_b.audio(), 24000) - 700) < 5 and b.state == "live"


async def test_bad_server_frames(emu: Emulator, session: Any) -> None:
    """Unknown message: ignored. Truncated base64: that session ends. Oversized frame: reconnect + resume."""
    ignore, rec_i = await session()
    broken, rec_b = await session()
    big, rec_g = await session()
    emu.fault(ignore.server_session_id, "garbage", kind="unknown")
    emu.fault(broken.server_session_id, "garbage", kind="b64")
    emu.fault(big.server_session_id, "garbage", kind="big")
    await rec_b.wait(lambda: broken.state == "closed", what="b64 session closed")
    await rec_g.wait(lambda: big.stats.reconnects == 1 and big.state == "live", what="big session resumed")
    for live, rec in ((ignore, rec_i), (big, rec_g)):
        live.activity_start()
        await speak(live, tone(600, 0.3))
        live.activity_end()
        await rec.turns(1)
        assert abs(dominant_frequency(rec.audio(), 24000) - 600) < 5
    assert ignore.stats.reconnects == 0 and ignore.state == "live"
    assert big.server_session_id == emu.session(big.server_session_id)["session"]


def test_client_settings_default_to_the_emulator(tmp_path: Any) -> None:
    from appliance.config import load_config, replace

    cfg = replace(load_config(None, env={}), paths={"state_dir": str(tmp_path)},
                  emulator={"port": 9555, "api_key": "k"})
    s = client_settings(cfg)
    assert (s.base_url, s.api_key) == ("https://127.0.0.1:9555", "k")
    assert (tmp_path / "emulator" / "emulator-ca.pem").exists()
    assert s.ssl_context.verify_mode.name == "CERT_REQUIRED"
    gem = replace(cfg, model={"api_key": "real"})
    assert (client_settings(gem).base_url, client_settings(gem).api_key) == (GEMINI_BASE_URL, "real")
    # an extra CA is added to the system store (a leftover emulator ca_file must not break Gemini)
    with_ca = replace(gem, model={"ca_file": str(tmp_path / "emulator" / "emulator-ca.pem")})
    ctx = client_settings(with_ca).ssl_context
    names = [dict(x[0] for x in c["subject"]).get("commonName") for c in ctx.get_ca_certs()]
    assert "voice-appliance emulator test CA" in names
    with pytest.raises(LiveUnavailable, match=r"model\.ca_file"):
        client_settings(replace(gem, model={"ca_file": str(tmp_path / "missing.pem")}))


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "sdk_path"])
async def test_text_in_an_activity_survives_a_resume_exactly_once(
    emu: Emulator, session: Any, fast: bool
) -> None:
    """Keypad text goes through the same replay log as audio: a close right after it is sent resumes
    from the last handle and re-sends it, so the model holds it exactly once."""
    live, rec = await session(start=False)
    live.fast_path = fast
    await live.start()
    sid = live.server_session_id
    live.activity_start()
    await speak(live, counter_signal(4000))
    live.activity_end()
    await rec.turns(1)
    await rec.handle_after_turn()
    live.activity_start()
    live.send_text("keys: 42#")
    await speak(live, counter_signal(3200, start=4000), realtime=True)
    emu.fault(sid, "close", code=1011)
    await speak(live, counter_signal(3200, start=7200), realtime=True)
    live.activity_end()
    await rec.turns(2)
    assert live.stats.reconnects == 1 and emu.session(sid)["resumes"] == 1
    assert emu.session(sid)["texts"] == ["keys: 42#"]
    assert emu.audio(sid) == counter_signal(10400)
    users = [e.text for e in rec.of(L.Transcript) if e.role == "user" and e.final]
    assert users[-1] == "heard 0.40 seconds of audio and text: keys: 42#"


async def test_a_slow_tool_is_not_mistaken_for_a_stalled_server(emu: Emulator, session: Any) -> None:
    """While the model waits on our tool response its silence is ours: no 'stopped answering' reconnect.
    Only open calls of the current connection can be answered."""
    emu.configure_next(tool_calls=True, reply="tone")
    live, rec = await session(tools=[{"name": "lights", "description": "x"}])
    live.response_timeout = 0.5
    live.activity_start()
    await speak(live, tone(300, 0.3))
    live.activity_end()
    await rec.wait(lambda: rec.of(L.ToolCall), what="tool call")
    await asyncio.sleep(2.5)  # 5x the response timeout, 2+ watchdog rounds: our tool is just slow
    assert live.stats.reconnects == 0
    c = rec.of(L.ToolCall)[0].calls[0]
    assert not live.send_tool_response([{"id": "not-asked", "name": "lights", "response": {}}])
    assert live.send_tool_response([{"id": c.id, "name": c.name, "response": {"on": True}}])
    assert not live.send_tool_response([{"id": c.id, "name": c.name, "response": {"on": True}}])
    await rec.turns(1)
    assert live.stats.reconnects == 0
    assert emu.session(live.server_session_id)["tool_responses"] == [
        {"id": c.id, "name": "lights", "response": {"on": True}}]
