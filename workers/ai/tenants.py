"""What each tenant's calls run with in the AI worker: its model section, tool declarations and runner,
greeting audio and (when it names its own endpoint) Live client settings.

Why here and not in the slot options: a system prompt and a tool set can be kilobytes (the options
block is small and copied per call), and the worker reads the same config file as the supervisor.
So the supervisor writes only the tenant's *name* and the routed *model* into the slot options
(appliance/sessions.py) and each worker builds one :class:`TenantProfile` per configured tenant at start
(tools file read and checked once, greeting synthesised once per text+language through the prompt
cache). docs/architecture.md "Tenants and model routing".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from appliance.config import (
    DEFAULT_TENANT,
    ENDPOINT_KEYS,
    Config,
    ModelConfig,
    TenantConfig,
    load_tool_declarations,
    secret,
    tenant,
)
from workers.ai.greeting import PromptCache
from workers.ai.live.settings import ClientSettings
from workers.ai.secure_entry import PaymentEndpoint, declarations
from workers.ai.tools import ToolRunner

log = logging.getLogger(__name__)


@dataclass
class TenantProfile:
    name: str
    model: ModelConfig  # the merged [model] + [tenants.<name>] section
    tools: ToolRunner
    tool_decls: list[dict[str, object]] | None
    own_endpoint: bool  # sets platform/project/location/keys itself: its own ClientSettings
    payment: PaymentEndpoint  # PCI secure keypad entry's endpoint (workers/ai/secure_entry.py)
    tool_key: bytes = b""  # tools_secret(_file): signs this tenant's tool POSTs (else the webhook key)
    greeting: bytes = b""
    _settings: ClientSettings | None = None

    def own_tool_key(self) -> None:
        """After the records wiring set the box's webhook key: a tenant's own key wins."""
        if self.tool_key:
            self.tools.sign_key = self.tool_key

    def model_for(self, chosen: str) -> ModelConfig:
        """The section with the routed model (the primary, or its fallback) in ``model``. Anything
        else in the options (a stale or forged name) gets the primary."""
        m = self.model
        if chosen and chosen != m.model and chosen == m.fallback_model:
            return dataclasses.replace(m, model=chosen)
        if chosen and chosen != m.model:
            log.warning("routed model is not this tenant's; using its primary",
                        extra={"tenant": self.name, "model": chosen[:80]})
        return m

    def settings(self, default: ClientSettings) -> ClientSettings:
        """The worker's settings unless the tenant names its own endpoint (e.g. Vertex in its region)."""
        if not self.own_endpoint:
            return default
        if self._settings is None:
            self._settings = ClientSettings.for_model(self.model)
        return self._settings


def _profile(t: TenantConfig) -> TenantProfile:
    m = t.model
    decls = declarations(load_tool_declarations(m.tools_file) if m.tools_file else None, m)
    own = bool(ENDPOINT_KEYS & set(t.overrides))
    key = secret(m.tools_secret, m.tools_secret_file).encode()
    profile = TenantProfile(t.name, m, ToolRunner(m.tools_url, m.tools_timeout_seconds), decls, own,
                            PaymentEndpoint(m.payment_url, m.payment_timeout_seconds), key)
    profile.own_tool_key()
    return profile


class TenantProfiles:
    """Every configured tenant's profile, plus the default (top-level ``[model]``)."""

    def __init__(self, cfg: Config) -> None:
        self.default = _profile(tenant(cfg, None))
        self.by_name = {n: _profile(t) for n, t in cfg.tenants.items()}

    def all(self) -> list[TenantProfile]:
        return [self.default, *self.by_name.values()]

    def of(self, options: Mapping[str, object]) -> TenantProfile:
        """The profile named by a call's slot options ("" or absent: the default tenant)."""
        name = str(options.get("tenant") or "")
        if not name or name == DEFAULT_TENANT:
            return self.default
        p = self.by_name.get(name)
        if p is None:  # the supervisor checked it; a worker with an older config must still serve
            log.warning("call for a tenant this worker does not know; using the default",
                        extra={"tenant": name[:40]})
            return self.default
        return p

    async def prepare(self, prompts: PromptCache) -> None:
        """Synthesise each tenant's greeting (the cache is per text+language, so shared texts cost once)."""
        for p in self.all():
            if p.model.greeting:
                p.greeting = await prompts.get_async(p.model.greeting, p.model.language)

    async def aclose(self) -> None:
        for p in self.all():
            await p.tools.aclose()
            await p.payment.aclose()
