"""The degradation tiers (workers/ai/degrade.py) acted out on a call: prompts the caller hears, the
keypad, and what each outcome does (issue 15).

Why a module beside the state machine: ``degrade.py`` decides (pure, microsecond tests); this is the
part that touches a call — its downlink (prompts queued like the greeting), its keypad (digits go here,
never to the model and never to a log, while an episode runs), its record (callback and transfer
requests through the records spool, which also make the webhooks) and its end.

When an episode starts: the Live session reports ``degraded`` (the breaker was open at call start, or
connect/resume kept failing mid-call). The worker keeps re-opening the session as before
(``model.degraded_retry_seconds``; the breaker makes those attempts free while it is open); the model
counts as back when the session is ``live`` again, and the caller is told ("I'm back") unless they are
already leaving a number.

Prompts: rendered once per language at worker start, like the greeting (espeak-ng through
:class:`~workers.ai.greeting.PromptCache`, cached on disk), or taken from operator WAV files
(``degrade.audio_dir/<language>/<key>.wav``). Texts: the English table of ``degrade.py``, overridden per
language by ``degrade.prompts_file``. A call in a language not rendered yet hears the default language
while its own renders in the background. The read-back speaks each digit (``digit-0`` … ``digit-9``:
espeak says the digit in the call's language).

Ending the call: after the goodbye has played (the downlink ring is empty) the worker writes
``model_state = "ended:degraded_<reason>"`` into the slot (``shm.segment.MODEL_STATE_ENDED``, as the
consent step does); the supervisor's mirror loop (≤ 1 s) tears the session down with that reason — the
supervisor stays the only writer of slot state.
"""

from __future__ import annotations

import asyncio
import logging
import time
import wave
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import Config, DegradeConfig, load_degrade_prompts
from shm.audio import DOWN_FRAME
from shm.segment import MODEL_STATE_ENDED
from workers.ai.degrade import (
    DIGIT_KEYS,
    PROMPT_KEYS,
    PROMPTS_EN,
    Action,
    BackToModel,
    CallbackRequested,
    Degradation,
    DegradeSettings,
    End,
    Play,
    ReadBack,
    Transfer,
)
from workers.ai.greeting import PromptCache, chime, wav_to_pcm24k

if TYPE_CHECKING:
    from workers.ai.call import Call
    from workers.ai.records import CallRecorder
    from workers.ai.tenants import TenantProfiles

log = logging.getLogger(__name__)

END_REASONS = ("callback", "transferred", "max_hold")  # as degraded_<reason> in sessions.ENDED_REASONS


def settings_of(cfg: DegradeConfig) -> DegradeSettings:
    return DegradeSettings(wait_seconds=cfg.wait_seconds, menu_timeout_seconds=cfg.menu_timeout_seconds,
                           digit_timeout_seconds=cfg.digit_timeout_seconds,
                           max_hold_seconds=cfg.max_hold_seconds, transfer_enabled=bool(cfg.transfer_target))


class DegradePrompts:
    """Prompt key → 24 kHz PCM, per language."""

    def __init__(self, cfg: DegradeConfig, cache: PromptCache, default_language: str) -> None:
        self.cfg = cfg
        self.cache = cache
        self.default = default_language
        self.texts_by_lang = load_degrade_prompts(cfg.prompts_file) if cfg.prompts_file else {}
        self._pcm: dict[str, dict[str, bytes]] = {}
        self._rendering: dict[str, asyncio.Task[None]] = {}

    def text(self, language: str, key: str) -> str:
        own = self.texts_by_lang.get(language) or self.texts_by_lang.get(language.split("-")[0]) or {}
        if key in own:
            return own[key]
        if key in DIGIT_KEYS:
            return key[-1]
        return PROMPTS_EN[key]

    def _operator_file(self, language: str, key: str) -> bytes | None:
        if not self.cfg.audio_dir:
            return None
        path = Path(self.cfg.audio_dir) / language / f"{key}.wav"
        try:
            return wav_to_pcm24k(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, wave.Error) as exc:
            log.warning("operator prompt unusable; synthesising instead", extra={"file": str(path),
                                                                               "error": str(exc)})
            return None

    async def render(self, language: str) -> None:
        """Every prompt of ``language`` (operator file, else espeak-ng via the cache), a few at a time."""
        out: dict[str, bytes] = {}
        sem = asyncio.Semaphore(4)

        async def one(key: str) -> None:
            async with sem:
                pcm = self._operator_file(language, key)
                if pcm is None:
                    pcm = await self.cache.get_async(self.text(language, key), language)
                out[key] = pcm

        await asyncio.gather(*(one(k) for k in PROMPT_KEYS))
        self._pcm[language] = out

    async def prepare(self, languages: Iterable[str]) -> None:
        t0 = time.perf_counter()
        langs = sorted({self.default, *languages})
        await asyncio.gather(*(self.render(lang) for lang in langs))
        log.info("degradation prompts ready", extra={"languages": langs,
                                                     "seconds": round(time.perf_counter() - t0, 2)})

    def get(self, language: str, key: str) -> bytes:
        table = self._pcm.get(language)
        if table is None:  # render it for the next caller; this one hears the default language
            if language not in self._rendering:
                task = asyncio.get_running_loop().create_task(self.render(language))
                self._rendering[language] = task
            table = self._pcm.get(self.default, {})
        return table.get(key) or chime()


