"""docs/operations.md lists every metric the appliance defines (issue 14: "every metric with its meaning
and unit"): a metric added in code without its row in the table fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = re.compile(r'\b(?:Counter|Gauge|Histogram|Summary)\(\s*"(va_[a-z0-9_]+)"')


def test_every_defined_metric_has_a_row_in_operations_md() -> None:
    defined = {m.group(1): path.relative_to(ROOT)
               for top in ("appliance", "workers", "shm") for path in (ROOT / top).rglob("*.py")
               for m in DEFINITION.finditer(path.read_text())}
    assert len(defined) > 30  # the scan finds the definitions
    table = (ROOT / "docs/operations.md").read_text()
    rows = set(re.findall(r"^\| `(va_[a-z0-9_]+)(?:\{[^`]*\})?` \|", table, re.M))
    documented = {r.removesuffix("_total") for r in rows} | rows
    missing = {n: str(p) for n, p in defined.items() if n not in documented and n.removesuffix("_total")
               not in documented}
    assert not missing, missing
