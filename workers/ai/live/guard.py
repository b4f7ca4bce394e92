"""The model circuit breaker on the Live connect path (issue 15): one per AI worker process.

Why a module-level hook rather than a constructor argument: every ``LiveSession`` of the process shares
the one breaker, and the worker installs it once at start (``workers/ai/main.py``); sessions created by
tests or tools without it stay unguarded. Rules and state: ``appliance/breaker.py``; how the session uses
it: docs/architecture.md "Model circuit breaker".
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_BREAKER: Any = None  # appliance.breaker.Breaker


def install_breaker(breaker: Any) -> None:
    """Guard every connect/setup of this process with ``breaker`` (None: unguarded)."""
    global _BREAKER
    _BREAKER = breaker


async def allow() -> tuple[bool, str]:
    """(may connect, probe id to report with). False: the breaker is open — do not touch the model."""
    if _BREAKER is None:
        return True, ""
    from appliance.breaker import Decision

    decision, probe_id = await _BREAKER.allow()
    if decision is Decision.DENY:
        return False, ""
    return True, probe_id if decision is Decision.PROBE else ""


async def record(ok: bool, probe_id: str = "") -> None:
    """Report a connect/setup outcome (or a 1011/1013 close as a failure); never raises."""
    if _BREAKER is None:
        return
    try:
        await _BREAKER.record(ok, probe_id)
    except Exception:  # the breaker must never break a call
        log.exception("model breaker update failed")
