"""Vertex AI: the real google-genai SDK (vertexai=True) and google-auth's service-account flow against the
emulator's Vertex path and /token endpoint; region pinning; express mode; a key the server does not know."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, ModelConfig, load_config, replace
from tests.harness.emulator import Emulator, ServiceAccount, service_account, start_emulator, tone
from workers.ai.live import events as L
from workers.ai.live.session import LiveSession
from workers.ai.live.settings import ClientSettings, LiveOptions, LiveUnavailable

pytestmark = pytest.mark.timeout(90)
PROJECT, REGION = "va-test-project", "europe-west4"


@pytest.fixture(scope="module")
def sa() -> ServiceAccount:
    return service_account()


@pytest.fixture(scope="module")
def vemu(tmp_path_factory: pytest.TempPathFactory, sa: ServiceAccount) -> Iterator[Emulator]:
    d = tmp_path_factory.mktemp("vemu")
    (d / "sa.pub").write_bytes(sa.public_pem)
    with start_emulator(d, pacing="burst", vertex_sa_key=str(d / "sa.pub")) as e:
        yield e


def vertex_model(emu: Emulator, key_file: Path | None, **kw: Any) -> ModelConfig:
    return ModelConfig(platform="vertex", project=PROJECT if key_file else "", location=REGION,
                       credentials_file=str(key_file or ""), api_key="" if key_file else emu.api_key,
                       base_url=emu.base_url, ca_file=emu.ca_file, retry_base_seconds=0.05,
                       retry_max_seconds=0.2, **kw)


async def one_turn(live: LiveSession, events: list[Any]) -> None:
    await live.start()
    live.activity_start()
    live.send_audio(tone(440, 0.3))
    live.activity_end()
    for _ in range(1000):
        if any(isinstance(e, L.TurnComplete) for e in events):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no turnComplete")


async def test_service_account_connects_on_the_pinned_region(vemu: Emulator, sa: ServiceAccount,
                                                             tmp_path: Path) -> None:
    key = sa.key_file(tmp_path / "sa.json", f"{vemu.base_url}/token")
    m = vertex_model(vemu, key)
    settings = ClientSettings.for_model(m)
    assert settings.credentials is not None and not settings.credentials.valid  # no token before connect
    events: list[Any] = []
    live = LiveSession(m, "vertex-sa", LiveOptions("Puck", "en-US", "x"), events.append, settings=settings)
    try:
        await one_turn(live, events)
        info = vemu.session(live.server_session_id)["live"]
        assert info["platform"] == "vertex"
        assert info["model"] == {"project": PROJECT, "location": REGION, "model": m.model}
        assert settings.credentials.valid and settings.credentials.token.startswith("emu-")
        assert vemu.health()["tokens_issued"] >= 1
        assert any(isinstance(e, L.AudioOut) for e in events)
    finally:
        await live.close()


async def test_express_mode_api_key(vemu: Emulator) -> None:
    m = vertex_model(vemu, None)
    events: list[Any] = []
    live = LiveSession(m, "vertex-express", LiveOptions("Puck", "en-US", "x"), events.append)
    try:
        await one_turn(live, events)
        assert vemu.session(live.server_session_id)["live"]["platform"] == "vertex"
    finally:
        await live.close()


async def test_a_key_the_server_does_not_trust_is_a_clear_error(vemu: Emulator, tmp_path: Path) -> None:
    stranger = service_account("stranger").key_file(tmp_path / "other.json", f"{vemu.base_url}/token")
    m = vertex_model(vemu, stranger, max_retries=1)
    events: list[Any] = []
    live = LiveSession(m, "vertex-bad", LiveOptions("Puck", "en-US", "x"), events.append)
    with pytest.raises(LiveUnavailable, match="token refused"):
        await live.start()
    assert live.state == "degraded"
    await live.close()


def test_region_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    base = load_config(None, env={})
    vertex = {"platform": "vertex", "project": PROJECT, "credentials_file": str(tmp_path / "k.json")}
    outside = (r"model\.location: 'us-central1' is outside model\.allowed_locations "
               r"\(europe-west4, europe-west1\)")
    with pytest.raises(ConfigError, match=outside):
        replace(base, model={**vertex, "location": "us-central1",
                             "allowed_locations": ["europe-west4", "europe-west1"]})
    ok = replace(base, model={**vertex, "location": "europe-west4", "allowed_locations": ["europe-west4"]})
    assert ok.model.location == "europe-west4"
    with pytest.raises(ConfigError, match=r"model\.credentials_file: Vertex AI needs"):
        replace(base, model={"platform": "vertex", "project": PROJECT, "location": REGION})
    with pytest.raises(ConfigError, match=r"model\.project: only used with"):
        replace(base, model={"project": PROJECT})
    # the Live layer refuses it too (a ModelConfig built without the loader)
    with pytest.raises(ConfigError, match=r"outside model\.allowed_locations"):
        ClientSettings.for_model(ModelConfig(platform="vertex", project=PROJECT, location="us-east1",
                                             allowed_locations=["europe-west4"], api_key="k"))


async def test_developer_only_emulator_has_no_vertex_path(tmp_path: Path) -> None:
    with start_emulator(tmp_path, platform="developer") as e:
        m = vertex_model(e, None, max_retries=1)
        live = LiveSession(m, "no-vertex", LiveOptions("Puck", "en-US", "x"), lambda _ev: None)
        with pytest.raises(LiveUnavailable):
            await live.start()
        await live.close()


# --- goAway, abrupt close, transparent resumption: the same proofs as on the Developer API ------------
@pytest.fixture
async def vsession(vemu: Emulator, sa: ServiceAccount, tmp_path: Path) -> Any:
    from tests.ai.live.test_session import Recorder

    made: list[LiveSession] = []
    key = sa.key_file(tmp_path / "sa.json", f"{vemu.base_url}/token")

    async def make(rec: Any = None, *, start: bool = True, model: dict[str, Any] | None = None,
                   **opts: Any) -> tuple[LiveSession, Any]:
        rec = rec or Recorder()
        m = vertex_model(vemu, key, **(model or {}))
        s = LiveSession(m, f"v-{len(made)}", LiveOptions("Puck", "en-US", "test", **opts), rec)
        made.append(s)
        if start:
            await s.start()
        return s, rec

    yield make
    for s in made:
        await s.close()


@pytest.mark.parametrize("fault", ["goaway", "close"])
@pytest.mark.parametrize("transparent", [True, False], ids=["transparent", "ordered"])
async def test_resume_mid_utterance_on_vertex_is_byte_exact(vemu: Emulator, vsession: Any, fault: str,
                                                            transparent: bool) -> None:
    """The emulator's record of caller audio is continuous only if the replay started exactly after
    what the handle covers: with transparent resumption that point is the server's
    lastConsumedClientMessageIndex, not the layer's turn accounting."""
    from tests.ai.live.test_session import _resume_mid_utterance

    async def make(**kw: Any) -> Any:
        live, rec = await vsession(model={"transparent_resumption": transparent}, **kw)
        assert live.transparent is transparent
        return live, rec

    inject = ((lambda sid: vemu.fault(sid, "goaway", time_left_s=0.5)) if fault == "goaway"
              else (lambda sid: vemu.fault(sid, "close", code=1011)))
    await _resume_mid_utterance(vemu, make, inject)


async def test_transparent_handle_covers_exactly_the_consumed_messages(vemu: Emulator, vsession: Any) -> None:
    """A handle's lastConsumedClientMessageIndex, not turn outcomes, decides what is replayed."""
    from workers.ai.live.wire import Inbound

    live, _ = await vsession()
    conn = live._conn
    assert conn is not None
    live.activity_start()
    live.send_audio(bytes(1280 * 3))
    for _ in range(200):  # the sender writes the 4 items (messages 1..4 after the setup)
        if live._sent == live.outbox.next_after(0).seq + 3:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    first = live.outbox.next_after(0).seq  # type: ignore[union-attr]
    assert [i for i, _ in conn.item_at][-4:] == [conn.index - 3, conn.index - 2, conn.index - 1, conn.index]
    base = conn.index - 4
    live._apply(conn, Inbound(handle="h-index", handle_index=base + 2))  # start + first chunk consumed
    assert live.resume_handle == "h-index"
    assert [it.seq for it in live.outbox.replay()] == [first + 2, first + 3]  # the other two chunks
