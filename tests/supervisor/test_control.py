"""The control socket (appliance/control.py) on its own: permissions, protocol errors, and the
`voice-appliance drain` exit codes. The supervisor end of it is tested in test_supervisor_calls.py."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys

import pytest

from appliance.config import load_config
from appliance.control import ControlServer, drain, request, socket_path


async def test_socket_is_private_and_bad_requests_get_an_error(tmp_path):
    state = {"draining": False, "active": 2, "migrating": 0}
    seen: list[str] = []

    async def handler(cmd: str) -> dict:
        seen.append(cmd)
        if cmd == "drain":
            state["draining"] = True
        if cmd == "migrate":
            state["migrating"] = state["active"]
        return dict(state)

    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, handler)
    await server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert (await request(path, "drain"))["draining"] is True
        with pytest.raises(RuntimeError, match="unknown command"):
            await request(path, "reboot")
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"not json\n")
        await writer.drain()
        assert json.loads(await reader.readline()) == {"ok": False, "error": "request is not JSON"}
        writer.close()
        assert seen == ["drain"]  # nothing else reached the supervisor
        cfg = load_config(None, env={}, overrides={"paths": {"run_dir": str(tmp_path / "run")},
                                                   "api": {"migrate_grace_seconds": 1}})
        # calls never end here: drain --wait --migrate gives up after the waits with exit 1
        code, status = await drain(cfg, wait=True, wait_seconds=0.2, migrate=True)
        assert code == 1 and status["active"] == 2 and seen[-1] == "status" and "migrate" in seen
    finally:
        await server.stop()
    assert not path.exists()


def test_drain_cli_without_a_supervisor_exits_2(tmp_path):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nrun_dir = "{tmp_path}"\n')
    r = subprocess.run([sys.executable, "-m", "appliance", "drain", "--config", str(cfg), "--wait"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and str(socket_path(load_config(cfg))) in r.stderr
