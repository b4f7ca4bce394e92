-- Webhook outbox (filled by the writer in the transaction that stores the items) and dead letters.
CREATE TABLE webhook_outbox (
    event_id        text PRIMARY KEY,
    call_id         text NOT NULL,
    type            text NOT NULL,
    payload         jsonb NOT NULL,
    body            text,           -- fixed at the first attempt: every retry sends the same bytes
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    delivered_at    timestamptz
);
CREATE INDEX webhook_outbox_due_idx ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL;

CREATE TABLE webhook_dead_letters (
    event_id   text PRIMARY KEY,
    call_id    text NOT NULL,
    type       text NOT NULL,
    body       text NOT NULL,
    attempts   integer NOT NULL,
    last_error text,
    created_at timestamptz NOT NULL,
    dead_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_dead_at_idx ON webhook_dead_letters (dead_at DESC);
