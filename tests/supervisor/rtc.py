"""An aiortc caller for the supervisor tests: plays PCM on demand (silence otherwise) and records
what it hears, with wall-clock timestamps for mouth-to-ear latency."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection

RATE = 48000
FRAME = 960  # 20 ms


class PcmTrack(MediaStreamTrack):
    """Outgoing audio: queued int16 mono samples at 48 kHz, silence when the queue is empty."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._buf = np.zeros(0, dtype=np.int16)
        self._t0: float | None = None
        self._pts = 0
        self.play_started: float | None = None
        self.play_ended: float | None = None

    def play(self, samples: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, samples.astype(np.int16)])
        self.play_started = None
        self.play_ended = None

    async def recv(self) -> av.AudioFrame:
        if self._t0 is None:
            self._t0 = time.time()
        wait = self._t0 + self._pts / RATE - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if len(self._buf):
            if self.play_started is None:
                self.play_started = time.time()
            chunk, self._buf = self._buf[:FRAME], self._buf[FRAME:]
            if not len(self._buf):
                self.play_ended = time.time() + len(chunk) / RATE
            chunk = np.pad(chunk, (0, FRAME - len(chunk)))
        else:
            chunk = np.zeros(FRAME, dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame


class Recorder:
    """Records a remote audio track as mono int16 48 kHz with the arrival time of each frame."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, np.ndarray]] = []
        self._task: asyncio.Task[None] | None = None

    def attach(self, track: MediaStreamTrack) -> None:
        self._task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                arr = frame.to_ndarray()
                channels = len(frame.layout.channels)
                mono = arr.reshape(-1, channels)[:, 0] if arr.ndim == 2 and channels > 1 else arr.reshape(-1)
                if frame.sample_rate != RATE:
                    import soxr

                    mono = soxr.resample(mono, frame.sample_rate, RATE).astype(np.int16)
                self.chunks.append((time.time(), mono.astype(np.int16)))

    def since(self, t: float) -> np.ndarray:
        parts = [c for ts, c in self.chunks if ts >= t]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def first_loud_after(self, t: float, rms: float = 500.0) -> float | None:
        for ts, c in self.chunks:
            if ts >= t and len(c) and float(np.sqrt(np.mean(c.astype(np.float64) ** 2))) > rms:
                return ts
        return None

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def caller() -> tuple[RTCPeerConnection, PcmTrack, Recorder]:
    pc = RTCPeerConnection()
    track = PcmTrack()
    rec = Recorder()
    pc.addTrack(track)
    pc.on("track", rec.attach)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, track, rec
