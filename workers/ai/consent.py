"""Consent capture (GDPR art. 6/7): with policy ``opt_in`` the caller agrees on the keypad before any of
the call reaches the model.

Policy per tenant (``[tenants.<name>] consent``, else ``compliance.consent``; appliance/config.py):

- ``none``: nothing asked, nothing recorded.
- ``announce``: the consent prompt plays after the greeting and a ``consent`` record item says so
  (``how: "announced"``); the call goes on at once.
- ``opt_in``: after the greeting the caller hears the prompt ("… press 1 if you agree …"). Until they
  press **1** the call's input is held back from the model: ``Call._target`` sends no audio, no
  activity marks and no text to the Live session or the outbox/journal (the Live session may already be
  connected: its setup carries only the configuration). Pressing 1 first appends the ``consent`` item —
  time, the text played, the purposes, how it was given — to the call record, *then* opens the gate, so
  the record holds the consent before the model hears anything. Any other key, or no key within
  ``compliance.consent_timeout_seconds`` after the prompt has played, is a refusal: it is recorded,
  the goodbye (``compliance.consent_refused_message``) plays, and once it has played the worker sets the
  slot's model state to ``ended:consent_refused`` (shm/segment.py ``MODEL_STATE_ENDED``), which makes the
  supervisor end the call like a hangup.

Why the keypad and not a spoken "yes": understanding speech needs a recogniser, and the only one in the
appliance is the model, which must not hear the caller before consent. A keypad answer is also
unambiguous evidence. The prompt therefore says "press 1".

The decision also lives in the slot's ``consent`` counter (1 given, 2 refused), so an AI worker that
restarts mid-call neither asks again after a yes nor lets a call through that has not answered.
The record item becomes an audit entry ``consent.recorded`` (appliance/compliance/trail.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.config import Config, TenantConfig, tenant
from shm.audio import DOWN_BYTES_PER_SECOND, DOWN_FRAME
from shm.segment import MODEL_STATE_ENDED

if TYPE_CHECKING:
    from workers.ai.call import Call
    from workers.ai.greeting import PromptCache
    from workers.ai.records import CallRecorder

log = logging.getLogger(__name__)

YES = "1"
PENDING, GIVEN, REFUSED = 0, 1, 2
COUNTER = "consent"
ENDED = MODEL_STATE_ENDED + "consent_refused"
END_MARGIN_S = 0.3  # after the goodbye left the ring: the media worker's last frame is on the wire
END_GRACE_S = 2.0  # beyond the goodbye's length: end even if the ring is not drained


@dataclass(frozen=True)
class ConsentPolicy:
    mode: str  # none | announce | opt_in
    prompt: str
    purposes: tuple[str, ...]
    refused_message: str
    timeout_s: float
    language: str

    @classmethod
    def of(cls, cfg: Config, t: TenantConfig) -> ConsentPolicy:
        c = cfg.compliance
        mode = t.consent if "consent" in t.overrides else c.consent
        return cls(mode, t.consent_prompt or c.consent_prompt, tuple(c.consent_purposes),
                   c.consent_refused_message, c.consent_timeout_seconds, t.model.language)


class Consent:
    """One call's consent step (``opt_in``): keypad answers and the deadline, from the keypad poll."""

    def __init__(self, gate: ConsentGate, call: Call, policy: ConsentPolicy, *, deadline: float,
                 state: int = PENDING) -> None:
        self.gate = gate
        self.call = call
        self.policy = policy
        self.deadline = deadline
        self.state = state
        self.end_after = deadline if state == REFUSED else 0.0
        self.end_by = self.end_after + END_GRACE_S if state == REFUSED else 0.0

    @property
    def waiting(self) -> bool:
        """Nothing of the call may reach the model (not answered yet, or refused)."""
        return self.state != GIVEN

    def press(self, key: str, now: float) -> None:
        if self.state == PENDING:
            self._decide(key == YES, "keypad", now)

    def _audible(self) -> bool:
        """Prompt audio still to be heard. Not ``Playback.playing``: a prompt's last partial frame may
        stay in the backlog until more audio comes, which must not hold the timeout off forever."""
        pb = self.call.playback
        ring = pb.slot.downlink
        return len(pb.pending) >= DOWN_FRAME or ring.free_space() < ring.capacity or pb.model_turn

    def due(self, now: float) -> None:
        playing = self._audible()
        if self.state == PENDING:
            if playing:  # the caller has the whole timeout after the prompt finished playing
                self.deadline = max(self.deadline, now + self.policy.timeout_s)
            elif now >= self.deadline:
                self._decide(False, "timeout", now)
        elif self.state == REFUSED and (now >= self.end_by or (now >= self.end_after and not playing)):
            if self.call.current() and self.call.ended != ENDED:
                self.call.set_model_state(ENDED)
                self.call.ended = ENDED
                log.info("call ended: no consent", extra={"session": self.call.session_id})

    def _decide(self, given: bool, how: str, now: float) -> None:
        call = self.call
        self.gate.record(call, self.policy, given=given, how=how)  # in the record before the gate opens
        self.state = GIVEN if given else REFUSED
        with contextlib.suppress(Exception):
            call.slot.counters.set(COUNTER, self.state)
        log.info("consent answered", extra={"session": call.session_id, "given": given, "how": how})
        if given:
            if call.caller.sending:  # the caller is mid-utterance: the model gets the rest as a turn
                call.send_mark(True)
            return
        goodbye = self.gate.audio.get((self.policy.refused_message, self.policy.language), b"")
        ring = call.playback.slot.downlink
        queued = len(call.playback.pending) + ring.capacity - ring.free_space() + len(goodbye)
        if goodbye:
            call.playback.queue(goodbye)
        self.end_after = now + END_MARGIN_S
        # at the latest once it all should have played (a media worker that stopped reading the ring)
        self.end_by = now + queued / DOWN_BYTES_PER_SECOND + END_GRACE_S


