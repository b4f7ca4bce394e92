"""A call's tools as the Live API takes them: the declarations for the setup and, for each function the
model does not wait for (``NON_BLOCKING``), the ``scheduling`` its responses carry.

The tools file (``model.tools_file``, checked by appliance/config.py) holds ``FunctionDeclaration``
objects plus one key of ours per function, ``scheduling`` (``SILENT`` | ``WHEN_IDLE`` | ``INTERRUPT``),
which is not a declaration field: it is taken out here and put on every ``FunctionResponse`` of that
function. Default ``WHEN_IDLE`` (appliance/model_profiles.py says why). A declaration without
``behavior`` is declared ``NON_BLOCKING`` for a 3.8 model (its documented default, said explicitly so the
setup shows it) and left as is for older models; a ``BLOCKING`` function's responses carry no
``scheduling`` (the service ignores it there, and older models' wire stays unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from appliance.model_profiles import DEFAULT_SCHEDULING, model_profile, non_blocking_by_default


@dataclass(frozen=True, slots=True)
class ToolPlan:
    declarations: tuple[dict[str, object], ...] = ()  # ``types.FunctionDeclaration(**d)`` each
    scheduling: Mapping[str, str] = field(default_factory=dict)  # NON_BLOCKING function → scheduling

    def schedule(self, responses: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
        """``[{"id", "name", "response"}]`` with ``scheduling`` added for NON_BLOCKING functions."""
        out = []
        for r in responses:
            s = self.scheduling.get(str(r.get("name") or ""))
            out.append({**r, "scheduling": s} if s and "scheduling" not in r else dict(r))
        return out


def tool_plan(decls: Sequence[Mapping[str, object]] | None, model: str) -> ToolPlan:
    default_nb = non_blocking_by_default(model_profile(model))
    out: list[dict[str, object]] = []
    scheduling: dict[str, str] = {}
    for d in decls or ():
        decl = dict(d)
        sched = str(decl.pop("scheduling", "") or DEFAULT_SCHEDULING).upper()
        behavior = str(decl.get("behavior") or "").upper()
        if not behavior and default_nb:
            behavior = decl["behavior"] = "NON_BLOCKING"
        if behavior == "NON_BLOCKING":
            scheduling[str(decl.get("name"))] = sched
        out.append(decl)
    return ToolPlan(tuple(out), scheduling)
