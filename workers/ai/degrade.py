"""Degradation tiers a caller hears while the model is unreachable (issue: resilience).

A pure state machine: the AI worker feeds it time, keypad digits and whether the model is available
(breaker closed and the Live session up) and performs what it returns (play a cached prompt, read a
number back, emit an event, end the call). Keeping it free of audio, sockets and the SDK makes every
path testable in microseconds and keeps the worker's tick small.

Tiers, in order (the seed's): (1) a cached spoken message ("I'm having trouble connecting, one moment")
and a bounded wait (``wait_seconds``) for the model; (2) a keypad menu — 1 keep waiting, 2 leave a
callback number, 3 be transferred (an event for the operator's backend); (3) hold with callback: the
number is collected by keypad (never logged: :class:`CallbackRequested` hides it from ``repr``), read back,
confirmed with 1 (2 re-enters), stored as a callback request, goodbye, end. ``max_hold_seconds`` bounds
the whole episode. A menu left unanswered (twice repeated) goes back to waiting rather than ending the
call: a browser caller may have no keypad at all, and the model may come back. When the model returns
during the wait or the menu the call goes back to it and the caller is told (``back`` prompt); once
the caller chose to leave a number, that flow completes first (they asked for a call back, and the
model has no memory of the menu).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PROMPTS_EN = {
    "trouble": "I'm having trouble connecting right now. One moment, please.",
    "menu": "I'm still unable to connect. Press 1 to keep waiting, 2 to leave a number for a call back, "
            "or 3 to be transferred to a person.",
    "menu_no_transfer": "I'm still unable to connect. Press 1 to keep waiting, or 2 to leave a number "
                        "for a call back.",
    "keep_waiting": "Thank you. Please keep holding.",
    "enter_number": "Please enter your phone number on the keypad, then press the pound key.",
    "confirm": "Press 1 if that is correct, or 2 to enter it again.",
    "you_entered": "You entered",
    "goodbye_callback": "Thank you. We will call you back as soon as possible. Goodbye.",
    "transferring": "Transferring you now. Please hold.",
    "back": "Thank you for waiting. I'm back.",
    "max_hold": "I'm sorry, I can't connect right now. Please try again later. Goodbye.",
    "no_input": "Sorry, I did not get that.",
}
DIGIT_KEYS = tuple(f"digit-{d}" for d in "0123456789")  # read-back prompts: the digit, spoken
PROMPT_KEYS = (*PROMPTS_EN, *DIGIT_KEYS)


@dataclass(frozen=True)
class DegradeSettings:
    wait_seconds: float = 20.0  # tier 1: how long to wait for the model before the menu
    menu_timeout_seconds: float = 8.0  # no key after the menu: repeat (twice), then wait again
    digit_timeout_seconds: float = 6.0  # while entering a number: a pause this long ends the entry
    max_hold_seconds: float = 300.0
    max_number_digits: int = 15  # E.164
    min_number_digits: int = 5
    transfer_enabled: bool = True


# --- outputs (what the worker does) ---------------------------------------------------------------
@dataclass(frozen=True)
class Play:
    prompt: str  # a key of the prompt table (cached audio)


@dataclass(frozen=True)
class ReadBack:
    digits: str = field(repr=False)  # spoken digit by digit from cached digit prompts; not logged


@dataclass(frozen=True)
class CallbackRequested:
    number: str = field(repr=False)  # goes to the call record (encrypted) and the webhook, never a log


@dataclass(frozen=True)
class Transfer:
    pass


@dataclass(frozen=True)
class BackToModel:
    pass


@dataclass(frozen=True)
class End:
    reason: str  # "callback" | "transferred" | "max_hold"


Action = Play | ReadBack | CallbackRequested | Transfer | BackToModel | End


class Phase(enum.Enum):
    WAITING = "waiting"
    MENU = "menu"
    COLLECT = "collect"
    CONFIRM = "confirm"
    DONE = "done"


class Degradation:
    """One call's degradation episode. Every method returns the actions to perform, in order."""

    def __init__(self, settings: DegradeSettings, now: float) -> None:
        self.s = settings
        self.started = now
        self.phase = Phase.WAITING
        self.deadline = now + settings.wait_seconds  # of the current phase
        self.menu_repeats = 0
        self._digits = ""
        self._menu = "menu" if settings.transfer_enabled else "menu_no_transfer"

    def begin(self) -> list[Action]:
        return [Play("trouble")]

    def _to(self, phase: Phase, now: float, timeout: float) -> None:
        self.phase, self.deadline = phase, now + timeout

    def _end(self, reason: str, *before: Action) -> list[Action]:
        self.phase = Phase.DONE
        return [*before, End(reason)]

    def tick(self, now: float, model_available: bool) -> list[Action]:
        if self.phase is Phase.DONE:
            return []
        if model_available and self.phase in (Phase.WAITING, Phase.MENU):
            self.phase = Phase.DONE
            return [Play("back"), BackToModel()]
        if now - self.started >= self.s.max_hold_seconds and self.phase in (Phase.WAITING, Phase.MENU):
            return self._end("max_hold", Play("max_hold"))
        if now < self.deadline:
            return []
        match self.phase:
            case Phase.WAITING:
                self._to(Phase.MENU, now, self.s.menu_timeout_seconds)
                return [Play(self._menu)]
            case Phase.MENU:
                if self.menu_repeats >= 2:  # no keypad (a browser caller) or no choice: hold on
                    self.menu_repeats = 0
                    self._to(Phase.WAITING, now, self.s.wait_seconds)
                    return [Play("keep_waiting")]
                self.menu_repeats += 1
                self._to(Phase.MENU, now, self.s.menu_timeout_seconds)
                return [Play("no_input"), Play(self._menu)]
            case Phase.COLLECT:
                return self._finish_number(now)
            case Phase.CONFIRM:
                self._to(Phase.CONFIRM, now, self.s.menu_timeout_seconds)
                return [Play("no_input"), Play("confirm")]
        return []

    def digit(self, d: str, now: float) -> list[Action]:
        match self.phase:
            case Phase.MENU | Phase.WAITING:
                if d == "1":
                    self._to(Phase.WAITING, now, self.s.wait_seconds)
                    return [Play("keep_waiting")]
                if d == "2":
                    self._digits = ""
                    self._to(Phase.COLLECT, now, self.s.digit_timeout_seconds * 3)
                    return [Play("enter_number")]
                if d == "3" and self.s.transfer_enabled:
                    return self._end("transferred", Play("transferring"), Transfer())
                return [] if self.phase is Phase.WAITING else [Play("no_input"), Play(self._menu)]
            case Phase.COLLECT:
                if d == "#":
                    return self._finish_number(now)
                if d == "*":
                    self._digits = ""
                    self._to(Phase.COLLECT, now, self.s.digit_timeout_seconds * 3)
                    return [Play("enter_number")]
                if d.isdigit():
                    self._digits += d
                    self.deadline = now + self.s.digit_timeout_seconds
                    if len(self._digits) >= self.s.max_number_digits:
                        return self._finish_number(now)
                return []
            case Phase.CONFIRM:
                if d == "1":
                    number, self._digits = self._digits, ""
                    return self._end("callback", CallbackRequested(number), Play("goodbye_callback"))
                if d == "2":
                    self._digits = ""
                    self._to(Phase.COLLECT, now, self.s.digit_timeout_seconds * 3)
                    return [Play("enter_number")]
                return []
        return []

    def _finish_number(self, now: float) -> list[Action]:
        if len(self._digits) < self.s.min_number_digits:
            self._digits = ""
            self._to(Phase.COLLECT, now, self.s.digit_timeout_seconds * 3)
            return [Play("no_input"), Play("enter_number")]
        self._to(Phase.CONFIRM, now, self.s.menu_timeout_seconds)
        return [Play("you_entered"), ReadBack(self._digits), Play("confirm")]