class ConsentGate:
    """The AI worker's consent step for every tenant: prompts synthesised once, one ``Consent`` per call."""

    def __init__(self, cfg: Config, records: CallRecorder) -> None:
        self.records = records
        self.default = ConsentPolicy.of(cfg, tenant(cfg, None))
        self.by_tenant = {n: ConsentPolicy.of(cfg, t) for n, t in cfg.tenants.items()}
        self.audio: dict[tuple[str, str], bytes] = {}

    def policy(self, name: str) -> ConsentPolicy:
        return self.by_tenant.get(name, self.default)

    async def prepare(self, prompts: PromptCache) -> None:
        for p in (self.default, *self.by_tenant.values()):
            if p.mode == "none":
                continue
            for text in (p.prompt, p.refused_message):
                if text and (text, p.language) not in self.audio:
                    pcm = await prompts.get_async(text, p.language)
                    # whole downlink frames: a partial last frame would never leave the backlog
                    self.audio[(text, p.language)] = pcm + bytes(-len(pcm) % DOWN_FRAME)

    def attach(self, call: Call, *, fresh: bool) -> bytes:
        """A worker took the call: set up its consent step; the prompt audio to play after the greeting
        (a fresh call only)."""
        p = self.policy(str(call.options.get("tenant") or ""))
        if p.mode == "none":
            return b""
        prompt = self.audio.get((p.prompt, p.language), b"") if fresh else b""
        if p.mode == "announce":
            if fresh:
                self.record(call, p, given=True, how="announced")
            return prompt
        state = PENDING
        with contextlib.suppress(Exception):
            state = 0 if fresh else call.slot.counters.get(COUNTER)
        if state == GIVEN:
            return b""
        now = time.monotonic()
        if fresh:
            deadline = now + p.timeout_s
        else:  # a restarted worker: the prompt played already; give the caller the usual time again
            deadline = now + p.timeout_s if state == PENDING else now
        call.consent = Consent(self, call, p, deadline=deadline, state=state)
        return prompt

    def record(self, call: Call, p: ConsentPolicy, *, given: bool, how: str) -> None:
        self.records.event(call, "consent", given=given, how=how, policy=p.mode, text=p.prompt,
                           purposes=list(p.purposes), language=p.language, at=time.time())
