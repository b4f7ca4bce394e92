-- The audit trail (appliance/compliance/trail.py): hash-chained entries, signed checkpoints, and the
-- anchor (last entry removed by a retention purge) that the verifier starts from.
CREATE TABLE audit_log (
    seq     bigint PRIMARY KEY,
    at      double precision NOT NULL,   -- unix seconds, exactly as hashed
    actor   text NOT NULL,
    action  text NOT NULL,
    subject text NOT NULL DEFAULT '',
    details text NOT NULL DEFAULT '{}',  -- canonical JSON, exactly as hashed
    prev    text NOT NULL,
    hash    text NOT NULL
);
CREATE INDEX audit_log_subject_idx ON audit_log (subject, seq);

CREATE TABLE audit_checkpoints (
    seq       bigint PRIMARY KEY,
    hash      text NOT NULL,
    at        double precision NOT NULL,
    signature text NOT NULL
);

CREATE TABLE audit_anchor (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq  bigint NOT NULL,
    hash text NOT NULL
);

-- Append-only: UPDATE is refused, DELETE only inside a retention purge (which sets va.audit_purge and
-- moves the anchor in the same transaction). A table owner can still disable the trigger: that is what
-- the hash chain and the signed checkpoints catch.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('va.audit_purge', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
