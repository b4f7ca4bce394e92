"""Which model a new call runs on: the tenant's primary, or its fallback (docs/architecture.md
"Tenants and model routing").

Chosen once per call, in the supervisor at session creation, and recorded (session record ``model``,
slot option ``model``): the AI worker connects to exactly that model for the whole call, resumes
included (a Live resume handle belongs to the model that issued it).

- primary's breaker open (or half-open with a probe in flight) → the fallback;
- else the fallback with probability ``fallback_weight`` (a weighted split, "80 % to Flash"), drawn
  from a ``random.Random`` the caller owns (tests seed it);
- no ``fallback_model`` → always the primary (its breaker then only degrades calls, as before).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.config import ModelConfig

PRIMARY, FALLBACK = "primary", "fallback"


@dataclass(frozen=True)
class Route:
    model: str
    reason: str  # "primary" | "weighted" | "breaker_open" (the supervisor adds "resumed"); a metric label


async def choose(m: ModelConfig, rng: random.Random,
                 breaker_state: Callable[[str], Awaitable[str]] | None) -> Route:
    """The model for one new call of a tenant whose merged model section is ``m``.

    ``breaker_state(model)`` returns the primary's breaker state ("closed" | "open" | "half_open");
    None means no breaker is consulted."""
    if not m.fallback_model:
        return Route(m.model, "primary")
    if breaker_state is not None and await breaker_state(m.model) == "open":
        return Route(m.fallback_model, "breaker_open")
    if m.fallback_weight > 0 and rng.random() < m.fallback_weight:
        return Route(m.fallback_model, "weighted")
    return Route(m.model, "primary")
