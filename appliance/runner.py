"""`voice-appliance run`: the whole stack in the foreground, on a machine without systemd.

What it does, in order:

1. Picks a state directory (``--state-dir``; default ``./var`` in a source checkout, the configured
   ``paths.state_dir`` when installed under /opt) and creates, once, everything a newcomer would
   otherwise have to: the dev JWT key pair (``appliance.token``), random secrets for Janus's API and
   admin API, the AudioBridge admin key and coturn's ``use-auth-secret``, and the emulator's test CA.
2. Writes the effective configuration to ``STATE/appliance.toml`` (mode 0600) pointing every process at
   those files and at its own Redis port (not 6379: Debian's redis-server package starts one there),
   plus config files for redis-server, Janus (``appliance.janus_conf``: on a real machine Janus uses the
   host's interfaces) and coturn.
3. Generates ``STATE/supervisord.conf`` and runs supervisord (PyPI ``supervisor``) in the foreground
   in its own session: redis → coturn → janus → emulator (only without an API key) → supervisor.
   Logs of every program go to this terminal. Ctrl-C (or SIGTERM) is forwarded as SIGTERM to
   supervisord, which stops the programs in reverse order (process groups, so nothing is left behind).
4. Prints the demo URL and how to mint a token, and "ready" once ``/healthz`` answers.

Why supervisord and not a hand-written process manager: it already restarts crashed programs, stops
them in order and by process group, and gives ``supervisorctl`` for poking at a running stack. The
appliance's own workers are not supervisord programs: the supervisor's arbiter owns them (CPU pinning,
shared memory, heartbeats).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Config, ConfigError, load_for_cli, replace, to_toml_dict
from appliance.cpuplan import make_plan
from appliance.turn import peer_policy_lines

DEFAULT_REDIS_PORT = 6390
DEFAULT_POSTGRES_PORT = 6391
DEFAULT_TURN_PORT = 3478
DEV_ISSUER = "voice-appliance-dev"  # `run` mints its own tokens; production configs name their IdP


@dataclass
class Program:
    """One supervisord program."""

    name: str
    command: list[str]
    priority: int
    stopsignal: str = "TERM"
    stopwaitsecs: int = 10
    startsecs: int = 1
    environment: dict[str, str] = field(default_factory=dict)


@dataclass
class RunPlan:
    """Everything `run` generated: the config, the programs and where supervisord's files live."""

    state_dir: Path
    config_path: Path
    supervisord_conf: Path
    socket_path: Path
    cfg: Config
    programs: list[Program]
    demo_url: str


def default_state_dir() -> Path:
    """``./var`` in a checkout; the configured state dir when installed as a package (under /opt)."""
    if sys.prefix.startswith("/opt/") and os.geteuid() == 0:
        return Path("/var/lib/voice-appliance")
    return Path.cwd() / "var"


def ensure_secret(path: Path, nbytes: int = 24) -> str:
    """Read a secret file, creating it (mode 0600, random URL-safe text) on first use."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON strings are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps_toml(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document of flat sections (all our config needs; tomllib cannot write)."""
    out = []
    for name, values in sections.items():
        if name == "tenants":  # a table of tables: [tenants.<name>]
            for tname, table in values.items():
                out.append(f"[tenants.{tname}]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
                out.append("")
            continue
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def primary_ip() -> str:
    """The address of the default route's interface ("" if none): what Janus should advertise.

    A UDP ``connect`` picks the route without sending anything. Janus must not guess (FACTS: it may
    advertise a made-up address), and ICE never uses loopback, so 127.0.0.1 is no answer either.
    """
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, no packet leaves
        ip = s.getsockname()[0]
        return "" if ip.startswith("127.") else ip
    return ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _url_port(url: str, default: int) -> int:
    return urllib.parse.urlsplit(url).port or default


def _sv_escape(text: str) -> str:
    return text.replace("%", "%%")


def _quote(arg: str) -> str:
    """Quote one argv element for supervisord's shlex-based command parsing."""
    return shlex.quote(arg)


def supervisord_conf(plan_dir: Path, socket_path: Path, programs: list[Program]) -> str:
    """The supervisord.conf text: foreground, unix socket control, logs to our stdout."""
    lines = [
        "[supervisord]",
        "nodaemon=true",
        f"logfile={_sv_escape(str(plan_dir / 'log' / 'supervisord.log'))}",
        f"pidfile={_sv_escape(str(plan_dir / 'run' / 'supervisord.pid'))}",
        f"childlogdir={_sv_escape(str(plan_dir / 'log'))}",
        "loglevel=info",
        "",
        "[unix_http_server]",
        f"file={_sv_escape(str(socket_path))}",
        "chmod=0700",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_sv_escape(str(socket_path))}",
        "",
    ]
    for p in programs:
        lines += [
            f"[program:{p.name}]",
            "command=" + _sv_escape(" ".join(_quote(a) for a in p.command)),
            f"priority={p.priority}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={p.startsecs}",
            "startretries=5",
            f"stopsignal={p.stopsignal}",
            f"stopwaitsecs={p.stopwaitsecs}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
        ]
        if p.environment:
            env = ",".join(f'{k}="{_sv_escape(v)}"' for k, v in p.environment.items())
            lines.append(f"environment={env}")
        lines.append("")
    return "\n".join(lines)


