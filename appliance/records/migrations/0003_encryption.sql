-- Encryption at rest (appliance/compliance/atrest.py): wrapped data keys, sealed transcript text.
CREATE TABLE data_keys (
    key_id     text PRIMARY KEY,
    tenant     text NOT NULL,
    period     text NOT NULL,
    kek_id     text NOT NULL,         -- the master key that wraps it
    wrapped    text NOT NULL,         -- base64(nonce | AES-GCM(master, data key))
    created_at timestamptz NOT NULL,
    retired    boolean NOT NULL DEFAULT false
);
ALTER TABLE transcript_lines ALTER COLUMN text DROP NOT NULL;
ALTER TABLE transcript_lines ADD COLUMN text_sealed bytea;   -- envelope.Keyring.seal(text), context = line id
