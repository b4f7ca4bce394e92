"""PCI-DSS secure keypad entry: while it is on, the caller's keypad digits go only to the payment endpoint.

Why: a card number typed on the keypad must not reach the model (Google), the logs, the crash journal,
the transcript, the call record or the recording — that keeps the appliance's model path out of PCI-DSS
cardholder-data scope ("DTMF masking / scope reduction", docs/compliance.md). So the digits of a secure
entry never pass through ``Call.send_dtmf`` (the text to the model and the outbox/journal), never land in
``CallerTurn.dtmf``, are never logged nor counted, and live in this object's memory only until the one
signed POST to ``model.payment_url`` is made; the model is told only the outcome.

How it starts:

- **Tool** ``collect_card_number`` (:data:`TOOL_NAME`): declared to the model with the configured tools
  whenever ``model.payment_url`` is set. The model asks the caller to type the number and calls it; the
  call's function response is the outcome (below), like any tool (workers/ai/tools.py conventions).
- **Config** ``model.secure_entry_at_start = true``: every new call of that tenant starts in secure entry
  (a payment line); the outcome goes to the model as one short text turn (:func:`outcome_text`).

It ends on ``#`` (not sent), ``model.secure_entry_max_digits`` digits, ``secure_entry_digit_timeout_seconds``
of quiet after the last digit, or — no digit at all — ``secure_entry_seconds`` after it began (timeout,
nothing is POSTed). ``*`` clears what was typed so far (start again); A-D are ignored. Digits the
caller typed just before the tool call arrived and that were still buffered (not yet sent to the model)
belong to the entry, not to the model. If the model withdraws its call (``toolCallCancellation``: the
caller spoke while typing, a barge-in) the entry goes on — the keypad never falls back to the model
mid-card —, the model's next ``collect_card_number`` call takes it over, and without one the outcome
reaches the model as text. Only the end of the call drops an entry.

Endpoint protocol: ``POST model.payment_url`` JSON ``{"session_id", "entry_id", "kind": "card_number",
"digits", "args"}`` signed like the tool calls (``X-VA-Signature``, appliance/records/signing.py, with
the tenant's tool key), ``X-VA-Event-Type: payment.card_number``, ``X-VA-Event-Id: <entry_id>``; a 2xx
JSON ``{"accepted": true|false}`` is the answer. What the model gets:

- accepted: ``{"status": "ok", "result": "card accepted"}``
- declined: ``{"status": "error", "error": "card declined", "retryable": true}``
- caller typed nothing in time: ``{"status": "error", "error": "no card number was entered in time",
  "retryable": true}``
- endpoint down, hanging past ``model.payment_timeout_seconds``, 429/5xx: retryable error; other 4xx,
  bad JSON, no ``accepted`` field: non-retryable error. The call always continues.

The call record and the audit trail get a ``secure_entry`` event (how it started, the outcome, its
duration) — that one happened, never the digits nor their count. Call recording pauses while
``Call.secure_entry_active`` is true.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from appliance.config import ModelConfig
from appliance.records import signing
from workers.ai.live.events import FunctionCall

if TYPE_CHECKING:
    from workers.ai.call import Call, Live
    from workers.ai.records import CallRecorder
    from workers.ai.tenants import TenantProfile

log = logging.getLogger(__name__)

TOOL_NAME = "collect_card_number"
TOOL_DECLARATION: dict[str, object] = {
    "name": TOOL_NAME,
    "description": ("Let the caller type a payment card number on the phone keypad, ending with #. "
                    "Tell the caller to do so before calling this. The digits go straight to the payment "
                    "processor; you only learn whether the card was accepted. Never ask the caller to "
                    "say card numbers aloud."),
    "parameters": {"type": "object",
                   "properties": {"purpose": {"type": "string",
                                              "description": "what the payment is for (no card data)"}}},
    # the model waits for the outcome (3.8 would otherwise declare it NON_BLOCKING and talk on while the
    # caller types): the caller is told to type, and the next thing said is whether the card was accepted
    "behavior": "BLOCKING",
}
CLEAR = "*"
END = "#"
MAX_ARGS_BYTES = 2048  # the model's args forwarded to the endpoint (a purpose, an amount)

Outcome = dict[str, Any]  # the function response / outcome object
Finish = Callable[[Outcome, str], None]  # (what the model is told, outcome label for record + audit)


def declarations(decls: list[dict[str, object]] | None, m: ModelConfig) -> list[dict[str, object]] | None:
    """The tenant's tool declarations with ``collect_card_number`` first when a payment endpoint is set."""
    if not m.payment_url:
        return decls
    return [TOOL_DECLARATION, *(d for d in decls or () if d.get("name") != TOOL_NAME)]


def outcome_text(result: Outcome) -> str:
    """What the model hears after a config-started entry (no tool call to answer)."""
    said = result.get("result") or result.get("error") or "unknown outcome"
    return f"The caller finished a secure keypad entry of a card number: {said}."


