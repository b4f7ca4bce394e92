"""The .deb's dependency lock (packaging/requirements.lock): every runtime dependency of pyproject.toml is
pinned there to a release that satisfies its specifier, each with sha256 hashes, and nothing else slips
in (debian/rules installs it in pip's hash-checking mode with --no-deps). Regenerate with ``make lock``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _locked(path: Path) -> dict[str, tuple[Version, int]]:
    text = path.read_text()
    out: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", text, flags=re.I):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if m:
            hashes = len(re.findall(r"--hash=sha256:[0-9a-f]{64}", block))
            out[canonicalize_name(m.group(1))] = (Version(m.group(2)), hashes)
    return out


def test_every_runtime_dependency_is_locked_and_hashed():
    locked = _locked(ROOT / "packaging" / "requirements.lock")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {**default_environment(), "sys_platform": "linux", "python_version": "3.11"}
    for dep in map(Requirement, deps):
        if dep.marker and not dep.marker.evaluate(env):
            continue
        name = canonicalize_name(dep.name)
        assert name in locked, f"{name} is in pyproject.toml but not in the lock (make lock)"
        version, _ = locked[name]
        assert dep.specifier.contains(version, prereleases=True), f"{name}=={version} does not satisfy {dep}"
    assert all(n >= 1 for _, n in locked.values()), [k for k, (_, n) in locked.items() if n == 0]
    # no line pins without ==, no index or link overrides that would bypass the hashes' origin
    text = (ROOT / "packaging" / "requirements.lock").read_text()
    assert not re.search(r"^(--index-url|--extra-index-url|--find-links|-e )", text, re.M)
    # locked for Debian's Python 3.11.2 (make lock uses /usr/bin/python3), not a newer 3.11: redis needs
    # async-timeout below 3.11.3 and --no-deps would leave it out (the .deb's supervisor failed to start)
    assert "async-timeout" in locked
    # the JWT library is past the issuer bypass (CVE-2024-53861) and the ignored crit (CVE-2026-32597)
    assert locked["pyjwt"][0] >= Version("2.12")


def test_silero_lock_is_hashed():
    locked = _locked(ROOT / "packaging" / "silero-vad.lock")
    assert set(locked) == {"silero-vad"} and locked["silero-vad"][1] >= 1
    rules = (ROOT / "packaging" / "debian" / "rules").read_text()
    assert "--requirements packaging/requirements.lock" in rules and "--extra-pip-arg --no-deps" in rules
    assert "--require-hashes -r packaging/silero-vad.lock" in rules
