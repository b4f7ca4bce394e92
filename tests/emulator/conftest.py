"""Fixtures for the emulator tests: one emulator subprocess per module (the CLI, as shipped)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.emulator import Emulator, start_emulator


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with start_emulator(tmp_path_factory.mktemp("emu"), pacing="burst") as e:
        yield e
