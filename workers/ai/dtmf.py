"""Keypad digits (RFC 4733 DTMF) to the model, batched into one short text message per entry.

Why text: a browser (RTCDTMFSender) or a SIP phone sends keypresses as telephone-event RTP packets, not
as tones in the audio, so the model never hears them. The media worker decodes them into slot events
(one per key press); the AI worker turns them into ``realtime_input.text`` on the call's Live session —
what google-genai 3.4 sends for ``send_realtime_input(text=…)``, accepted by the Gemini Live API next to
audio. With manual activity detection (how the appliance runs) a text belongs to the caller turn it is
sent in, so digits pressed while no turn is open are wrapped in their own ``activityStart`` … text …
``activityEnd``: the model answers them like an utterance, with exactly one ``turnComplete`` or
``interrupted``, which keeps the Live layer's resume-handle accounting and the turn journal exact.
(``client_content`` with ``turnComplete`` would also trigger an answer, but outside any activity: an
extra ``turnComplete`` the layer could not attribute, and newer native-audio models accept client
content only to seed history.) Digits pressed while the caller is talking go into that open turn.
A keypress outside a turn also interrupts model speech, as in any phone menu.

Why batch: "press 1 for sales" wants one digit quickly, but a PIN or an order number sent digit by digit
would make the model answer after every key (each text would be a turn). So digits collect until

- ``#`` (the usual end-of-entry key; it is kept in the text so the model sees the caller finished),
- ``MAX_DIGITS`` digits, or
- ``model.dtmf_flush_ms`` (default 1000 ms) without a new key. Keypad typing runs at ~2-5 keys/s, so
  1 s rarely splits an entry, and a single menu choice still reaches the model ~1 s after the press
  (the worker polls media events every 100 ms, so ≤ 1.1 s). A split entry is still fine for the model:
  both parts arrive in order in the same conversation.
"""

from __future__ import annotations

from shm.audio import DTMF_EVENTS

DIGITS = DTMF_EVENTS  # RFC 4733 event codes 0-15 (shm/audio.py)
TERMINATOR = "#"
MAX_DIGITS = 32
TEXT_PREFIX = "The caller pressed these phone keypad keys: "


def digit_for(code: int) -> str | None:
    """The keypad character of an RFC 4733 event code (None for anything else)."""
    return DIGITS[code] if 0 <= code < len(DIGITS) else None


def dtmf_text(digits: str) -> str:
    """What the model receives for one entry."""
    return TEXT_PREFIX + digits


class DtmfBuffer:
    """Collects digits of one call; ``push``/``due`` return an entry when it is complete."""

    __slots__ = ("_digits", "_flush_s", "_last")

    def __init__(self, flush_ms: int) -> None:
        self._flush_s = flush_ms / 1000.0
        self._digits = ""
        self._last = 0.0

    @property
    def pending(self) -> str:
        return self._digits

    def push(self, digit: str, now: float) -> str | None:
        """Add one key press at monotonic time ``now``; returns the entry if this key completes it."""
        self._digits += digit
        self._last = now
        if digit == TERMINATOR or len(self._digits) >= MAX_DIGITS:
            return self.take()
        return None

    def due(self, now: float) -> str | None:
        """The pending entry if no key came for ``flush_ms``."""
        if self._digits and now - self._last >= self._flush_s:
            return self.take()
        return None

    def take(self) -> str:
        out, self._digits = self._digits, ""
        return out