def prepare(
    base: Config,
    state_dir: Path,
    *,
    redis_port: int = DEFAULT_REDIS_PORT,
    turn_port: int = DEFAULT_TURN_PORT,
    with_janus: bool = True,
    with_coturn: bool = True,
    public_host: str = "",
    with_postgres: bool = False,
    postgres_port: int = DEFAULT_POSTGRES_PORT,
) -> RunPlan:
    """Create keys, secrets and config files in ``state_dir``; return what supervisord should run."""
    from appliance import janus_conf
    from appliance.token import generate_keys

    state = state_dir.resolve()
    for sub in ("keys", "secrets", "run", "log", "redis", "janus", "coturn"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keys(state / "keys")
    sec = state / "secrets"
    janus_api = ensure_secret(sec / "janus-api-secret")
    janus_admin = ensure_secret(sec / "janus-admin-secret")
    ab_key = ensure_secret(sec / "audiobridge-admin-key")
    turn_secret = ensure_secret(sec / "turn-secret", 32)
    if not base.compliance.master_key_file:  # encryption at rest (appliance/compliance/atrest.py)
        from appliance.compliance.atrest import ensure_master_key

        ensure_master_key(sec / "master-key")
    ensure_secret(sec / "session-token-key", 32)  # HMAC key of the per-session tokens (43 characters)
    records: dict[str, Any] = {}
    if not base.records.webhook_secret_file:  # signs webhooks and tool-call POSTs
        ensure_secret(sec / "webhook-secret", 32)
        records["webhook_secret_file"] = str(sec / "webhook-secret")
    pg_cluster = None
    if with_postgres and not base.records.dsn:
        # a private cluster for the call records (appliance/records/pgcluster.py): initdb on first run
        from appliance.records.pgcluster import Cluster

        pg_password = ensure_secret(sec / "postgres-password", 24)
        pg_cluster = Cluster(state / "postgres", postgres_port)
        pg_cluster.init(pg_password)
        records.update(dsn=pg_cluster.dsn(), password_file=str(sec / "postgres-password"))
    host = public_host or base.api.public_host or "127.0.0.1"

    api: dict[str, Any] = {"public_host": host}
    if public_host and not public_host.startswith("127.") and public_host != "localhost" \
            and not base.api.tls_cert_file:
        # Reachable from other machines: browsers allow the microphone only on https (or localhost),
        # so serve TLS with a certificate from a private CA in the state dir (import it, or click through).
        from appliance.emulator.certs import ensure_certs

        tls = ensure_certs(state / "api-tls", [public_host])
        api.update(host="0.0.0.0", tls_cert_file=str(tls.cert_file), tls_key_file=str(tls.key_file))
    model: dict[str, Any] = {}
    if base.uses_emulator:
        from appliance.emulator.certs import ensure_certs

        certs = ensure_certs(state / "emulator", [base.emulator.host])  # where the emulator looks
        model = {"base_url": f"https://{base.emulator.host}:{base.emulator.port}",
                 "ca_file": str(certs.ca_file)}
    cfg = replace(
        base,
        paths={"state_dir": str(state), "run_dir": str(state / "run")},
        auth={"jwt_public_key_file": str(pub), "jwt_private_key_file": str(priv),
              "issuer": base.auth.issuer or DEV_ISSUER,
              "session_token_key_file": str(sec / "session-token-key")},
        janus={
            "api_secret": "", "api_secret_file": str(sec / "janus-api-secret"),
            "admin_secret": "", "admin_secret_file": str(sec / "janus-admin-secret"),
            "audiobridge_admin_key": ab_key,
        },
        turn={
            "secret": "", "secret_file": str(sec / "turn-secret"),
            "uris": base.turn.uris or ([f"turn:{host}:{turn_port}?transport=udp",
                                        f"turn:{host}:{turn_port}?transport=tcp"] if with_coturn else []),
        },
        redis={"url": f"redis://127.0.0.1:{redis_port}/0"},
        records=records,
        model=model,
        api=api,
    )
    config_path = state / "appliance.toml"
    sections = to_toml_dict(cfg)
    _write_private(config_path, "# generated by `voice-appliance run`; edit the source config instead\n"
                   + dumps_toml(sections))

    (state / "redis" / "redis.conf").write_text(
        "\n".join([
            f"port {redis_port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no",
            f"dir {state / 'redis'}", 'save ""', "appendonly no", "loglevel notice", 'logfile ""',
            "",
        ])
    )
    py = sys.executable
    env = {"VA_CONFIG": str(config_path)}
    # Janus, Redis and coturn run on Janus's cores of the CPU plan; the shards' cores stay for workers.
    plan = make_plan(cfg.shards.cpu_plan, cfg.shards.count)
    taskset = shutil.which("taskset")
    pin = [taskset, "-c", ",".join(map(str, plan.janus_cpus))] if taskset else []
    programs = [Program("redis", [*pin, shutil.which("redis-server") or "redis-server",
                                  str(state / "redis" / "redis.conf")], 10, startsecs=0)]
    if pg_cluster is not None:
        programs.append(Program("postgres", [*pin, *pg_cluster.server_command()], 15, stopsignal="INT",
                                stopwaitsecs=30, startsecs=0))
    janus_ip = public_host if _is_ip(public_host) else primary_ip()
    if with_coturn:
        # The production peer policy (appliance.turn.peer_policy_lines): relays reach Janus's address and
        # nothing else, so a demo token on the network is no way into the LAN or this machine.
        turn_conf = state / "coturn" / "turnserver.conf"
        _write_private(turn_conf, "\n".join([
            f"listening-port={turn_port}", "fingerprint", "use-auth-secret",
            f"static-auth-secret={turn_secret}", "realm=voice-appliance", "no-cli", "no-tls", "no-dtls",
            "no-multicast-peers", "no-software-attribute", "simple-log", "log-file=stdout",
            f"pidfile={state / 'run' / 'turnserver.pid'}", f"userdb={state / 'coturn' / 'turndb'}",
            *peer_policy_lines([janus_ip] if janus_ip else []),
            "",
        ]))
        programs.append(Program("coturn", [*pin, shutil.which("turnserver") or "turnserver", "-c",
                                            str(turn_conf)], 20, startsecs=0))
    if with_janus:
        settings = janus_conf.JanusSettings(
            http_port=_url_port(cfg.janus.url, 8088),
            admin_port=_url_port(cfg.janus.admin_url, 7088),
            api_secret=janus_api,
            admin_secret=janus_admin,
            audiobridge_admin_key=ab_key,
            public_ip=public_host or janus_ip,
            plain_rtp_ip=cfg.media.rtp_host,
            events_backend=(f"http://{cfg.janus.events_host}:{cfg.janus.events_port}/janus-events"
                            if cfg.janus.events_port else ""),
            stats_period=cfg.janus.stats_period_seconds,
        )
        janus_conf.write(settings, state / "janus")
        programs.append(Program("janus", [*pin, *janus_conf.command(state / "janus")], 30, startsecs=0))
    if cfg.uses_emulator:
        programs.append(Program("emulator", [py, "-m", "appliance", "emulator", "--config", str(config_path)],
                                40, startsecs=0, environment=env))
    programs.append(Program("supervisor", [py, "-m", "appliance", "supervisor", "--config", str(config_path)],
                            50, stopsignal="INT", stopwaitsecs=15, startsecs=0, environment=env))
    scheme = "https" if cfg.api.tls_cert_file else "http"
    api_host = cfg.api.host if cfg.api.host not in ("0.0.0.0", "::") else host
    demo_url = f"{scheme}://{api_host}:{cfg.api.port}/"
    socket_path = state / "run" / "supervisor.sock"
    conf = state / "supervisord.conf"
    conf.write_text(supervisord_conf(state, socket_path, programs))
    return RunPlan(state, config_path, conf, socket_path, cfg, programs, demo_url)


def _wait_ready(url: str, stop: threading.Event, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not stop.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url + "healthz", timeout=1) as resp:
                if resp.status == 200:
                    print(f"\n*** ready: open {url} and click Call ***\n", flush=True)
                    return
        stop.wait(0.25)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="source config file (default: $VA_CONFIG or built-in defaults)")
    parser.add_argument("--state-dir", help="where keys, secrets, generated configs and logs go (./var)")
    parser.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT, help="our redis-server's port")
    parser.add_argument("--turn-port", type=int, default=DEFAULT_TURN_PORT, help="coturn's listening port")
    parser.add_argument("--public-host", default="", help="address callers use (ICE/TURN); default loopback")
    parser.add_argument("--no-janus", action="store_true", help="do not start Janus (tests)")
    parser.add_argument("--no-coturn", action="store_true", help="do not start coturn")
    parser.add_argument("--no-postgres", action="store_true",
                        help="do not start a private PostgreSQL for the call records")
    parser.add_argument("--postgres-port", type=int, default=DEFAULT_POSTGRES_PORT,
                        help="the private PostgreSQL's port (loopback)")
    parser.add_argument("--dry-run", action="store_true", help="write the configs, print the plan, exit")


