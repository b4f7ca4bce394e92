"""A scripted stand-in for ``workers.ai.live.LiveSession`` for tick-level worker tests.

The real Live layer + emulator are exercised in test_worker_emulator.py; this double lets the worker's
own decisions (turns, pre-roll, barge-in, slot reuse, degradation) be checked deterministically, tick by
tick, without wall-clock timing. Event classes carry the Live layer's names (the worker dispatches on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AudioOut:
    pcm24k: bytes


@dataclass
class Interrupted:
    pass


@dataclass
class TurnComplete:
    pass


@dataclass
class StateChanged:
    state: str
    reason: str = ""


@dataclass
class ResumeHandle:
    handle: str


@dataclass
class Transcript:
    role: str
    text: str
    final: bool = True


@dataclass
class Options:
    voice: str
    language: str
    system_instruction: str
    resume_handle: str | None = None


class FakeLive:
    """Records what the worker does; ``emit`` plays model events into the worker."""

    instances: list[FakeLive] = []
    fail_start: bool = False
    fail_init: bool = False

    def __init__(self, model_cfg: Any, session_id: str, options: Options, on_event: Any, *,
                 ssl_context: Any = None) -> None:
        if FakeLive.fail_init:
            raise ValueError("emulated: bad options")
        self.session_id = session_id
        self.options = options
        self.on_event = on_event
        self.state = "connecting"
        self.resume_handle = options.resume_handle
        self.sent = bytearray()
        self.log: list[str] = []
        self.closed = False
        FakeLive.instances.append(self)

    async def start(self) -> None:
        if FakeLive.fail_start:
            self.state = "degraded"
            raise ConnectionError("emulated: cannot connect")
        self.state = "live"
        self.on_event(StateChanged("live"))

    def send_audio(self, pcm: bytes) -> None:
        self.sent += pcm
        if not self.log or self.log[-1] != "audio":
            self.log.append("audio")

    def activity_start(self) -> None:
        self.log.append("start")

    def activity_end(self) -> None:
        self.log.append("end")

    def send_text(self, text: str) -> None:
        self.log.append(f"text:{text}")

    def send_tool_response(self, responses: list[dict[str, Any]]) -> bool:
        self.log.append(f"tool_response:{','.join(str(r.get('id')) for r in responses)}")
        return True

    async def close(self) -> None:
        self.closed = True
        self.state = "closed"

    def emit(self, ev: Any) -> None:
        self.on_event(ev)
