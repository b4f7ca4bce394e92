"""Fixtures for the session-API tests: a real redis-server, a dev RSA key pair, a verifier."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from appliance.auth import JwtVerifier
from appliance.config import Config, RedisConfig, load_config, replace
from appliance.state import redis_client
from appliance.token import generate_keys
from tests.harness.redis import RedisServer, redis_server


@pytest.fixture(scope="session")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server shared by the area's tests (each test uses its own key prefix)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
async def aredis(redis_srv: RedisServer) -> AsyncIterator[aioredis.Redis]:
    # generous timeout: these tests are about behaviour, not latency (outage tests make their own client)
    client = redis_client(RedisConfig(url=redis_srv.url), timeout=5.0)
    yield client
    await asyncio.wait_for(client.aclose(), 5)


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private.pem, public.pem) made by `voice-appliance token --generate-keys`' code path."""
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def private_pem(keypair: tuple[Path, Path]) -> bytes:
    return keypair[0].read_bytes()


@pytest.fixture(scope="session")
def public_pem(keypair: tuple[Path, Path]) -> bytes:
    return keypair[1].read_bytes()


@pytest.fixture
def verifier(public_pem: bytes) -> JwtVerifier:
    return JwtVerifier(public_pem, audience="voice-appliance", issuer="https://idp.test",
                       required_scope="voice:session", max_ttl_seconds=900, leeway_seconds=30)


TURN_SECRET = "turn-test-secret"


@pytest.fixture
def cfg(tmp_path: Path, keypair: tuple[Path, Path]) -> Config:
    """The API tests' config: the dev key pair, issuer https://idp.test, a TURN secret, 4 KB bodies."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return replace(
        load_config(None, env={"VA_CONFIG": str(empty)}),
        auth={"jwt_public_key_file": str(keypair[1]), "issuer": "https://idp.test"},
        turn={"secret": TURN_SECRET, "ttl_seconds": 500},
        api={"public_host": "turn.example.test", "max_body_bytes": 4096},
    )
