"""Fixtures for AI-worker tests: one shared VAD model load and espeak-ng speech (generated at test time)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.ai.audio import speech16k


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """~3.4 s of espeak-ng speech at 16 kHz, trimmed to the first and last loud sample."""
    return speech16k()
