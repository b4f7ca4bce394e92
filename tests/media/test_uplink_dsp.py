"""Uplink processing (workers/media/uplink_dsp.py) on real speech: NS raises the SNR of noisy speech
without losing the speech, AEC removes the echo of the far reference it is given and flags echo-only
frames, caller speech over the echo survives it, and a call's mode comes from its slot option."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from appliance.config import ConfigError, MediaConfig, load_config
from tests.harness.audio import envelope_correlation, speech
from workers.media.uplink_dsp import MODES, UplinkDsp, session_mode

RATE = 16000
F = 320  # 20 ms


def _frames(x: np.ndarray) -> list[bytes]:
    x = x[: len(x) // F * F].clip(-32768, 32767).astype(np.int16)
    return [x[i: i + F].tobytes() for i in range(0, len(x), F)]


def _db(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return 10 * np.log10(max(float(np.mean(x * x)), 1e-9) / 32768**2)


@pytest.fixture(scope="module")
def talk() -> np.ndarray:
    x = speech("Please book a table for four people on Friday evening, near the window.", RATE)
    x = x.astype(np.float64)
    return x * (32768 * 10 ** (-26 / 20) / np.sqrt(np.mean(x[np.abs(x) > 300] ** 2)))


def test_ns_raises_snr_and_keeps_the_speech(talk: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    lead = np.zeros(RATE * 2)  # 2 s of noise alone first: the suppressor learns it
    clean = np.concatenate([lead, talk, np.zeros(RATE // 2)])
    noise = rng.standard_normal(len(clean))
    noise = np.convolve(noise, np.ones(4) / 4, mode="same")  # a little coloured, like a fan
    noise *= 32768 * 10 ** (-40 / 20) / np.sqrt(np.mean(noise**2))  # speech -26, noise -40 dBFS
    dsp = UplinkDsp("ns")
    out = np.frombuffer(b"".join(dsp.process(f) for f in _frames(clean + noise)), np.int16)
    n = len(out)
    quiet_in, quiet_out = noise[RATE: 2 * RATE], out[RATE: 2 * RATE]
    # the noise floor drops by a real margin ...
    assert _db(quiet_out) < _db(quiet_in) - 6, (_db(quiet_in), _db(quiet_out))
    # ... while the speech keeps its level and its shape
    sp = slice(2 * RATE, 2 * RATE + len(talk))
    assert abs(_db(out[sp]) - _db(clean[sp])) < 3
    assert envelope_correlation(clean[sp], out[: n][sp], RATE) > 0.9
    assert dsp.pause_frame == out[-F:].tobytes()


def _room(seconds_delay: float) -> np.ndarray:
    h = np.zeros(int(0.03 * RATE))
    h[0], h[40], h[130] = 1.0, 0.5, 0.25
    d = int(seconds_delay * RATE)
    return np.concatenate([np.zeros(d), h / np.sqrt((h**2).sum())])


def test_aec_removes_the_echo_of_the_far_reference_and_keeps_the_caller(talk: np.ndarray) -> None:
    """Model speech goes out (far reference), comes back 120 ms later at -20 dB through a small room;
    after it converges the canceller removes most of it, flags echo-only frames, and caller speech
    talked over the echo later still comes through."""
    model = speech("Tomorrow will be sunny with a light breeze from the west and mild temperatures. "
                   "Let me check the timetable for you, one moment please.", 24000).astype(np.float64)
    model *= 32768 * 10 ** (-20 / 20) / np.sqrt(np.mean(model[np.abs(model) > 300] ** 2))
    model = np.tile(model, 2)  # ~10 s of model speech
    far16 = soxr.resample(model, 24000, RATE)
    echo = np.convolve(far16, _room(0.12))[: len(far16)] * 10 ** (-20 / 20)
    caller = np.zeros(len(echo))
    at = len(echo) - len(talk) - RATE // 2
    caller[at: at + len(talk)] = talk * 10 ** (-6 / 20)  # a caller at -32 dBFS over the echo at ~-40
    near = echo + caller
    dsp = UplinkDsp("aec_ns_agc")
    dsp.set_delay_hint(40)
    down = [model[i: i + 480] for i in range(0, len(model) - 479, 480)]
    out, pause, flags = [], [], []
    for k, nf in enumerate(_frames(near)):
        out.append(dsp.process(nf))  # this tick's uplink frame pairs with the previous tick's far frame
        pause.append(dsp.pause_frame)
        flags.append(dsp.echo_dominated)
        if k < len(down):
            dsp.far_frame(down[k].astype(np.int16).tobytes())
    pre = np.frombuffer(b"".join(pause), np.int16).astype(np.float64)
    n = min(len(pre), len(near))
    conv = slice(5 * RATE, min(at, n))  # after 5 s of convergence, before the caller talks
    erle = _db(near[conv]) - _db(pre[conv])
    assert erle > 15, f"echo only reduced by {erle:.1f} dB"
    k0, k1 = conv.start // F, conv.stop // F
    assert np.mean(flags[k0:k1]) > 0.5  # echo-only frames are recognised as such
    # the caller's speech over the echo is kept: its envelope and most of its level survive (AEC3's
    # suppressor attenuates parts of it in double-talk: measured 0.65, vs ~0.9 for NS alone)
    cs = slice(at + RATE // 4, min(at + len(talk), n))
    assert envelope_correlation(caller[cs], pre[cs], RATE) > 0.55
    assert _db(pre[cs]) > _db(caller[cs]) - 10
    assert _db(pre[cs]) > _db(pre[conv]) + 10  # far above the echo residual: a barge-in can see it


def test_session_mode_uses_a_valid_option_else_the_default() -> None:
    assert session_mode({"uplink_processing": "aec_ns_agc"}, "ns") == "aec_ns_agc"
    assert session_mode({}, "ns") == "ns"
    assert session_mode({"uplink_processing": "bogus"}, "off") == "off"
    assert session_mode({"uplink_processing": 3}, "ns") == "ns"
    assert set(MODES) == {"off", "ns", "aec_ns_agc"}
    with pytest.raises(ValueError, match="uplink processing"):
        UplinkDsp("loud")


def test_off_is_the_identity() -> None:
    frame = np.arange(F, dtype=np.int16).tobytes()
    dsp = UplinkDsp("off")
    assert dsp.process(frame) is frame and dsp.pause_frame is frame and not dsp.wants_far


def test_config_key_is_validated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert MediaConfig().uplink_processing == "ns"
    p = tmp_path / "a.toml"
    p.write_text('[media]\nuplink_processing = "aec_ns_agc"\n')
    assert load_config(p).media.uplink_processing == "aec_ns_agc"
    p.write_text('[media]\nuplink_processing = "loud"\n')
    with pytest.raises(ConfigError, match=r"media\.uplink_processing"):
        load_config(p)


def test_a_call_chooses_its_mode_through_the_slot_options(segment) -> None:  # type: ignore[no-untyped-def]
    """The media worker builds each session's chain from its slot option, else media.uplink_processing."""
    from tests.media.conftest import free_port_pair
    from workers.media.worker import MediaSession

    modes = {}
    for index, opts in enumerate(({"uplink_processing": "aec_ns_agc"}, {}, {"uplink_processing": "x"})):
        segment.slot(index).activate(
            session_id=f"dsp{index}", local_rtp_port=free_port_pair(), remote_rtp_ip="127.0.0.1",
            remote_rtp_port=9, payload_type=111, channels=2, dtmf_payload_type=-1, mode="direct",
            options=opts)
        info = segment.slot(index).snapshot()
        assert info is not None
        sess = MediaSession(segment.slot(index), info, MediaConfig(uplink_processing="off"), "127.0.0.1")
        modes[index] = (sess.dsp.mode, sess.dsp.wants_far)
        sess.close()
    assert modes == {0: ("aec_ns_agc", True), 1: ("off", False), 2: ("off", False)}
