"""Turn detection for the emulator: automatic (frame energy + silence duration) or manual (activity marks).

A real model uses a neural VAD; for an emulator an energy gate is enough and, unlike a model, exactly
predictable in tests: speech starts at the first 20 ms frame above the threshold and ends after
``silence_ms`` of frames below it. Trailing silence is trimmed from the utterance so an echo lines up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FRAME_MS = 20


@dataclass
class TurnEvent:
    kind: str  # "start" | "end"
    utterance: bytes = b""  # for "end": the caller's audio of that turn (PCM16 at the input rate)


@dataclass
class TurnDetector:
    """Feeds caller PCM16 in, yields start/end events. ``manual`` ignores energy, obeys marks only."""

    rate: int = 16000
    manual: bool = False
    silence_ms: int = 500
    prefix_ms: int = 40
    threshold_dbfs: float = -45.0
    speaking: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _utt: bytearray = field(default_factory=bytearray)
    _silent_ms: int = 0
    _voiced_len: int = 0
    _prefix: bytearray = field(default_factory=bytearray)

    @property
    def frame_bytes(self) -> int:
        return self.rate * FRAME_MS // 1000 * 2

    def activity_start(self) -> list[TurnEvent]:
        if self.speaking:
            return []
        self.speaking = True
        self._utt = bytearray()
        return [TurnEvent("start")]

    def activity_end(self) -> list[TurnEvent]:
        if not self.speaking:
            return []
        self.speaking = False
        utt = bytes(self._utt)
        self._utt = bytearray()
        return [TurnEvent("end", utt)]

    def stream_end(self) -> list[TurnEvent]:
        """``audioStreamEnd``: flush an automatic turn in progress."""
        if self.manual or not self.speaking:
            return []
        self.speaking = False
        utt = bytes(self._utt[: self._voiced_len])
        self._utt = bytearray()
        return [TurnEvent("end", utt)]

    def feed(self, pcm: bytes) -> list[TurnEvent]:
        if self.manual:
            if self.speaking:
                self._utt += pcm
            return []
        events: list[TurnEvent] = []
        self._buf += pcm
        fb = self.frame_bytes
        while len(self._buf) >= fb:
            frame = bytes(self._buf[:fb])
            del self._buf[:fb]
            x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
            rms = float(np.sqrt(np.mean(x * x))) / 32768.0
            loud = rms > 0 and 20 * np.log10(rms) > self.threshold_dbfs
            if not self.speaking:
                if loud:
                    self.speaking = True
                    self._utt = bytearray(self._prefix) + frame
                    self._voiced_len = len(self._utt)
                    self._silent_ms = 0
                    events.append(TurnEvent("start"))
                else:
                    self._prefix += frame
                    keep = self.rate * self.prefix_ms // 1000 * 2
                    del self._prefix[: max(0, len(self._prefix) - keep)]
                continue
            self._utt += frame
            if loud:
                self._silent_ms = 0
                self._voiced_len = len(self._utt)
            else:
                self._silent_ms += FRAME_MS
                if self._silent_ms >= self.silence_ms:
                    self.speaking = False
                    events.append(TurnEvent("end", bytes(self._utt[: self._voiced_len])))
                    self._utt = bytearray()
                    self._prefix = bytearray()
        return events
