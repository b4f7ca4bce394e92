"""The AI worker's state for one call — one (slot, generation) — and what goes from the caller to the model.

A call has a caller side (``CallerTurn``: VAD window, turn detector, keypad), a playback side
(``Playback``: model audio on its way to the caller), an ``Outbox`` (what was sent to the model:
replay and crash journal) and, when the model is reachable, a Live session. The caller's side goes to
the Live session; before it exists (the SDK still warming up) only to the outbox; nowhere while the
model is degraded (the caller was asked to hold).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from appliance.config import ModelConfig
from shm.audio import UP_BYTES_PER_MS
from shm.segment import MODEL_STATE_ENDED, EventCode, Slot
from workers.ai.caller import CallerTurn
from workers.ai.dtmf import digit_for, dtmf_text
from workers.ai.live.events import FunctionCall, LiveEvent
from workers.ai.live.outbox import Outbox
from workers.ai.live.settings import ClientSettings, LiveOptions
from workers.ai.playback import Playback
from workers.ai.tools import ToolRunner

if TYPE_CHECKING:
    from workers.ai.consent import Consent
    from workers.ai.ivr import Episode
    from workers.ai.secure_entry import SecureEntry

log = logging.getLogger("workers.ai.worker")

HOLD_REPEAT_SECONDS = 20.0


class Live(Protocol):
    """What the worker uses of a Live session (workers/ai/live/session.py; tests/ai/doubles.py)."""

    resume_handle: str | None
    server_session_id: str | None

    @property
    def state(self) -> str: ...  # read-only here: only the session changes it

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def send_audio(self, pcm16_16k: bytes) -> None: ...
    def activity_start(self) -> None: ...
    def activity_end(self) -> None: ...
    def send_text(self, text: str) -> None: ...
    def send_tool_response(self, responses: Sequence[Mapping[str, object]]) -> bool: ...


class LiveFactory(Protocol):
    def __call__(self, model_cfg: ModelConfig, session_id: str, options: LiveOptions,
                 on_event: Callable[[LiveEvent], None], *, settings: ClientSettings | None = ...,
                 outbox: Outbox | None = ...) -> Live: ...


@dataclass
class Call:
    """The worker's local state for one (slot, generation)."""

    slot: Slot
    generation: int
    session_id: str
    options: dict[str, object]
    caller: CallerTurn
    outbox: Outbox
    last_event: MutableMapping[str, float]  # monotonic times, for tests and benchmarks
    playback: Playback = field(init=False)
    live: Live | None = None
    start_task: asyncio.Task[None] | None = None
    start_failed: bool = False
    awaiting_live: bool = False  # attached before the SDK was ready: record now, open the session later
    handle: str = ""  # resume handle found at attach
    hold_played: bool = False
    hold_at: float = 0.0  # when "please hold" last started
    retry_at: float = 0.0
    closed: bool = False
    ivr: Episode | None = None  # the model is down and the caller is in the degradation menu (ivr.py)
    secure: SecureEntry | None = None  # PCI keypad entry in progress (workers/ai/secure_entry.py)
    consent: Consent | None = None  # the opt-in consent step (workers/ai/consent.py)
    ended: str = ""  # the worker ended the call: this model state stays in the slot

    @property
    def secure_entry_active(self) -> bool:
        """True while keypad digits go only to the payment endpoint (call recording pauses meanwhile)."""
        return self.secure is not None and not self.secure.finished

    @property
    def key(self) -> tuple[int, int]:
        return (self.slot.index, self.generation)

    def current(self) -> bool:
        return not self.closed and self.slot.is_current(self.generation)

    def opt(self, name: str, default: str) -> str:
        value = self.options.get(name)
        return str(value) if value else default

    def set_model_state(self, state: str) -> None:
        # an ended state is final, also one a previous worker wrote before it died (the supervisor reads it)
        if self.current() and not self.ended and not self.slot.model_state.startswith(MODEL_STATE_ENDED):
            self.slot.model_state = str(state)[:32]

    # ---- to the model ------------------------------------------------------------------------------
    def live_ok(self) -> bool:
        live = self.live
        return live is not None and not self.start_failed and live.state not in ("degraded", "closed")

    def _target(self) -> Live | Outbox | None:
        if self.consent is not None and self.consent.waiting:  # nothing reaches the model before consent
            return None
        if self.ivr is not None:  # the caller is in the degradation menu, not talking to the model
            return None
        if self.awaiting_live:
            return self.outbox
        return self.live if self.live_ok() else None

    def send_audio(self, pcm: bytes) -> None:
        match self._target():
            case Outbox() as box:
                box.audio(pcm)
            case None:
                return
            case live:
                live.send_audio(pcm)
                self.slot.counters.add("audio_sent_ms", len(pcm) // UP_BYTES_PER_MS)

    def send_mark(self, start: bool, text: str = "") -> None:
        """``activityStart`` (``start``), ``activityEnd``, or realtime ``text`` when given."""
        match self._target():
            case Outbox() as box:
                box.text(text) if text else box.start() if start else box.end()
            case None:
                pass
            case live:
                live.send_text(text) if text else live.activity_start() if start else live.activity_end()

    # ---- keypad ------------------------------------------------------------------------------------
    def keypad_events(self) -> None:
        """Consume the media worker's events for this call (the queue is ours to drain); keypad digits
        go to the model in entries (``#``, 32 digits or ``model.dtmf_flush_ms`` of quiet: dtmf.py)."""
        now = time.monotonic()
        c = self.caller
        for code, value in self.slot.pop_events():
            if code == EventCode.DTMF:
                digit = digit_for(value)
                if digit is None:
                    continue
                if self.consent is not None and self.consent.waiting:  # the consent answer
                    self.consent.press(digit, now)
                    continue
                if self.ivr is not None:  # the degradation menu's (a callback number: never logged)
                    self.ivr.keys.append(digit)
                    continue
                if self.secure is not None:  # PCI secure entry: only to the payment endpoint
                    self.secure.push(digit, now)
                    continue
                c.dtmf = (c.dtmf + digit)[-32:]  # never logged: PINs, card numbers (counts only)
                entry = c.keypad.push(digit, now)
                if entry:
                    self.send_dtmf(entry)
            elif code == EventCode.RTP_TIMEOUT:
                log.info("caller RTP silent", extra={"session": self.session_id, "ms": value})
        if self.consent is not None:
            self.consent.due(now)
        if self.secure is not None:
            self.secure.due(now)
        entry = c.keypad.due(now)
        if entry:
            self.send_dtmf(entry)

    def send_dtmf(self, digits: str) -> None:
        """One keypad entry to the model: inside the caller's open turn, else as a turn of its own
        (which, like speech, interrupts model audio)."""
        if not self.send_text_turn(dtmf_text(digits)):
            log.warning("keypad entry dropped: model unavailable", extra={"session": self.session_id})
            return
        self.slot.counters.add("dtmf_sent", len(digits))
        self.last_event["dtmf_sent"] = time.monotonic()
        log.info("keypad entry sent to the model", extra={"session": self.session_id, "digits": len(digits)})

    def send_text_turn(self, text: str) -> bool:
        """Text from the caller's side to the model (a keypad entry, a secure entry's outcome); False
        when no model or outbox takes it."""
        if self._target() is None:
            return False
        if self.caller.sending:
            self.send_mark(False, text)
        else:
            if self.playback.playing():
                self.playback.barge_in()
            self.send_mark(True)
            self.send_mark(False, text)
            self.send_mark(False)
        return True

    # ---- degradation ------------------------------------------------------------------------------
    def degraded(self, reason: str, hold_prompt: bytes, retry_seconds: float) -> None:
        """The model is unreachable: keep the call, ask the caller to hold (again every
        ``HOLD_REPEAT_SECONDS`` while it lasts), retry in ``retry_seconds``."""
        self.set_model_state("degraded")
        now = time.monotonic()
        if self.retry_at == 0.0 or now >= self.retry_at:
            self.slot.counters.add("degraded")
        self.retry_at = now + retry_seconds
        self.caller.sending = False
        if hold_prompt and (not self.hold_played or now - self.hold_at >= HOLD_REPEAT_SECONDS):
            self.hold_played = True
            self.hold_at = now
            self.playback.queue(hold_prompt)
        log.warning("model degraded; call kept", extra={"session": self.session_id, "reason": reason})

    # ---- tools -------------------------------------------------------------------------------------
    def tool_calls(self, tools: ToolRunner, calls: tuple[FunctionCall, ...]) -> None:
        """The model called functions: answer each (workers/ai/tools.py), never blocking the loop."""
        self.slot.counters.add("tool_calls", len(calls))
        asked = self.live

        def respond(fr: dict[str, object]) -> bool:
            if self.closed or asked is None or self.live is not asked:
                return False  # the call ended or its Live session was replaced: nobody waits for this
            return asked.send_tool_response([fr])

        def done(ok: bool) -> None:
            if not ok and self.current():
                self.slot.counters.add("tool_errors")

        asks: list[dict[str, object]] = [{"id": c.id, "name": c.name, "args": c.args} for c in calls]
        tools.submit(self.key, self.session_id, asks, respond, done)
