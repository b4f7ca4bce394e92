"""The call record's items carry the tenant and the routed model: ``call.created`` from the supervisor's
recorder and ``usage`` from the AI worker's (so the per-call cost is priced with the model that ran)."""

from __future__ import annotations

from types import SimpleNamespace

from appliance.config import load_config, replace
from appliance.records.calls import SupervisorRecorder
from appliance.records.spool import SpoolReader, spool_root
from workers.ai.records import CallRecorder

FALLBACK = "gemini-3.1-flash-live-preview"


def _items(directory) -> list[dict]:
    reader, out = SpoolReader(directory), []
    while True:
        b = reader.read_batch(100)
        reader.ack(b)
        if not b.items:
            return out
        out += b.items


def test_created_and_usage_items_name_tenant_and_routed_model(tmp_path) -> None:
    cfg = replace(load_config(None, env={}), paths={"state_dir": str(tmp_path)},
                  records={"dsn": "postgresql://va@127.0.0.1:5432/va"})
    sup = SupervisorRecorder(cfg, "b1")
    live = SimpleNamespace(session_id="b1.abc", sub="alice", mode="direct")
    sup.created(live, resumed=False, voice="Kore", language="en-GB", tenant="bank", model=FALLBACK)
    sup.spool.sync()
    sup.close()
    ai = CallRecorder(cfg, 0)
    call = SimpleNamespace(session_id="b1.abc", options={"tenant": "bank", "model": FALLBACK})
    ai.usage(call, SimpleNamespace(prompt_tokens=10, response_tokens=20, total_tokens=30, details={}))
    ai.spool.sync()
    ai.close()
    root = spool_root(str(tmp_path), "")
    (created,) = [i for i in _items(root / "supervisor") if i.get("kind") == "call.created"]
    assert (created["tenant"], created["model"], created["voice"]) == ("bank", FALLBACK, "Kore")
    (usage,) = [i for i in _items(root / "shard-0") if i.get("kind") == "usage"]
    assert usage["model"] == FALLBACK and usage["total_tokens"] == 30
