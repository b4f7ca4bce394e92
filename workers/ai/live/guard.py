"""The model circuit breakers on the Live connect path (issue 15): one per model, per AI worker process.

Why a module-level hook rather than a constructor argument: every ``LiveSession`` of the process shares
the breakers, and the worker installs them once at start (``workers/ai/main.py``); sessions created by
tests or tools without it stay unguarded. Breakers are per model (``appliance.breaker.model_breaker_name``)
because model routing sends new calls to a tenant's fallback while its primary's breaker is open.
Rules and state: ``appliance/breaker.py``; how the session uses it: docs/architecture.md "Model circuit
breaker".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.breaker import Breaker

log = logging.getLogger(__name__)

_FOR_MODEL: Callable[[str], Breaker] | None = None


def install(for_model: Callable[[str], Breaker] | None) -> None:
    """Guard every connect/setup of this process with ``for_model(model)``'s breaker (None: unguarded)."""
    global _FOR_MODEL
    _FOR_MODEL = for_model


def install_breaker(breaker: Breaker | None) -> None:
    """One breaker for every model (tests)."""
    install(None if breaker is None else (lambda _model: breaker))


async def allow(model: str) -> tuple[bool, str]:
    """(may connect, probe id to report with). False: the breaker is open — do not touch the model."""
    if _FOR_MODEL is None:
        return True, ""
    from appliance.breaker import Decision

    decision, probe_id = await _FOR_MODEL(model).allow()
    if decision is Decision.DENY:
        return False, ""
    return True, probe_id if decision is Decision.PROBE else ""


async def record(model: str, ok: bool, probe_id: str = "") -> None:
    """Report a connect/setup outcome (or a 1011/1013 close as a failure); never raises."""
    if _FOR_MODEL is None:
        return
    try:
        await _FOR_MODEL(model).record(ok, probe_id)
    except Exception:  # the breaker must never break a call
        log.exception("model breaker update failed")
