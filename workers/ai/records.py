"""What the AI worker contributes to the call record: transcript lines, usage, turn and model events.

Everything goes into this shard's record spool (``appliance.records.spool``; one ``os.write`` per
item, no database, no waiting). The worker calls one method per fact, from its own loop; with
``records.dsn`` unset every method is a no-op.

Offsets are audio time: milliseconds of caller audio since the call's first packet, read from the
uplink ring (the media worker writes exactly one 20 ms frame per tick from then on, and the ring's
counters live in shared memory, so the clock survives an AI worker restart). A caller line is placed
at the onset of the speech it transcribes; an assistant line at the first audio of its answer, so
both sides sort in the order they were heard. Keypad entries are recorded as digit COUNTS only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from appliance.config import Config, secret
from appliance.records.spool import Spool, spool_keyring_for, spool_root

log = logging.getLogger(__name__)

UPLINK_BYTES_PER_MS = 32  # PCM16 mono 16 kHz


@dataclass
class _Rec:
    caller_onset_ms: int = 0
    caller_end: float = 0.0  # monotonic time activityEnd went out
    caller_speech_ms: int = 0
    answer_ms: int | None = None  # audio time of the current model turn's first audio
    turn_open: bool = False  # an activity ended and no model audio came yet


class CallRecorder:
    """One per AI worker (``shard``)."""

    def __init__(self, cfg: Config, shard: int) -> None:
        r = cfg.records
        self.model = cfg.model.model
        self.spool: Spool | None = None
        if r.dsn:
            self.spool = Spool(spool_root(cfg.paths.state_dir, r.spool_dir) / f"shard-{shard}",
                               max_bytes=r.spool_max_bytes, segment_bytes=r.spool_segment_bytes,
                               fsync_seconds=r.spool_fsync_seconds,
                               keyring=spool_keyring_for(cfg, f"shard-{shard}"))
        self._calls: dict[str, _Rec] = {}
        self._sign_key = secret("", r.webhook_secret_file).encode()

    def _rec(self, call: Any) -> _Rec:
        rec = self._calls.get(call.session_id)
        if rec is None:
            rec = self._calls[call.session_id] = _Rec()
        return rec

    @staticmethod
    def audio_ms(call: Any) -> int:
        with contextlib.suppress(Exception):
            return int(call.slot.uplink.written // UPLINK_BYTES_PER_MS)
        return 0

    def _put(self, kind: str, call: Any, **fields: Any) -> None:
        if self.spool is None:
            return
        try:
            self.spool.append(kind, call.session_id, **fields)
        except OSError as exc:  # a full disk must not take the call down
            log.warning("record spool write failed", extra={"session": call.session_id, "error": str(exc)})

    def event(self, call: Any, type_: str, **data: Any) -> None:
        if self.spool is not None:
            self._put("event", call, type=type_, offset_ms=self.audio_ms(call), data=data)

    # -- call lifecycle ----------------------------------------------------------------------------
    def attached(self, call: Any, *, fresh: bool) -> None:
        """A worker took the call: the first one, or a replacement after a worker restart."""
        if not fresh:
            self.event(call, "worker_restart")

    def closed(self, call: Any) -> None:
        self._calls.pop(call.session_id, None)

    # -- turns -------------------------------------------------------------------------------------
    def turn_start(self, call: Any, onset_samples_ago: int) -> None:
        if self.spool is None:
            return
        rec = self._rec(call)
        rec.caller_onset_ms = max(0, self.audio_ms(call) - onset_samples_ago // 16)

    def turn_end(self, call: Any, speech_ms: int) -> None:
        if self.spool is None:
            return
        rec = self._rec(call)
        rec.caller_end = time.monotonic()
        rec.caller_speech_ms = int(speech_ms)
        rec.turn_open = True
        rec.answer_ms = None

    def model_audio(self, call: Any) -> None:
        """First audio of a model turn: closes the caller's turn with its response time."""
        if self.spool is None:
            return
        rec = self._rec(call)
        if rec.answer_ms is None:
            rec.answer_ms = self.audio_ms(call)
        if rec.turn_open:
            rec.turn_open = False
            self._put("event", call, type="turn", offset_ms=rec.caller_onset_ms,
                      data={"speech_ms": rec.caller_speech_ms,
                            "response_ms": round((time.monotonic() - rec.caller_end) * 1000, 1)})

    def model_turn_done(self, call: Any, *, interrupted: bool) -> None:
        if self.spool is None:
            return
        rec = self._rec(call)
        rec.answer_ms = None
        if interrupted:
            self.event(call, "model_interrupted")

    def transcript(self, call: Any, role: str, text: str) -> None:
        if self.spool is None or not text:
            return
        rec = self._rec(call)
        if role == "user":
            offset, speaker = rec.caller_onset_ms, "caller"
        else:
            offset = rec.answer_ms if rec.answer_ms is not None else self.audio_ms(call)
            speaker = "assistant"
        self._put("transcript", call, speaker=speaker, offset_ms=offset, text=text)

    def usage(self, call: Any, ev: Any) -> None:
        if self.spool is None:
            return
        model = str(call.options.get("model") or self.model)  # the routed model (appliance/routing.py)
        self._put("usage", call, model=model, prompt_tokens=int(getattr(ev, "prompt_tokens", 0) or 0),
                  response_tokens=int(getattr(ev, "response_tokens", 0) or 0),
                  total_tokens=int(getattr(ev, "total_tokens", 0) or 0),
                  details=getattr(ev, "details", None) or {})

    # -- other events ------------------------------------------------------------------------------
    def barge_in(self, call: Any) -> None:
        self.event(call, "barge_in")

    def hold(self, call: Any, outcome: str) -> None:
        self.event(call, "hold", outcome=outcome)

    def callback_requested(self, call: Any, number: str) -> None:
        """The caller left a number while the model was down (workers/ai/ivr.py). It rides in
        ``callback_number`` — sealed in the spool (compliance/atrest.py SEALED_FIELDS), in the database
        and in the ``call.callback_requested`` webhook — and never in ``data`` or a log."""
        if self.spool is None:
            log.warning("callback request not stored: records.dsn is not set",
                        extra={"session": call.session_id})
            return
        self._put("event", call, type="callback_requested", offset_ms=self.audio_ms(call),
                  data={"digits": len(number)}, callback_number=number)

    def transfer_requested(self, call: Any, target: str) -> None:
        """Option 3 of the degradation menu: an event (and ``call.transfer_requested`` webhook)."""
        self.event(call, "transfer_requested", target=str(target)[:200])

    def keypad(self, call: Any, digits: int) -> None:
        self.event(call, "keypad", digits=int(digits))  # a count: the digits themselves never leave

    def dtmf_counter(self, call: Any) -> int:
        """The slot's ``dtmf_sent`` counter before keypad events are handled (see ``keypad_sent``)."""
        if self.spool is None:
            return 0
        with contextlib.suppress(Exception):
            return int(call.slot.counters.get("dtmf_sent"))
        return 0

    def keypad_sent(self, call: Any, before: int) -> None:
        """One ``keypad`` event per entry sent to the model, with its digit count (never the digits)."""
        if self.spool is None:
            return
        n = self.dtmf_counter(call) - before
        if n > 0:
            self.keypad(call, n)

    def tool_done(self, call: Any, name: str, seconds: float, outcome: str) -> None:
        self.event(call, "tool_call", name=str(name)[:64], duration_ms=round(seconds * 1000, 1),
                   outcome=outcome)

    def model_state(self, call: Any, state: str, reason: str = "") -> None:
        if state in ("reconnecting", "degraded", "live"):
            self.event(call, f"model_{state}", **({"reason": str(reason)[:200]} if reason else {}))

    def wire_tools(self, tools: Any, calls: dict[int, Any]) -> None:
        """Tool calls: POSTs signed with the webhook key; each finished call becomes a ``tool_call`` event."""
        tools.sign_key = self._sign_key

        def finished(key: tuple[int, int], name: str, seconds: float, outcome: str) -> None:
            call = calls.get(key[0])
            if call is not None and call.generation == key[1]:
                self.tool_done(call, name, seconds, outcome)

        tools.on_finished = finished

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
