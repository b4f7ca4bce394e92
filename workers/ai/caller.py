"""One call's caller side in the AI worker: the VAD window, pre-roll, turn detector and keypad entry.

The worker feeds every uplink frame here (``push``); whole 512-sample windows go to the batched VAD and
their probabilities back to ``detector``; while ``sending`` (the caller's turn is open) the audio also
goes to the model. ``quiet_tail``/``silent`` use the energy gate to place a turn's end precisely
(workers/ai/turns.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers.ai.dtmf import DtmfBuffer
from workers.ai.turns import PreRoll, TurnDetector, TurnParams
from workers.ai.vad import WindowBuffer


@dataclass
class CallerTurn:
    """The caller's side of one (slot, generation)."""

    detector: TurnDetector
    preroll: PreRoll
    keypad: DtmfBuffer
    window: WindowBuffer = field(default_factory=WindowBuffer)
    sending: bool = False  # caller turn open: uplink audio goes to the model
    dtmf: str = ""  # keypad digits the caller pressed (last 32), from the media worker's events

    @classmethod
    def new(cls, params: TurnParams, preroll_ms: int, dtmf_flush_ms: int) -> CallerTurn:
        return cls(TurnDetector(params), PreRoll(preroll_ms), DtmfBuffer(dtmf_flush_ms))

    def push(self, pcm: bytes) -> list[tuple[np.ndarray, int]]:
        """Uplink audio in; the whole VAD windows it completes out, as (window, end sample)."""
        self.window.push(pcm)
        self.preroll.push(pcm, self.window.position)
        out = []
        while self.window.has_window():
            out.append(self.window.pop_window())
        return out

    def resume(self) -> None:
        """Continue a turn a previous worker (or session) had open: the caller is mid-utterance."""
        if not self.detector.speaking:
            self.sending = True
            self.detector.resume_speaking(self.window.position)


def quiet_tail(chunk: np.ndarray, gate_mean_square: float) -> int:
    """Samples at the end of a 512-sample window below the energy gate, in 4 ms (64-sample) blocks."""
    x = chunk.astype(np.float32).reshape(8, 64)
    loud = np.flatnonzero(np.einsum("ij,ij->i", x, x) >= gate_mean_square * 64)
    return 512 if loud.size == 0 else (7 - int(loud[-1])) * 64


def silent(pcm: np.ndarray, gate_mean_square: float) -> bool:
    x = pcm.astype(np.float32)
    return float(np.dot(x, x)) < gate_mean_square * pcm.size
