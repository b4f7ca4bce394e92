"""`voice-appliance run`: generated configs, and a real supervisord stack that stops cleanly on SIGINT."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import xmlrpc.client
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.cpuplan import make_plan
from appliance.procs import pid_gone
from appliance.runner import dumps_toml, ensure_secret, prepare, primary_ip, supervisord_conf
from appliance.turn import peer_policy_lines
from tests.harness.redis import free_port


def test_dumps_toml_round_trips():
    data = {"a": {"s": 'x "y" \\ ü', "i": 3, "f": 0.5, "b": True, "l": ["p", "q"]}}
    assert tomllib.loads(dumps_toml(data)) == data


def test_secret_created_once_private(tmp_path):
    p = tmp_path / "s" / "secret"
    a = ensure_secret(p)
    assert ensure_secret(p) == a and len(a) >= 24
    assert p.stat().st_mode & 0o777 == 0o600


def test_prepare_writes_a_loadable_config_and_programs(tmp_path):
    base = load_config(env={})
    plan = prepare(base, tmp_path / "var", redis_port=6391, turn_port=3479, with_janus=True)
    cfg = load_config(plan.config_path, env={})
    assert cfg.redis.url == "redis://127.0.0.1:6391/0"
    assert Path(cfg.auth.jwt_public_key_file).exists() and Path(cfg.auth.jwt_private_key_file).exists()
    assert cfg.turn.uris[0] == "turn:127.0.0.1:3479?transport=udp"
    assert cfg.model.ca_file and Path(cfg.model.ca_file).exists()
    assert plan.config_path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in plan.programs] == ["redis", "coturn", "janus", "emulator", "supervisor"]
    turn_conf = (plan.state_dir / "coturn" / "turnserver.conf").read_text().splitlines()
    assert any(ln.startswith("static-auth-secret=") for ln in turn_conf)
    janus_ip = primary_ip()  # what Janus advertises: the only peer the dev relay may reach
    assert set(peer_policy_lines([janus_ip] if janus_ip else [])) <= set(turn_conf)
    assert "no-tcp-relay" in turn_conf and "denied-peer-ip=0.0.0.0-255.255.255.255" in turn_conf
    assert (plan.state_dir / "janus" / "janus.jcfg").exists()
    janus = next(p for p in plan.programs if p.name == "janus")
    assert janus.command[:3] == [shutil.which("taskset"), "-c", ",".join(map(str, make_plan().janus_cpus))]
    # secrets and keys survive a second run (tokens minted earlier stay valid)
    before = Path(cfg.auth.jwt_public_key_file).read_bytes()
    prepare(base, tmp_path / "var", redis_port=6391)
    assert Path(cfg.auth.jwt_public_key_file).read_bytes() == before


def test_public_host_gets_tls_for_the_demo_page(tmp_path):
    from cryptography import x509

    plan = prepare(load_config(env={}), tmp_path / "var", public_host="192.0.2.77", with_janus=False)
    cfg = load_config(plan.config_path, env={})
    assert cfg.api.host == "0.0.0.0" and cfg.api.public_host == "192.0.2.77"
    assert plan.demo_url == "https://192.0.2.77:8443/"
    cert = x509.load_pem_x509_certificate(Path(cfg.api.tls_cert_file).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "192.0.2.77" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert cfg.turn.uris[0] == "turn:192.0.2.77:3478?transport=udp"


def test_supervisord_conf_escapes_percent(tmp_path):
    from appliance.runner import Program

    text = supervisord_conf(tmp_path, tmp_path / "s.sock", [Program("x", ["echo", "100%", "a b"], 1)])
    assert "command=echo 100%% 'a b'" in text
    assert "stopasgroup=true" in text and "killasgroup=true" in text


_gone = pid_gone


def _descendants(pid: int) -> set[int]:
    """All live descendants of pid (walks /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _http_get(url: str, limit: float = 5) -> str:
    deadline = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _http_post(url: str) -> str:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host):
        import http.client
        import socket

        path = self.path

        class Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)

        return Conn("localhost")


