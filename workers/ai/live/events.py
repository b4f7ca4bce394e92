"""What a Live session tells its owner: typed events, no SDK types (the worker and tests import these).

``on_event`` is called synchronously on the loop for each; it must not block. ``StateChanged("closed")``
means the session ended on its own (e.g. the server sent a garbage frame); other sessions are
unaffected. ``ResumeHandle`` is emitted for every resumable handle, after the outbox has taken it into
account (``workers/ai/live/outbox.py``): the handle and the outbox's crash journal then describe the same
point of the conversation, so an owner storing the handle (the slot) stays consistent with the journal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["connecting", "live", "reconnecting", "degraded", "closed"]
Role = Literal["user", "model"]
JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


@dataclass(slots=True, frozen=True)
class AudioOut:
    pcm24k: bytes


@dataclass(slots=True, frozen=True)
class Interrupted:
    pass


@dataclass(slots=True, frozen=True)
class TurnComplete:
    pass


@dataclass(slots=True, frozen=True)
class Transcript:
    role: Role
    text: str
    final: bool = True


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    response_tokens: int
    total_tokens: int
    details: dict[str, dict[str, int]] | None = None  # {"input"|"output": {modality: tokens}} (records)


@dataclass(slots=True, frozen=True)
class StateChanged:
    state: State
    reason: str = ""


@dataclass(slots=True, frozen=True)
class ResumeHandle:
    handle: str


@dataclass(slots=True, frozen=True)
class FunctionCall:
    id: str
    name: str
    args: dict[str, JsonValue] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ToolCall:
    calls: tuple[FunctionCall, ...]


@dataclass(slots=True, frozen=True)
class ToolCallCancellation:
    ids: tuple[str, ...]


LiveEvent = (
    AudioOut | Interrupted | TurnComplete | Transcript | Usage | StateChanged | ResumeHandle | ToolCall
    | ToolCallCancellation
)


class Transcripts:
    """Assembles transcription fragments into the events above: partials as they come, one final per
    role when the server says ``finished`` or the turn completes."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: dict[Role, list[str]] = {"user": [], "model": []}

    def part(self, role: Role, text: str, finished: bool) -> list[Transcript]:
        parts = self._parts[role]
        if text:
            parts.append(text)
        if finished:
            return self._final(role)
        return [Transcript(role, text, False)] if text else []

    def flush(self) -> list[Transcript]:
        return self._final("user") + self._final("model")

    def _final(self, role: Role) -> list[Transcript]:
        parts = self._parts[role]
        if not parts:
            return []
        out = [Transcript(role, "".join(parts), True)]
        parts.clear()
        return out
