"""``upgrade.yml`` against the booted, provisioned box: drain through the control socket of the hardened
unit, wait, migrate (no calls here), the appliance role again, /readyz through the internal CA, undrain.
tests/fleet/test_faults.py::test_rolling_upgrade_drops_no_call drives the same sequence with live calls;
this proves the playbook itself runs on an installed box (the fleet harness runs no Ansible)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import nspawn

pytestmark = [pytest.mark.ops, pytest.mark.timeout(2400)]

AGENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
print(s.recv(100).decode().strip())
"""


def test_upgrade_playbook_drains_reinstalls_and_undrains(provisioned) -> None:
    ct = provisioned.ct
    upgrade = Path(__file__).resolve().parents[2] / "ansible" / "upgrade.yml"
    # the box serves its public certificate itself (no internal CA): the playbook checks /readyz against
    # the system's trust store, which on a real box trusts the public CA; here that is the test CA
    ct.sh("cat > /usr/local/share/ca-certificates/va-ops-test.crt && update-ca-certificates",
          input=provisioned.tls.ca_file.read_text())
    extra = json.dumps({"private_ip": nspawn.HOST_ADDR})
    run = provisioned.playbook("-e", extra, playbook=upgrade)
    assert run.rc == 0, run.output[-5000:]
    assert run.recap.get("failed") == 0, run.output[-3000:]
    for task in ("Drain, wait for calls to end, force-migrate the rest", "Wait until the box answers",
                 "Back into rotation", "Wait until the box takes new calls"):
        assert f"TASK [{task}" in run.output, task
    journal = ct.sh("journalctl -u voice-appliance --no-pager -n 400", check=False).stdout
    assert "drain" in journal.lower(), journal[-2000:]
    ct.sh("cat > /root/agent.py", input=AGENT)
    state = ct.sh("python3 /root/agent.py 9642", check=False).stdout.strip()  # api.agent_check_port
    # back in rotation: "ready" lifts the drain HAProxy remembers, then the free capacity
    assert state.startswith("ready up "), state