def _error(message: str, *, retryable: bool) -> Outcome:
    return {"status": "error", "error": message, "retryable": retryable}


@dataclass(frozen=True)
class EntryRules:
    max_digits: int = 19
    digit_timeout_s: float = 5.0
    start_timeout_s: float = 60.0

    @classmethod
    def of(cls, m: ModelConfig) -> EntryRules:
        return cls(m.secure_entry_max_digits, m.secure_entry_digit_timeout_seconds, m.secure_entry_seconds)


class PaymentEndpoint:
    """The signed POSTs of one tenant's secure entries (one ``httpx.AsyncClient``; ``trust_env=False``
    as for tools: an internal endpoint, never through a download proxy)."""

    def __init__(self, url: str, timeout: float, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.sign_key = b""  # the tenant's tool key (set with the ToolRunner's: workers/ai/tenants.py)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), trust_env=False,
                                             transport=self._transport,
                                             headers={"user-agent": "voice-appliance-ai-worker"})
        return self._client

    async def submit(self, session_id: str, entry_id: str, digits: str, args: dict[str, Any]) -> Outcome:
        """POST the entry; the model's outcome object. Never raises (but for cancellation)."""
        if not self.url:
            return _error("no payment endpoint is configured", retryable=False)
        body = json.dumps({"session_id": session_id, "entry_id": entry_id, "kind": "card_number",
                           "digits": digits, "args": args}, separators=(",", ":")).encode()
        headers = signing.headers(self.sign_key, body, event_id=entry_id, event_type="payment.card_number")
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self._http().post(self.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return _error(f"the payment service did not answer within {self.timeout:g} s", retryable=True)
        except httpx.HTTPError as exc:
            return _error(f"the payment service is unreachable ({type(exc).__name__})", retryable=True)
        finally:
            del body  # the request bytes held the digits
        if not 200 <= resp.status_code < 300:
            again = resp.status_code == 429 or resp.status_code >= 500
            return _error(f"the payment service answered HTTP {resp.status_code}", retryable=again)
        try:
            answer = resp.json()
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error("the payment service answered invalid JSON", retryable=False)
        accepted = answer.get("accepted") if isinstance(answer, dict) else None
        if accepted is True:
            return {"status": "ok", "result": "card accepted"}
        if accepted is False:
            return _error("card declined", retryable=True)
        return _error("the payment service gave no decision", retryable=False)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class SecureEntry:
    """One secure entry of one call: collects digits (``push``/``due`` from the worker's keypad poll),
    then POSTs them in a task and calls ``finish`` once with the outcome."""

    def __init__(self, session_id: str, endpoint: PaymentEndpoint, rules: EntryRules, finish: Finish, *,
                 via: str, call_id: str = "", args: dict[str, Any] | None = None,
                 now: float | None = None) -> None:
        self.session_id = session_id
        self.endpoint = endpoint
        self.rules = rules
        self.via = via  # "tool" | "config"
        self.call_id = call_id  # the function call waiting for the outcome; "": none (config, withdrawn)
        self.reply: Finish = lambda result, label: None  # how the outcome reaches the model (SecureEntries)
        self.entry_id = f"se-{secrets.token_hex(8)}"
        raw = json.dumps(args or {})
        self.args: dict[str, Any] = args if args and len(raw) <= MAX_ARGS_BYTES else {}
        self.started = time.monotonic() if now is None else now
        self.finished = False  # no more digits are taken (the POST may still be running)
        self._finish = finish
        self._digits: list[str] = []
        self._last = self.started
        self._task: asyncio.Task[None] | None = None

    def push(self, key: str, now: float) -> None:
        """One key press while the entry runs."""
        if self.finished:
            return
        if key == END:
            self._complete()
        elif key == CLEAR:
            self._digits.clear()
            self._last = now
        elif key.isdigit():
            self._digits.append(key)
            self._last = now
            if len(self._digits) >= self.rules.max_digits:
                self._complete()

    def due(self, now: float) -> None:
        """Time-based endings (called with every keypad poll)."""
        if self.finished:
            return
        if self._digits and now - self._last >= self.rules.digit_timeout_s:
            self._complete()
        elif not self._digits and now - self._last >= self.rules.start_timeout_s:
            self._done(_error("no card number was entered in time", retryable=True), "timeout")

    def _complete(self) -> None:
        digits, self._digits = "".join(self._digits), []
        if not digits:
            self._done(_error("no card number was entered", retryable=True), "empty")
            return
        self.finished = True
        self._task = asyncio.get_running_loop().create_task(self._post(digits), name=f"pay-{self.entry_id}")

    async def _post(self, digits: str) -> None:
        try:
            result = await self.endpoint.submit(self.session_id, self.entry_id, digits, self.args)
        except Exception:  # a bug here must still answer the model
            log.exception("secure entry submit crashed", extra={"session": self.session_id})
            result = _error("the payment could not be processed", retryable=False)
        finally:
            del digits
        label = ("accepted" if result.get("status") == "ok" else
                 "declined" if result.get("error") == "card declined" else "error")
        self._done(result, label)

    def _done(self, result: Outcome, label: str) -> None:
        self.finished = True
        self._digits.clear()
        log.info("secure keypad entry finished",
                 extra={"session": self.session_id, "via": self.via, "outcome": label})
        self._finish(result, label)

    def cancel(self) -> None:
        """The call ended: drop the digits, tell nobody."""
        self.finished = True
        self._digits.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()


class SecureEntries:
    """The AI worker's glue: starts entries from tool calls or config, routes their end to the model
    (function response or text turn) and to the call record (``secure_entry`` event → audit trail)."""

    def __init__(self, records: CallRecorder) -> None:
        self.records = records

    def intercept(self, call: Call, profile: TenantProfile, calls: tuple[FunctionCall, ...]
                  ) -> tuple[FunctionCall, ...]:
        """Take the ``collect_card_number`` calls out of a ``toolCall``; the rest go to the tool runner."""
        rest = tuple(c for c in calls if c.name != TOOL_NAME)
        for fc in calls:
            if fc.name != TOOL_NAME:
                continue
            call.slot.counters.add("tool_calls")
            asked = call.live
            entry = call.secure
            busy = entry is not None and bool(entry.call_id)  # another call of the model waits on it
            if busy or not profile.model.payment_url:
                why = "a secure entry is already running" if busy else "no payment endpoint is configured"
                if asked is not None:
                    asked.send_tool_response([{"id": fc.id, "name": TOOL_NAME,
                                               "response": _error(why, retryable=False)}])
                continue

            def respond(result: Outcome, label: str, fc: FunctionCall = fc,
                        asked: Live | None = asked) -> None:
                if call.closed or asked is None or call.live is not asked:
                    return  # the session that asked is gone: nobody waits for this answer
                asked.send_tool_response([{"id": fc.id, "name": TOOL_NAME, "response": result}])

            if entry is not None:  # a running entry nobody waits on (withdrawn, or config): this call's
                entry.call_id, entry.reply = fc.id, respond
                continue
            self._start(call, profile, "tool", respond, call_id=fc.id, args=dict(fc.args or {}))
        return rest

    @staticmethod
    def _teller(call: Call) -> Finish:
        """The outcome as a text turn (no function call waits for it)."""
        def tell(result: Outcome, label: str) -> None:
            if call.current():
                call.send_text_turn(outcome_text(result))

        return tell

    def at_start(self, call: Call, profile: TenantProfile) -> None:
        """``model.secure_entry_at_start``: a new call begins in secure entry."""
        if profile.model.secure_entry_at_start:
            self._start(call, profile, "config", self._teller(call))

    def cancelled(self, call: Call, ids: tuple[str, ...] | list[str]) -> None:
        """``toolCallCancellation`` (e.g. the caller spoke while typing: a barge-in): the model withdrew
        its ``collect_card_number`` call. The entry goes on — the caller may be half-way through the
        number, and the keypad must not fall back to the model mid-card — and its outcome reaches the
        model as text, or answers the model's next ``collect_card_number`` call."""
        entry = call.secure
        if entry is not None and entry.call_id and entry.call_id in ids:
            entry.call_id, entry.reply = "", self._teller(call)
            log.info("secure entry's tool call withdrawn; the entry goes on",
                     extra={"session": call.session_id})

    @staticmethod
    def closed(call: Call) -> None:
        if call.secure is not None:
            call.secure.cancel()
            call.secure = None

    def _start(self, call: Call, profile: TenantProfile, via: str, reply: Finish, *, call_id: str = "",
               args: dict[str, Any] | None = None) -> None:
        profile.payment.sign_key = profile.tools.sign_key  # the tenant's tool key (or the webhook key)

        def finish(result: Outcome, label: str) -> None:
            if call.secure is entry:
                call.secure = None
            self.records.event(call, "secure_entry", via=via, outcome=label,
                               duration_ms=round((time.monotonic() - entry.started) * 1000))
            if label != "accepted" and call.current():
                call.slot.counters.add("tool_errors")
            entry.reply(result, label)

        entry = SecureEntry(call.session_id, profile.payment, EntryRules.of(profile.model), finish,
                            via=via, call_id=call_id, args=args)
        entry.reply = reply
        now = time.monotonic()
        for key in call.caller.keypad.take():  # typed before the entry began, not sent yet: the card's
            entry.push(key, now)
        call.secure = entry
        self.records.event(call, "secure_entry_started", via=via)
        log.info("secure keypad entry started", extra={"session": call.session_id, "via": via})
