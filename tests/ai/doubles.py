"""A scripted stand-in for ``workers.ai.live.session.LiveSession`` for tick-level worker tests.

The real Live layer + emulator are exercised in test_worker_emulator.py and tests/ai/live/; this double
lets the worker's own decisions (turns, pre-roll, barge-in, slot reuse, degradation) be checked
deterministically, tick by tick, without wall-clock timing. It uses the real events and the call's real
``Outbox`` the way the session does: what the worker sends is appended to the outbox and "written" at
once; ``emit`` reports the model's outcomes and handles to the outbox before the worker sees the event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from appliance.config import ModelConfig
from workers.ai.live.events import Interrupted, LiveEvent, ResumeHandle, StateChanged, TurnComplete
from workers.ai.live.outbox import Item, Kind, Outbox
from workers.ai.live.settings import ClientSettings, LiveOptions


class FakeLive:
    """Records what the worker does; ``emit`` plays model events into the worker."""

    instances: list[FakeLive] = []
    fail_start: bool = False
    fail_init: bool = False

    def __init__(self, model_cfg: ModelConfig, session_id: str, options: LiveOptions,
                 on_event: Callable[[LiveEvent], None], *, settings: ClientSettings, outbox: Outbox) -> None:
        if FakeLive.fail_init:
            raise ValueError("emulated: bad options")
        self.session_id = session_id
        self.options = options
        self.on_event = on_event
        self.outbox = outbox
        outbox.attach(self)
        self.state = "connecting"
        self.resume_handle = options.resume_handle
        self.server_session_id: str | None = None
        self.sent = bytearray()
        self.log: list[str] = []
        self.closed = False
        self._sent = 0
        FakeLive.instances.append(self)

    async def start(self) -> None:
        if FakeLive.fail_start:
            self.state = "degraded"
            raise ConnectionError("emulated: cannot connect")
        self._sent = self.outbox.reconnect(self)
        self.state = "live"
        self._write()  # the replay of what no handle covers
        self.on_event(StateChanged("live"))

    def _write(self) -> None:
        if self.state != "live":
            return
        while (item := self.outbox.next_after(self._sent)) is not None:
            self._sent = item.seq
            self.outbox.sent(self, item, 0.0)
            self._record(item)

    def _record(self, item: Item) -> None:
        if item.kind is Kind.AUDIO:
            self.sent += item.data
            if not self.log or self.log[-1] != "audio":
                self.log.append("audio")
        elif item.kind is Kind.TEXT:
            self.log.append(f"text:{item.data.decode()}")
        else:
            self.log.append("start" if item.kind is Kind.START else "end")

    def send_audio(self, pcm: bytes) -> None:
        self.outbox.audio(pcm)
        self._write()

    def activity_start(self) -> None:
        self.outbox.start()
        self._write()

    def activity_end(self) -> None:
        self.outbox.end()
        self._write()

    def send_text(self, text: str) -> None:
        self.outbox.text(text)
        self._write()

    def send_tool_response(self, responses: Sequence[Mapping[str, object]]) -> bool:
        self.log.append(f"tool_response:{','.join(str(r.get('id')) for r in responses)}")
        return True

    async def close(self) -> None:
        self.closed = True
        self.state = "closed"

    def emit(self, ev: LiveEvent) -> None:
        match ev:
            case Interrupted():
                self.outbox.outcome(self, answered=False)
            case TurnComplete():
                self.outbox.outcome(self, answered=True)
        self.on_event(ev)
        if isinstance(ev, ResumeHandle):
            self.resume_handle = ev.handle
            self.outbox.confirm(self)
