"""Which documented Gemini Live behaviour a model name selects, and the tool-calling vocabulary of it.

One owner for a fact three places need: the emulator acts a profile out, the config check refuses what a
profile forbids (3.8: proactive audio off), and the Live layer declares and answers tools the way the
profile expects (3.8: NON_BLOCKING by default, responses with ``scheduling``). No SDK import (the config
loads without it); the names equal google-genai 3.4's ``types.Behavior`` and
``types.FunctionResponseScheduling`` members (``tests/ai/live/test_tooling.py`` pins that).
docs/architecture.md "Live sessions" has the protocol.
"""

from __future__ import annotations

from typing import Literal

Profile = Literal["", "3.1", "3.8"]

BEHAVIORS = ("BLOCKING", "NON_BLOCKING")
SCHEDULINGS = ("SILENT", "WHEN_IDLE", "INTERRUPT")
# The SDK's and the service's own default: the result is spoken when the model has finished what it is
# saying — never cut off mid-sentence (INTERRUPT) and never silently swallowed (SILENT), so a tool file
# that says nothing gets the behaviour a caller finds least surprising.
DEFAULT_SCHEDULING = "WHEN_IDLE"


def model_profile(model: str) -> Profile:
    """``"3.8"``, ``"3.1"`` or ``""`` (2.5 native audio and anything unknown: the generic behaviour),
    from a bare, ``models/…`` or Vertex ``projects/…/models/…`` name."""
    name = model.rsplit("/", 1)[-1]
    for gen in ("3.8", "3.1"):
        if f"-{gen}-" in name or name.endswith(f"-{gen}"):
            return "3.8" if gen == "3.8" else "3.1"
    return ""


def non_blocking_by_default(profile: Profile) -> bool:
    """3.8 runs function calls asynchronously unless a declaration says ``BLOCKING``."""
    return profile == "3.8"


def proactive_audio_always_on(profile: Profile) -> bool:
    return profile == "3.8"
