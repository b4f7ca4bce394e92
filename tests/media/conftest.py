"""Fixtures of the media worker tests: a real Janus in a network namespace (module-scoped: ~0.2 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.janus import JanusInstance, janus_available, janus_in_netns


@pytest.fixture(scope="module")
def janus() -> Iterator[JanusInstance]:
    if not janus_available():
        pytest.skip("needs root, janus and iproute2")
    with janus_in_netns() as inst:
        yield inst
