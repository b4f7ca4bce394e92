"""A short property-based pass over /openapi.json with schemathesis (ASGI, in process).

Generated bodies, paths and headers must never give a 5xx, and every response must match the
documented status codes, content types, schemas and Allow headers. The control plane is the in-memory
test double. One check is off: "schema-valid request rejected" — a string that fits the schema is not
a valid SDP offer, and refusing it with 400 is the point of the SDP validator.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from appliance.api import create_app
from appliance.config import load_config, replace
from appliance.token import generate_keys, mint
from tests.api.service_double import InMemoryService

_TMP = Path(tempfile.mkdtemp(prefix="va-st-"))
atexit.register(shutil.rmtree, _TMP, True)
_PRIV, _PUB = generate_keys(_TMP)
(_TMP / "empty.toml").write_text("")
_CFG = replace(load_config(_TMP / "empty.toml", env={}), auth={"jwt_public_key_file": str(_PUB)},
               turn={"secret": "x", "uris": ["turn:127.0.0.1:3478"]})

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_CFG, InMemoryService()))
# A body over api.max_body_bytes is refused with 413 before it is parsed: for a schema-violating case
# that is a rejection too (schemathesis's default list lacks 413).
_NEGATIVE = schema.config.checks.negative_data_rejection
_NEGATIVE.expected_statuses = [*_NEGATIVE.expected_statuses, "413"]


@schema.auth()
class DevToken:
    def get(self, case, ctx) -> str:
        return mint(_PRIV.read_bytes(), sub="fuzzer", ttl_seconds=600)

    def set(self, case, data, ctx) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
