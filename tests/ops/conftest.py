"""Fixtures for the ops suite: the .deb (cached by source hash), a booted Debian 12, the converged playbook.

Everything expensive is cached under ``/var/cache/voice-appliance-tests`` (``$VA_OPS_CACHE``): the rootfs
by its package list, the .deb by the hash of every file that goes into it. The container itself is new
for every session (a tmpfs overlay over the cached rootfs) and is stopped by its nspawn PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import nspawn

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
PLUGINS = Path(__file__).parent / "plugins"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
DEB_INPUTS = [  # what packaging/build-deb.sh stages (keep the two lists in step)
    "pyproject.toml",
    "README.md",
    "appliance",
    "workers",
    "shm",
    "bench",
    "docs/operations.md",
    "docs/architecture.md",
    "packaging",
    "systemd",
]


# The acme test leaves the shared container serving pebble's certificate (it proves the in-place renewal),
# so every test that trusts the session's test CA has to run before it: move it to the end, whatever the
# file order says.
LAST_MODULES = ("test_acme.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name in LAST_MODULES)  # stable: everything else keeps its order


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("ops tests need root (debootstrap, network namespaces, nspawn)")
    missing = [
        t
        for t in (
            "debootstrap",
            "systemd-nspawn",
            "dpkg-buildpackage",
            "dh_virtualenv",
            "lintian",
            "nsenter",
            "ip",
        )
        if shutil.which(t) is None
    ]
    if missing:
        pytest.fail(f"missing tools (make deps-test installs them): {', '.join(missing)}")


def source_hash() -> str:
    """Hash of every file the .deb is built from (tracked and untracked-but-not-ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *DEB_INPUTS],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    h = hashlib.sha256()
    for name in sorted(f for f in files if f):
        path = REPO / name.decode()
        if path.is_file():
            h.update(name + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class BuiltDeb:
    path: Path
    lintian: str  # lintian's output (empty when clean)
    cached: bool


@pytest.fixture(scope="session")
def deb() -> BuiltDeb:
    """The voice-appliance .deb, built by packaging/build-deb.sh (with lintian) once per source hash."""
    _require_root_tools()
    out = nspawn.CACHE_DIR / "deb" / source_hash()
    found = sorted(out.glob("voice-appliance_*.deb"))
    cached = bool(found)
    if not found:
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        proc = subprocess.run(
            [str(REPO / "packaging/build-deb.sh"), str(tmp)], capture_output=True, text=True, timeout=1800
        )
        if proc.returncode != 0:
            pytest.fail(f"build-deb.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        found = sorted(out.glob("voice-appliance_*.deb"))
        # Keep the cache bounded: the three newest builds (each ~80 MB).
        builds = sorted(
            (p for p in out.parent.iterdir() if ".tmp" not in p.name), key=lambda p: p.stat().st_mtime
        )
        for old in builds[:-3]:
            shutil.rmtree(old, ignore_errors=True)
    lintian_file = out / "lintian.txt"
    return BuiltDeb(found[-1], lintian_file.read_text() if lintian_file.exists() else "", cached)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    _require_root_tools()
    return nspawn.ensure_rootfs()


@dataclass
class PlaybookRun:
    rc: int
    output: str
    recap: dict[str, int]


def parse_recap(output: str, host: str) -> dict[str, int]:
    """The PLAY RECAP counters for ``host`` (ok, changed, unreachable, failed, skipped, rescued, ignored)."""
    m = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", output.split("PLAY RECAP")[-1], re.M)
    if not m:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def make_secrets(tmp: Path) -> dict[str, str]:
    """Fresh secrets and a JWT key pair for one test session (what ansible-vault holds in production)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp / "jwt_private_key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "vault_jwt_public_key": public.decode(),
        "vault_turn_secret": secrets.token_urlsafe(24),
        "vault_janus_api_secret": secrets.token_urlsafe(24),
        "vault_janus_admin_secret": secrets.token_urlsafe(24),
        "vault_audiobridge_admin_key": secrets.token_urlsafe(24),
    }


class ProvisionedHost:
    """A booted container plus the ability to run the site playbook against it."""

    def __init__(self, ct: nspawn.Container, deb: BuiltDeb, workdir: Path) -> None:
        self.ct = ct
        self.deb = deb
        self.workdir = workdir
        self.secrets = make_secrets(workdir)
        # the operator's certificate for the box's public address (from the vault in production)
        from appliance.emulator.certs import ensure_certs

        self.tls = ensure_certs(workdir / "tls", [nspawn.HOST_ADDR])
        self.inventory = workdir / "inventory.yml"
        self.inventory.write_text(
            json.dumps(
                {
                    "all": {
                        "children": {
                            "appliance": {
                                "hosts": {
                                    ct.name: {
                                        "ansible_connection": "nspawn",
                                        "ansible_nspawn_leader": ct.leader,
                                        "ansible_python_interpreter": "/usr/bin/python3",
                                    }
                                }
                            }
                        }
                    },
                }
            )
        )
        s = self.secrets
        extra = {
            **s,
            "appliance_deb": str(deb.path),
            # The container has no route to a Debian mirror: every package is already in the rootfs.
            **{f"{r}_apt_update_cache": False for r in ("hardening", "redis", "coturn", "janus")},
            "hardening_management_cidrs": [],
            "coturn_realm": "ops-test.invalid",
            "coturn_static_auth_secret": s["vault_turn_secret"],
            "janus_api_secret": s["vault_janus_api_secret"],
            "janus_admin_secret": s["vault_janus_admin_secret"],
            "janus_audiobridge_admin_key": s["vault_audiobridge_admin_key"],
            "appliance_public_host": nspawn.HOST_ADDR,
            "appliance_tls_cert_pem": self.tls.cert_file.read_text(),
            "appliance_tls_key_pem": self.tls.key_file.read_text(),
            "appliance_auth_issuer": "https://idp.ops-test.invalid",
            "appliance_turn_uris": [f"turn:{nspawn.HOST_ADDR}:3478?transport=udp"],
            "appliance_credentials": {
                "gemini_api_key": "",
                "jwt_public_key.pem": s["vault_jwt_public_key"],
                "turn_secret": s["vault_turn_secret"],
                "janus_api_secret": s["vault_janus_api_secret"],
                "janus_admin_secret": s["vault_janus_admin_secret"],
                "audiobridge_admin_key": s["vault_audiobridge_admin_key"],
            },
        }
        self.extra_vars = workdir / "extra-vars.json"
        self.extra_vars.write_text(json.dumps(extra))
        self.runs: list[PlaybookRun] = []

    def playbook(
        self, *args: str, playbook: Path = ANSIBLE_DIR / "site.yml", timeout: float = 900
    ) -> PlaybookRun:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS / "connection"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        }
        proc = subprocess.run(
            [
                str(VENV_BIN / "ansible-playbook"),
                "-i",
                str(self.inventory),
                "-e",
                f"@{self.extra_vars}",
                "--force-handlers",
                *args,
                str(playbook),
            ],
            cwd=ANSIBLE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = proc.stdout + proc.stderr
        run = PlaybookRun(proc.returncode, out, parse_recap(out, self.ct.name))
        (self.workdir / f"playbook-{len(self.runs) + 1}.log").write_text(out)
        self.runs.append(run)
        return run


@pytest.fixture(scope="session")
def provisioned(
    deb: BuiltDeb, rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProvisionedHost]:
    """A booted Debian 12 converged by site.yml twice (the second run is the idempotence check)."""
    workdir = tmp_path_factory.mktemp("ops")
    with nspawn.booted(rootfs, name="va-ops", workdir=workdir) as ct:
        host = ProvisionedHost(ct, deb, workdir)
        first = host.playbook()
        if first.rc != 0:
            units = ct.sh("systemctl --failed --no-legend --plain; journalctl -u voice-appliance -n 40 "
                          "--no-pager", check=False).stdout
            pytest.fail(f"first converge failed (rc={first.rc}):\n{first.output[-6000:]}\n{units[-4000:]}")
        host.playbook()
        yield host
