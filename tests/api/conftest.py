"""Fixtures for the session-API tests: a real redis-server, a dev RSA key pair, a verifier."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from appliance.auth import JwtVerifier
from appliance.config import RedisConfig
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
