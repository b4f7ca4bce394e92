"""Quick form of `voice-appliance bench quality`: real media worker, espeak speech, scored content.

Asserts what the harness measures, not only that it ran: clean speech through Opus and the jitter
buffer scores high on PESQ-WB, 10 % loss scores lower, the echo of the model's own voice pauses
playback without AEC and not with it, real talk-overs still pause it (early, through the echo
gate), and NS raises the model-input SNR on café noise. ~10 s (the barge-in phase is 10 turns here,
100 in the full run).
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_quality_smoke_scores_and_barge_in() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "bench", "quality", "--smoke", "--json",
         "--modes", "off,ns,aec_ns_agc", "--mode", "aec_ns_agc"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    off, ns, aec = (out["by_mode"][m] for m in ("off", "ns", "aec_ns_agc"))
    # the scores are content: clean speech through the real path is near-transparent, loss hurts
    assert off["scores"]["clean"] > 3.8, off["scores"]
    assert off["scores"]["loss_10"] < off["scores"]["clean"] - 0.3
    assert ns["scores"]["clean"] > off["scores"]["clean"] - 0.1  # NS leaves clean speech alone
    # NS: a real SNR gain on café noise, and a better score there
    assert ns["ns_snr_gain_db"] > 3, ns
    assert ns["scores"]["cafe_10db"] > off["scores"]["cafe_10db"]
    # echo at -20 dB: without AEC the model pauses on its own voice, with AEC never ...
    assert off["bargein_echo"]["false_pauses"] >= 5, off["bargein_echo"]
    assert out["false_pauses_with_echo"] == 0 == aec["bargein_echo"]["false_pauses"]
    # ... and every real talk-over still pauses it
    assert aec["bargein_echo"]["bargein_missed"] == 0 and aec["bargein_echo"]["pauses"] == 5
    # ... early: the echo gate sees the onsets AEC3's suppressor damps (73 ms p50 without it, 13 with)
    assert aec["bargein_echo"]["bargein_p50_ms"] <= 40, aec["bargein_echo"]
    assert out["bargein_p99_ms"] is not None and 0 < out["bargein_p99_ms"] < 500
    assert out["metric"].startswith("PESQ")
