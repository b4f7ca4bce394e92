"""Batched Silero VAD on onnxruntime, shared by every session of one AI worker (one shard).

Why batched: one ONNX call per stream per 32 ms costs ~123 µs; one call over 32+ streams costs ~57 µs
per stream (FACTS), and per-row results are bit-identical to single-stream calls, so batching is free
accuracy-wise. Why hand-written instead of the ``silero-vad`` package: that package hard-requires torch
(hundreds of MB, seconds of import, many threads); we only need its MIT-licensed ``.onnx`` file.

The model is fed 512 new samples at 16 kHz plus the previous chunk's last 64 samples of context
(``input`` float32 [B, 576]) and a recurrent ``state`` float32 [2, B, 128]; without the context the
probability never rises (FACTS). Each stream keeps its own context and state here.

An energy gate runs first: a chunk whose RMS is below ``energy_gate_dbfs`` is silence for sure, gets
probability 0 without touching the network, and resets that stream's recurrent state (a fresh state is
what Silero starts every stream with; it is the right prior after silence). On a realistic duty cycle
~20-60 % of chunks are gated, which is the cheapest VAD there is. The gate's energy is the exact integer
sum of squares, computed for the whole batch in one numpy call (as are the int16 → float scaling and
the input rows): per-chunk numpy calls cost more than the gate saves. Probabilities and stream states
are bit-identical to feeding the chunks one by one. onnxruntime runs with one intra-op
thread: the worker is pinned to one core and must not spawn a thread pool fighting its own event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.models import silero_vad_onnx_path
from shm.audio import UP_RATE
from workers.levels import FULL_SCALE_MEAN_SQUARE, mean_square_of_dbfs

SAMPLE_RATE = UP_RATE  # shm/audio.py
WINDOW = 512  # new samples per chunk (32 ms at 16 kHz)
CONTEXT = 64  # samples of the previous chunk prepended to each input row
WINDOW_BYTES = WINDOW * 2
STATE_SHAPE = (2, 128)


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16 samples in dB relative to full scale (-inf for digital silence)."""
    if samples.size == 0:
        return -math.inf
    x = samples.astype(np.float32)
    ms = float(np.dot(x, x)) / samples.size
    if ms <= 0.0:
        return -math.inf
    return 10.0 * math.log10(ms / FULL_SCALE_MEAN_SQUARE)


@dataclass
class _Stream:
    state: np.ndarray  # float32 [2, 128]
    context: np.ndarray  # float32 [64]


@dataclass
class VadStats:
    """Counters for metrics and benchmarks (totals since start)."""

    chunks: int = 0  # every chunk handed to process()
    gated: int = 0  # chunks answered by the energy gate alone
    batches: int = 0  # onnxruntime calls
    inference_seconds: float = 0.0  # wall time inside onnxruntime (single thread: ≈ CPU time)


