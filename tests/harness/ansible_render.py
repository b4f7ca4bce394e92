"""Render an Ansible role's template outside Ansible, with the role's own defaults, for tests.

What ships is what is tested: the fleet harness (tests/harness/fleet.py) runs HAProxy and keepalived on
configs rendered from ``ansible/roles/<role>/templates/*.j2``, with the role's ``defaults/main.yml``
overlaid by the test's variables, exactly as ``ansible.builtin.template`` would (the role templates use
core Jinja2 filters plus Ansible's ``hash``, provided here, so plain Jinja2 — the library Ansible renders
with — gives the same text).
Defaults that refer to other variables (``"{{ loadbalancer_vip_interface }}"``) are resolved in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import yaml

ROLES_DIR = Path(__file__).resolve().parents[2] / "ansible" / "roles"


def role_vars(role: str, overrides: dict[str, Any] | None = None,
              host: str = "test-host") -> dict[str, Any]:
    """The role's defaults with ``overrides`` applied and ``{{ … }}`` defaults resolved."""
    defaults = yaml.safe_load((ROLES_DIR / role / "defaults" / "main.yml").read_text()) or {}
    values: dict[str, Any] = {"inventory_hostname": host,
                              "ansible_managed": "Managed by Ansible (test render)",
                              **defaults, **(overrides or {})}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    for _ in range(5):  # a few rounds settle chains of references
        changed = False
        for key, value in values.items():
            if isinstance(value, str) and "{{" in value:
                values[key] = env.from_string(value).render(values)
                changed = True
        if not changed:
            break
    return values


def _hash(value: str, algorithm: str = "sha1") -> str:
    """Ansible's ``hash`` filter."""
    import hashlib

    return hashlib.new(algorithm, str(value).encode()).hexdigest()


def render(role: str, template: str, overrides: dict[str, Any] | None = None, host: str = "test-host") -> str:
    """The text ``ansible.builtin.template`` writes for ``roles/<role>/templates/<template>``."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLES_DIR / role / "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)  # Ansible's template module defaults
    env.filters["hash"] = _hash
    return env.get_template(template).render(role_vars(role, overrides, host))