@dataclass
class Episode:
    """One call's degradation episode (``call.ivr`` while it runs)."""

    machine: Degradation
    language: str
    keys: list[str] = field(default_factory=list, repr=False)  # keypad digits for the menu; never logged
    ending: str = ""  # End reason: the call ends once the goodbye has played


def _queue(call: Call, pcm: bytes) -> None:
    """A prompt padded to whole 20 ms frames: only whole frames reach the ring, and the goodbye must
    play to its end before the call ends."""
    call.playback.queue(pcm + bytes(-len(pcm) % DOWN_FRAME))


class Ivr:
    """The worker's driver of every call's episode."""

    def __init__(self, cfg: Config, prompts: DegradePrompts, records: CallRecorder,
                 tenants: TenantProfiles) -> None:
        self.cfg = cfg.degrade
        self.settings = settings_of(cfg.degrade)
        self.prompts = prompts
        self.records = records
        self.tenants = tenants

    async def prepare(self) -> None:
        if self.cfg.enabled:
            await self.prompts.prepare(p.model.language for p in self.tenants.all())

    def degraded(self, call: Call, now: float) -> bool:
        """The model is unavailable for ``call``: start its episode (once). True: the episode speaks to
        the caller (no generic "please hold")."""
        if not self.cfg.enabled:
            return False
        if call.ivr is not None:
            return True
        lang = call.opt("language", self.tenants.of(call.options).model.language)
        call.ivr = Episode(Degradation(self.settings, now), lang)
        log.warning("model unavailable: degradation episode started", extra={"session": call.session_id})
        self.records.hold(call, "started")
        self._perform(call, call.ivr.machine.begin())
        return True

    def tick(self, call: Call, now: float) -> None:
        ep = call.ivr
        if ep is None:
            return
        if ep.ending:
            if not call.ended and not call.playback.playing():  # the goodbye has played: the supervisor
                state = f"{MODEL_STATE_ENDED}degraded_{ep.ending}"  # ends the call (appliance/sessions.py)
                call.set_model_state(state)
                call.ended = state
            return
        live = call.live
        available = live is not None and call.live_ok() and live.state == "live"
        keys, ep.keys = ep.keys, []
        for k in keys:
            self._perform(call, ep.machine.digit(k, now))
        self._perform(call, ep.machine.tick(now, available))

    def _perform(self, call: Call, actions: list[Action]) -> None:
        ep = call.ivr
        assert ep is not None
        for a in actions:
            match a:
                case Play(prompt=key):
                    _queue(call, self.prompts.get(ep.language, key))
                case ReadBack(digits=digits):
                    for d in digits:
                        _queue(call, self.prompts.get(ep.language, f"digit-{d}"))
                case CallbackRequested(number=number):
                    self.records.callback_requested(call, number)
                    log.info("callback requested", extra={"session": call.session_id, "digits": len(number)})
                case Transfer():
                    self.records.transfer_requested(call, self.cfg.transfer_target)
                    log.info("transfer requested", extra={"session": call.session_id})
                case BackToModel():
                    call.ivr = None
                    self.records.hold(call, "back_to_model")
                    log.info("model back: the call returns to it", extra={"session": call.session_id})
                case End(reason=reason):
                    ep.ending = reason
                    call.retry_at = 0.0  # the call is ending: no more model attempts
                    self.records.hold(call, reason)
                    log.info("degradation episode ends the call", extra={"session": call.session_id,
                                                                         "reason": reason})
