"""Batched Silero VAD: real ONNX model, espeak-ng speech, silence/noise negatives, batch == single."""

from __future__ import annotations

import numpy as np
import pytest

from tests.ai.audio import frames, silence, white_noise
from workers.ai.vad import WINDOW, BatchedVad, WindowBuffer, rms_dbfs


def run_stream(vad: BatchedVad, key: str, pcm: np.ndarray) -> list[tuple[int, float]]:
    wb = WindowBuffer()
    out = []
    for f in frames(pcm):
        wb.push(f)
        while wb.has_window():
            chunk, end = wb.pop_window()
            out.append((end, float(vad.process([(key, chunk)])[0])))
    return out


def test_speech_detected_silence_and_noise_not(speech: np.ndarray) -> None:
    vad = BatchedVad()
    sig = np.concatenate([silence(1.0), speech, silence(1.0)])
    probs = run_stream(vad, "s", sig)
    start, end = 16000, 16000 + len(speech)
    inside = [p for e, p in probs if start + 3 * WINDOW <= e <= end]
    before = [p for e, p in probs if e <= start]
    after = [p for e, p in probs if e >= end + 3 * WINDOW]
    assert np.mean(np.array(inside) > 0.5) > 0.7
    assert max(before) < 0.1 and max(after) < 0.1
    first = next(e for e, p in probs if p >= 0.5)
    assert start <= first <= start + 6 * WINDOW  # onset within ~190 ms of the first loud sample
    noise = run_stream(vad, "n", white_noise(2.0, -30.0))
    assert max(p for _, p in noise) < 0.5
    assert vad.stats.gated > 0  # the digital silence never reached the network


def test_energy_gate_skips_inference() -> None:
    vad = BatchedVad(energy_gate_dbfs=-55.0)
    quiet = white_noise(0.032, -70.0)[:WINDOW]
    assert rms_dbfs(quiet) < -55
    vad.process([("q", quiet)])
    assert vad.stats.gated == 1 and vad.stats.batches == 0
    loud = white_noise(0.032, -30.0)[:WINDOW]
    vad.process([("q", loud)])
    assert vad.stats.batches == 1


def test_energy_gate_threshold_in_a_mixed_batch() -> None:
    """-55 dBFS mean square = 3395.5 per sample: a constant 58 (3364) is gated, 59 (3481) is not, whatever
    else shares the batch; a gated stream starts again from a fresh state."""
    vad = BatchedVad(energy_gate_dbfs=-55.0)
    loud = white_noise(0.032, -20.0)[:WINDOW]
    chunks = [("a", np.full(WINDOW, 58, np.int16)), ("b", np.full(WINDOW, -59, np.int16)), ("c", loud)]
    vad.process(chunks)
    assert vad.stats.gated == 1 and vad.stats.batches == 1
    assert not vad._streams["a"].state.any() and vad._streams["c"].state.any()
    np.testing.assert_array_equal(vad._streams["a"].context, np.full(64, 58 / 32768, np.float32))


def test_batch_equals_single_bit_identical(speech: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    streams = {}
    for i in range(12):
        # each stream: speech at a different offset, some with noise, one silent
        off = int(rng.integers(0, 16000))
        sig = np.concatenate([silence(off / 16000), speech, silence(0.5)])
        if i % 3 == 1:
            sig = np.clip(sig.astype(np.int32) + white_noise(len(sig) / 16000, -40.0, seed=i), -32768, 32767)
        if i == 5:
            sig = silence(4.0)
        streams[f"s{i}"] = sig[: 16000 * 4].astype(np.int16)
    single_vad = BatchedVad()
    single = {k: [p for _, p in run_stream(single_vad, k, v)] for k, v in streams.items()}
    batch_vad = BatchedVad()
    n = min(len(v) for v in streams.values()) // WINDOW
    batched: dict[str, list[float]] = {k: [] for k in streams}
    for w in range(n):
        chunks = [(k, v[w * WINDOW: (w + 1) * WINDOW]) for k, v in streams.items()]
        probs = batch_vad.process(chunks)
        for (k, _), p in zip(chunks, probs, strict=True):
            batched[k].append(float(p))
    for k in streams:
        assert batched[k] == single[k][:n], k  # exact equality, not approx
    assert batch_vad.stats.batches < single_vad.stats.batches


def test_bad_input_is_a_clear_error() -> None:
    vad = BatchedVad()
    with pytest.raises(ValueError, match="512"):
        vad.process([("a", np.zeros(100, np.int16))])
    with pytest.raises(ValueError, match="twice"):
        vad.process([("a", np.ones(WINDOW, np.int16) * 1000), ("a", np.ones(WINDOW, np.int16) * 1000)])
    with pytest.raises(RuntimeError, match="cannot load"):
        BatchedVad("/nonexistent/model.onnx")
    wb = WindowBuffer()
    with pytest.raises(ValueError, match="even"):
        wb.push(b"\0\0\0")


def test_window_buffer_keeps_remainder() -> None:
    wb = WindowBuffer()
    for i in range(5):  # 5 x 320 samples = 1600 = 3 windows + 64
        wb.push(np.full(320, i, np.int16).tobytes())
    ends = []
    while wb.has_window():
        chunk, end = wb.pop_window()
        assert chunk.shape == (WINDOW,)
        ends.append(end)
    assert ends == [512, 1024, 1536]
    assert wb.remainder().tolist() == [4] * 64
    assert wb.position == 1600