def main(args: argparse.Namespace) -> int:
    base = load_for_cli(args.config)
    if base is None:
        return 2
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    try:
        plan = prepare(base, state, redis_port=args.redis_port, turn_port=args.turn_port,
                       with_janus=not args.no_janus, with_coturn=not args.no_coturn,
                       public_host=args.public_host, with_postgres=not args.no_postgres,
                       postgres_port=args.postgres_port)
    except (ConfigError, OSError, RuntimeError) as exc:
        print(f"voice-appliance run: {exc}", file=sys.stderr)
        return 2
    model = "Gemini Live (API key configured)" if not plan.cfg.uses_emulator else "the built-in Live emulator"
    print(
        f"voice-appliance run: state in {plan.state_dir}\n"
        f"  programs: {', '.join(p.name for p in plan.programs)}; model: {model}\n"
        f"  demo page: {plan.demo_url}\n"
        f"  mint a token: {sys.executable} -m appliance token --config {plan.config_path}\n"
        f"  control: supervisorctl -c {plan.supervisord_conf} status\n"
        "  Ctrl-C stops everything.",
        flush=True,
    )
    ca = plan.state_dir / "api-tls" / "emulator-ca.pem"
    if plan.cfg.api.tls_cert_file.startswith(str(plan.state_dir / "api-tls")):
        print(f"  TLS: certificate from a private CA ({ca}); import it in the browser or accept the warning",
              flush=True)
    if args.dry_run:
        print(json.dumps({"supervisord_conf": str(plan.supervisord_conf),
                          "programs": [dataclasses.asdict(p) for p in plan.programs]}, indent=2))
        return 0
    env = dict(os.environ)
    env.setdefault("VA_LOG_FORMAT", "text")
    env["VA_CONFIG"] = str(plan.config_path)
    supervisord = shutil.which("supervisord", path=str(Path(sys.executable).parent)) or "supervisord"
    proc = subprocess.Popen([supervisord, "-n", "-c", str(plan.supervisord_conf)], env=env,
                            start_new_session=True)
    stopping = threading.Event()

    def forward(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            print(f"\nvoice-appliance run: {signal.Signals(signum).name}, stopping everything…", flush=True)
        stopping.set()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    threading.Thread(target=_wait_ready, args=(plan.demo_url, stopping), daemon=True).start()
    rc = proc.wait()
    stopping.set()
    print(f"voice-appliance run: supervisord exited ({rc})", flush=True)
    return 0 if rc in (0, -signal.SIGTERM) else rc
