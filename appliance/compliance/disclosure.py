"""The AI disclosure switched off is never silent (EU AI Act art. 50): config loading refuses
``compliance.ai_disclosure = false`` without ``compliance.ai_disclosure_off_reason`` (appliance/config.py),
and every start of the supervisor logs a warning and appends an audit entry
``compliance.ai_disclosure_off`` carrying the reason, so an auditor sees for which periods callers were
not told by the appliance that they talk with an AI (docs/compliance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from appliance.config import Config

log = logging.getLogger(__name__)

ACTION = "compliance.ai_disclosure_off"
MAX_REASON = 500

Audit = Callable[[str, str, str, dict[str, Any] | None], None]  # (actor, action, subject, details)


def announce(cfg: Config, audit: Audit | None) -> bool:
    """At start-up: when the disclosure is off, say so (log + audit entry). True if it is off."""
    c = cfg.compliance
    if c.ai_disclosure:
        return False
    reason = c.ai_disclosure_off_reason.strip()[:MAX_REASON]
    log.warning("AI disclosure is OFF: callers are not told they talk with an AI", extra={"reason": reason})
    if audit is not None:
        audit("system", ACTION, "", {"reason": reason})
    return True
