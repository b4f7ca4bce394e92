"""The supervisor's part of the call record: a call's row (created, connected, resumed, ended with its
reason, quality and counters), spooled like the workers' items (``spool``'s ``supervisor`` directory)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from appliance.config import Config
from appliance.records.quality import from_counters
from appliance.records.spool import Spool, spool_keyring_for, spool_root

log = logging.getLogger(__name__)


class SupervisorRecorder:
    """No-op unless ``records.dsn`` is set."""

    def __init__(self, cfg: Config, box: str) -> None:
        r = cfg.records
        self.box = box
        self.cfg = cfg
        self.spool: Spool | None = None
        if r.dsn:
            self.spool = Spool(spool_root(cfg.paths.state_dir, r.spool_dir) / "supervisor",
                               max_bytes=r.spool_max_bytes, segment_bytes=r.spool_segment_bytes,
                               fsync_seconds=r.spool_fsync_seconds,
                               keyring=spool_keyring_for(cfg, "supervisor"))

    def _put(self, kind: str, call_id: str, **fields: Any) -> None:
        if self.spool is None:
            return
        try:
            self.spool.append(kind, call_id, **fields)
        except OSError as exc:
            log.warning("record spool write failed", extra={"session": call_id, "error": str(exc)})

    def created(self, live: Any, *, resumed: bool, voice: str, language: str,
                tenant: str | None = None, model: str | None = None) -> None:
        """``model``: the one routing chose (appliance/routing.py); ``voice``/``language`` already the
        tenant's defaults when the caller gave none."""
        m = self.cfg.model
        if resumed:
            self._put("call.resumed", live.session_id, box=self.box)
        self._put("call.created", live.session_id, box=self.box, sub=live.sub, tenant=tenant, mode=live.mode,
                  model=model or m.model, voice=voice or m.voice, language=language or m.language)

    def connected(self, live: Any) -> None:
        self._put("call.connected", live.session_id)

    def ended(self, live: Any, reason: str, slot: Any) -> None:
        counters: dict[str, int] = {}
        if slot is not None:
            with contextlib.suppress(Exception):
                if slot.is_current(live.generation):
                    counters = dict(slot.counters.snapshot())
        self._put("call.ended", live.session_id, box=self.box, sub=live.sub, mode=live.mode,
                  created_at=live.created_at, reason=reason, quality=from_counters(counters),
                  counters={k: v for k, v in counters.items() if v})

    def audit(self, actor: str, action: str, subject: str = "",
              details: dict[str, Any] | None = None) -> None:
        """An audit entry (admin API access, …); the record writer chains it (compliance/trail.py)."""
        self._put("audit", subject, actor=actor, action=action, subject=subject, details=details or {})

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
