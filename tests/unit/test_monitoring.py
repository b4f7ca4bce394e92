"""Shipped monitoring assets (packaging/monitoring/): the alert rules pass promtool's checks and unit
tests, and every dashboard panel's expression parses (promtool, offline) and names only metrics the
appliance exports (collected from the real registries and collectors, not from a list)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MON = Path(__file__).resolve().parents[2] / "packaging" / "monitoring"
RULES = MON / "voice-appliance.rules.yml"
DASHBOARD = MON / "voice-appliance-dashboard.json"
# metrics a rule or panel may name that another component owns and exports
EXTERNAL = {"up",  # Prometheus's own scrape health
            "redis_up"}  # Debian's prometheus-redis-exporter (redis role; tests/unit/test_probes.py)
PENDING: set[str] = set()  # names another branch is about to export (none now)
METRIC = re.compile(r"\b(va_[a-z0-9_]+|redis_[a-z0-9_]+|up)\b(?!\s*\()")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return path


def exported_names() -> set[str]:
    """Exposition names (with _total/_bucket/_sum/_count) of everything /metrics serves."""
    from prometheus_client import REGISTRY

    from appliance.metrics import SHM_COUNTERS, Metrics

    for mod in ("appliance.api", "appliance.state", "appliance.janus", "appliance.arbiter",
                "appliance.ratelimit", "appliance.breaker", "appliance.probes", "appliance.records.writer",
                "workers.ai.live", "workers.ai.live.session"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a missing dependency is an error, not a missing module
                raise
    m = Metrics()
    m.add_shard_counters(lambda: {0: dict.fromkeys(SHM_COUNTERS, 1.0)})
    m.add_shard_histograms(lambda: {0: {}})
    names: set[str] = set()
    for registry in (m.registry, REGISTRY):
        for fam in registry.collect():
            base = fam.name
            names.add(base)
            if fam.type == "counter":
                names.add(base + "_total")
            elif fam.type == "histogram":
                names.update(base + s for s in ("_bucket", "_sum", "_count"))
    return names


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_by = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", no_strings)
    return set(METRIC.findall(no_by))


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([tool, "test", "rules", "voice-appliance.rules.test.yml"], cwd=MON,
                          capture_output=True, text=True)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_rules_name_exported_metrics() -> None:
    exported = exported_names()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    seen = set()
    for g in groups:
        for rule in g["rules"]:
            for name in metric_names(rule["expr"]):
                seen.add(name)
                assert name in exported | EXTERNAL | PENDING, (rule["alert"], name)
    for needed in ("va_call_mos_sum", "va_rtp_loss_ratio_sum", "va_rtp_jitter_seconds_sum",
                   "va_turn_e2e_seconds_bucket", "va_worker_restarts_total", "va_sessions_capacity",
                   "va_component_up", "redis_up"):
        assert needed in seen


def test_dashboard_panels_parse_and_name_exported_metrics(tmp_path: Path) -> None:
    tool = promtool()
    dash = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    rules, n = [], 0
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            expr = t["expr"].replace("$instance", ".*")
            names = metric_names(expr)
            assert names, (panel["title"], expr)
            missing = names - exported - EXTERNAL
            assert not missing, (panel["title"], missing)
            n += 1
            rules.append({"record": f"dashboard:panel{panel['id']}:{t['refId']}", "expr": expr})
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{n} rules found" in check.stdout
    # a broken expression is caught (the check is not vacuous)
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum(rate(va_call_mos_sum[3m])"}]}]}))
    assert subprocess.run([tool, "check", "rules", str(path)], capture_output=True).returncode != 0
