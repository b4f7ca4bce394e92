"""Render an Ansible role's template outside Ansible, for tests that run the rendered file for real
(coturn's peer policy, the nftables ruleset) without a converge.

    text = render("coturn", "turnserver.conf.j2", coturn_static_auth_secret="s", coturn_janus_addresses=[...])

Variables: the role's defaults/main.yml, overridden by keyword arguments; default values that are
templates are rendered against the same variables (one that needs a fact not given stays undefined).
Jinja2 with Ansible's template-module settings (``trim_blocks``) plus the Ansible tests the roles use
(``search``). The ops suite converges the real roles with Ansible; this is the fast path for what a
role *produces*.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

ROLES = Path(__file__).resolve().parents[2] / "ansible" / "roles"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.tests["search"] = lambda value, pattern: re.search(pattern, str(value)) is not None
    env.tests["match"] = lambda value, pattern: re.match(pattern, str(value)) is not None
    env.filters["regex_escape"] = re.escape
    return env


def role_vars(role: str, **overrides: Any) -> dict[str, Any]:
    """The role's defaults with ``overrides`` applied and templated defaults rendered."""
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
    env = _env()
    values: dict[str, Any] = {"ansible_managed": "Ansible managed (test render)", **defaults, **overrides}
    for key, value in defaults.items():
        if key in overrides or not isinstance(value, str) or "{{" not in value:
            continue
        try:
            rendered = env.from_string(value).render(values)
        except jinja2.UndefinedError:  # needs a fact not given: an error only if the template uses it
            del values[key]
            continue
        values[key] = yaml.safe_load(rendered) if rendered.startswith(("[", "{")) else rendered
    return values


def render(role: str, template: str, **overrides: Any) -> str:
    env = _env()
    source = (ROLES / role / "templates" / template).read_text()
    return env.from_string(source).render(role_vars(role, **overrides))