@pytest.mark.slow
def test_run_starts_stack_and_stops_cleanly_on_sigint(tmp_path):
    state = tmp_path / "var"
    env = dict(os.environ)
    api_port = free_port()
    env.update({
        "VA_API_PORT": str(api_port), "VA_API_METRICS_PORT": "0", "VA_API_AGENT_CHECK_PORT": "0",
        "VA_API_ADMIN_PORT": "0",
        "VA_EMULATOR_PORT": str(free_port()), "VA_SHARDS_COUNT": "1", "VA_SHARDS_SLOTS": "4",
        "VA_JANUS_URL": f"http://127.0.0.1:{free_port()}/janus",
        "VA_JANUS_ADMIN_URL": f"http://127.0.0.1:{free_port()}/admin",
    })
    env.pop("VA_CONFIG", None)
    cmd = [sys.executable, "-m", "appliance", "run", "--state-dir", str(state),
           "--redis-port", str(free_port()), "--turn-port", str(free_port()),
           "--no-postgres"]  # tmp_path is 0700: the postgres user cannot reach it (tests/records covers it)
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    sock = state / "run" / "supervisor.sock"
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        wanted = {"redis", "coturn", "janus", "emulator", "supervisor"}
        running: dict[str, int] = {}
        while time.monotonic() < deadline:
            if sock.exists():
                try:
                    server = xmlrpc.client.ServerProxy("http://x", transport=_UnixTransport(str(sock)))
                    infos = server.supervisor.getAllProcessInfo()
                    running = {i["name"]: i["pid"] for i in infos if i["statename"] == "RUNNING"}
                except (OSError, xmlrpc.client.Fault):
                    running = {}
                if wanted <= running.keys():
                    break
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.2)
        assert wanted <= running.keys(), f"{running} {(tmp_path / 'run.log').read_text()[-3000:]}"
        # the supervisor serves the demo page and hands out dev tokens (the run created the dev key)
        page = _http_get(f"http://127.0.0.1:{api_port}/", 30)
        assert "<button id=\"call\"" in page
        token = json.loads(_http_post(f"http://127.0.0.1:{api_port}/dev/token"))["token"]
        cfg = load_config(state / "appliance.toml", env={})
        from appliance.auth import JwtVerifier

        assert JwtVerifier.from_config(cfg.auth).verify(token).sub.startswith("demo-")  # one sub per token
        # the emulator answers TLS with the CA the generated config tells the AI worker to trust
        import socket
        import ssl

        ctx = ssl.create_default_context(cafile=cfg.model.ca_file)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", cfg.emulator.port), 2) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    assert tls.version()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # a person opens the demo page and clicks Call: Chromium → Janus (host interfaces) → media worker
        demo = Path(__file__).with_name("demo_call.js")
        node_modules = Path(__file__).resolve().parents[1] / "e2e" / "node_modules"
        if (node_modules / "playwright-core").exists():
            res = subprocess.run(["node", str(demo), f"http://127.0.0.1:{api_port}/", "1500"],
                                 env={**os.environ, "NODE_PATH": str(node_modules)},
                                 capture_output=True, text=True, timeout=90)
            assert res.returncode == 0, res.stderr[-3000:] + (tmp_path / "run.log").read_text()[-3000:]
            assert '"event":"connected"' in res.stdout and '"event":"hungup"' in res.stdout
        janus_status = Path(f"/proc/{running['janus']}/status").read_text()
        janus_cpus = ",".join(map(str, make_plan().janus_cpus))
        assert f"Cpus_allowed_list:\t{janus_cpus}\n" in janus_status
        pids = _descendants(proc.pid)
        assert set(running.values()) <= pids
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    left = [p for p in pids if not _gone(p)]
    assert not left, f"still running after Ctrl-C: {left}"
