"""The caller token's ``tenant`` claim at POST /v1/sessions: a configured tenant reaches the control plane,
no claim is the default tenant, an unknown or malformed one is a 403 that says why and creates nothing."""

from __future__ import annotations

import pytest

from appliance.api import create_app
from appliance.config import load_config, replace
from tests.api.service_double import InMemoryService
from tests.api.test_api import auth, client_for, offer_body
from tests.api.test_auth import ISS


@pytest.fixture
def service():
    return InMemoryService()


@pytest.fixture
async def api(tmp_path, keypair, service):
    cfg = replace(load_config(None, env={}), auth={"jwt_public_key_file": str(keypair[1]), "issuer": ISS},
                  tenants={"bank": {"voice": "Kore"}, "diner": {}})
    async with client_for(create_app(cfg, service)) as c:
        yield c


@pytest.mark.parametrize(("claim", "tenant"), [("bank", "bank"), ("diner", "diner"), (None, ""),
                                                ("default", "")])
async def test_configured_tenant_reaches_the_control_plane(api, service, private_pem, claim, tenant):
    extra = {} if claim is None else {"tenant": claim}
    r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, extra=extra))
    assert r.status_code == 201, r.text
    _, _, client = service.created_with[-1]
    assert client.tenant == tenant and client.sub == "alice"


@pytest.mark.parametrize(("claim", "detail"), [
    ("bakery", "tenant 'bakery' is not configured on this appliance"),
    ("BANK", "tenant 'BANK' is not configured on this appliance"),
    (42, "claim 'tenant' must be a string"),
    (["bank"], "claim 'tenant' must be a string"),
])
async def test_unknown_tenant_is_403_and_creates_nothing(api, service, private_pem, claim, detail):
    r = await api.post("/v1/sessions", json=offer_body(), headers=auth(private_pem, extra={"tenant": claim}))
    assert r.status_code == 403
    assert r.json() == {"error": "unknown_tenant", "detail": detail}
    assert service.created_with == []
