"""Token usage and its cost estimate summed per tenant and model over a time range (the admin API's
``GET /v1/admin/usage``, scope ``records:read``).

Why in SQL: a busy box stores a usage report per model turn (hundreds of thousands a month); the
database sums tokens and the per-modality split (``details``, the same jsonb the call record reads)
grouped by (tenant, model), and only those groups are priced here, with the same table and rules as a
single call (``usage.cost_of``). The model is the one each report names (the routed model), else the
call's. Tokens a report did not attribute to a modality are priced as ``UNSPECIFIED`` (highest rate),
like in ``store.summarize_usage``. Calls without a tenant are the default tenant's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from appliance.config import DEFAULT_TENANT
from appliance.records.usage import PriceTable, cost_of

_FROM = (" FROM usage_reports u LEFT JOIN calls c ON c.id = u.call_id"
         " WHERE u.at >= %(since)s AND u.at < %(until)s"
         " AND (%(tenant)s::text IS NULL OR coalesce(c.tenant, %(default)s) = %(tenant)s)")
_GROUP = "coalesce(c.tenant, %(default)s) AS tenant, coalesce(u.model, c.model, '') AS model"

TOTALS_SQL = (f"SELECT {_GROUP}, count(DISTINCT u.call_id) AS calls, count(*) AS reports,"
              " sum(u.prompt_tokens) AS prompt_tokens, sum(u.response_tokens) AS response_tokens,"
              f" sum(u.total_tokens) AS total_tokens{_FROM} GROUP BY 1, 2 ORDER BY 1, 2")
MODALITY_SQL = (f"SELECT {_GROUP}, d.key AS direction, m.key AS modality, sum(m.value::bigint) AS tokens"
                f"{_FROM.replace(' WHERE', ', jsonb_each(u.details) d, jsonb_each_text(d.value) m WHERE')}"
                " AND d.key IN ('input', 'output') AND jsonb_typeof(d.value) = 'object'"
                " GROUP BY 1, 2, 3, 4")


async def usage_report(conn: psycopg.AsyncConnection[Any], *, since: datetime, until: datetime,
                       tenant: str | None, prices: PriceTable) -> dict[str, Any]:
    params = {"since": since, "until": until, "tenant": tenant, "default": DEFAULT_TENANT}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(TOTALS_SQL, params)
        totals = await cur.fetchall()
        await cur.execute(MODALITY_SQL, params)
        split = await cur.fetchall()
    by: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for r in split:
        d = by.setdefault((r["tenant"], r["model"]), {"input": {}, "output": {}})
        d[r["direction"]][r["modality"].upper()] = int(r["tokens"])
    rows = []
    cost_total = 0.0
    unpriced = False
    for t in totals:
        modal = by.get((t["tenant"], t["model"]), {"input": {}, "output": {}})
        for direction, tokens in (("input", int(t["prompt_tokens"])), ("output", int(t["response_tokens"]))):
            rest = tokens - sum(modal[direction].values())
            if rest > 0:
                modal[direction]["UNSPECIFIED"] = modal[direction].get("UNSPECIFIED", 0) + rest
        cost = cost_of(prices, t["model"] or None, modal)
        if cost["cost_usd"] is None:
            unpriced = True
        else:
            cost_total += cost["cost_usd"]
        rows.append({"tenant": t["tenant"], "model": t["model"] or None, "calls": int(t["calls"]),
                     "reports": int(t["reports"]), "prompt_tokens": int(t["prompt_tokens"]),
                     "response_tokens": int(t["response_tokens"]), "total_tokens": int(t["total_tokens"]),
                     "by_modality": modal, **cost})
    return {"since": since.isoformat(), "until": until.isoformat(), "tenant": tenant, "rows": rows,
            "cost_usd": round(cost_total, 6), "currency": "USD",
            "complete": not unpriced}  # false: a model without a price is left out of cost_usd
