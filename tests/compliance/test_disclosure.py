"""The AI disclosure cannot be turned off silently: without a reason the config does not load (also
tests/unit/test_config.py), and with one every start writes a warning and an audit entry carrying the
reason — through the supervisor's real record spool and the real record writer into the audit trail
(PostgreSQL), chained and verifiable like every other entry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.compliance import disclosure, trail
from appliance.config import ConfigError, load_config
from appliance.records.calls import SupervisorRecorder
from appliance.records.spool import spool_root
from appliance.records.writer import Database, RecordWriter
from tests.compliance.test_trail import _config, _rows, _verify
from tests.records.conftest import Db


def test_disclosure_off_needs_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"compliance\.ai_disclosure_off_reason: required"):
        load_config(None, env={"VA_COMPLIANCE_AI_DISCLOSURE": "false"})


async def test_disclosure_off_is_logged_and_audited_at_start(pg_db: Db, tmp_path: Path, caplog) -> None:
    path = _config(tmp_path, pg_db)
    path.write_text(path.read_text() + '[compliance]\nai_disclosure = false\n'
                    'ai_disclosure_off_reason = "the IVR in front discloses it"\n')
    cfg = load_config(str(path))
    rec = SupervisorRecorder(cfg, "box")
    with caplog.at_level(logging.WARNING, logger="appliance.compliance.disclosure"):
        assert disclosure.announce(cfg, rec.audit)
    assert any("AI disclosure is OFF" in r.getMessage() for r in caplog.records)
    rec.close()
    signer = trail.Signer(trail.load_signing_key(cfg), every_entries=1)
    writer = RecordWriter(Database(pg_db.dsn, pg_db.password),
                          spool_root(cfg.paths.state_dir, cfg.records.spool_dir), signer=signer)
    assert await writer.drain(20)
    rows = await _rows(pg_db, "SELECT actor, action, details FROM audit_log ORDER BY seq")
    assert [(a, b) for a, b, _ in rows] == [("system", disclosure.ACTION)]
    assert "the IVR in front discloses it" in str(rows[0][2])
    assert _verify(path).returncode == 0
    # disclosure on (the default): nothing to announce, nothing audited
    assert not disclosure.announce(load_config(None, env={}), rec.audit)