class BatchedVad:
    """Silero VAD for many streams; :meth:`process` runs one ONNX call for all non-silent chunks given.

    Streams are identified by any hashable key; they are created on first use and must be removed with
    :meth:`remove` when their session ends.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        energy_gate_dbfs: float = -55.0,
        intra_op_threads: int = 1,
    ) -> None:
        path = Path(model_path) if model_path is not None else silero_vad_onnx_path()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeError(f"cannot load Silero VAD model {path}: {exc}") from exc
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        # Energy gate threshold on the mean square of int16 samples (avoids a log per chunk).
        self._gate_ms = mean_square_of_dbfs(energy_gate_dbfs)
        self._streams: dict[Hashable, _Stream] = {}
        self.stats = VadStats()

    def __len__(self) -> int:
        return len(self._streams)

    def _stream(self, key: Hashable) -> _Stream:
        st = self._streams.get(key)
        if st is None:
            st = _Stream(np.zeros(STATE_SHAPE, np.float32), np.zeros(CONTEXT, np.float32))
            self._streams[key] = st
        return st

    def remove(self, key: Hashable) -> None:
        """Forget a stream (its session ended)."""
        self._streams.pop(key, None)

    def reset(self, key: Hashable) -> None:
        """Start a stream afresh (zero state and context)."""
        self._streams.pop(key, None)

    def process(self, chunks: Sequence[tuple[Hashable, np.ndarray]]) -> np.ndarray:
        """Speech probability for each (key, 512 int16 samples) chunk, in order; one ONNX call in total.

        A key may appear at most once per call (its chunks are sequential: call again for the next one).
        """
        n = len(chunks)
        probs = np.zeros(n, dtype=np.float32)
        if n == 0:
            return probs
        streams: list[_Stream] = []
        seen: set[Hashable] = set()
        for key, pcm in chunks:
            if pcm.shape != (WINDOW,):
                raise ValueError(f"VAD chunk must be {WINDOW} samples, got shape {pcm.shape}")
            if key in seen:
                raise ValueError(f"VAD stream {key!r} given twice in one batch")
            seen.add(key)
            streams.append(self._stream(key))
        self.stats.chunks += n
        # One array for the whole batch: the gate energy and the scaling are one numpy call each instead
        # of ~6 small calls per chunk (that per-chunk overhead was most of the VAD's Python time).
        pcm16 = np.stack([pcm for _, pcm in chunks])
        wide = pcm16.astype(np.int64)
        energy = np.einsum("ij,ij->i", wide, wide)  # exact sum of squares (int64 cannot overflow here)
        x = pcm16.astype(np.float32)
        x *= 1.0 / 32768.0
        loud = energy >= self._gate_ms * WINDOW
        rows = np.flatnonzero(loud)
        for i in np.flatnonzero(~loud).tolist():
            # Silence for sure: no inference; fresh state, context continues.
            st = streams[i]
            st.state.fill(0.0)
            st.context[:] = x[i, -CONTEXT:]
        self.stats.gated += n - rows.size
        if not rows.size:
            return probs
        b = rows.size
        inp = np.empty((b, CONTEXT + WINDOW), dtype=np.float32)
        inp[:, CONTEXT:] = x[rows]
        state = np.empty((2, b, 128), dtype=np.float32)
        live = [streams[i] for i in rows.tolist()]
        for j, st in enumerate(live):
            inp[j, :CONTEXT] = st.context
            state[:, j, :] = st.state
        t0 = time.perf_counter()
        out, new_state = self._session.run(None, {"input": inp, "state": state, "sr": self._sr})
        self.stats.inference_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        for j, st in enumerate(live):
            st.state[:] = new_state[:, j, :]
            st.context[:] = inp[j, -CONTEXT:]
        probs[rows] = out[:, 0]
        return probs


class WindowBuffer:
    """Collects a stream's 20 ms frames and hands out whole 512-sample VAD windows, keeping the remainder.

    ``position`` counts every sample received so far; a window's end position is where it ends in that
    timeline (used for turn timing, which is therefore in audio time, not wall time).
    """

    __slots__ = ("_buf", "position")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.position = 0

    def push(self, pcm: bytes) -> None:
        """Append PCM16 LE mono 16 kHz samples (an odd trailing byte is a caller bug)."""
        if len(pcm) % 2:
            raise ValueError("PCM16 data must have an even number of bytes")
        self._buf += pcm
        self.position += len(pcm) // 2

    def has_window(self) -> bool:
        return len(self._buf) >= WINDOW_BYTES

    def pop_window(self) -> tuple[np.ndarray, int]:
        """The oldest whole window (int16 samples) and the sample position where it ends."""
        chunk = np.frombuffer(bytes(self._buf[:WINDOW_BYTES]), dtype="<i2")
        del self._buf[:WINDOW_BYTES]
        end = self.position - len(self._buf) // 2
        return chunk, end

    def remainder(self) -> np.ndarray:
        """Samples received but not yet in a window."""
        return np.frombuffer(bytes(self._buf), dtype="<i2")
