-- The call record: one row per call, its events, transcript lines and usage reports.
-- Every item table is keyed by the spool item id, so re-shipping a batch changes nothing.
CREATE TABLE calls (
    id            text PRIMARY KEY,
    box           text NOT NULL,
    sub           text NOT NULL,
    tenant        text,
    mode          text NOT NULL DEFAULT 'direct',
    created_at    timestamptz NOT NULL,
    connected_at  timestamptz,
    ended_at      timestamptz,
    end_reason    text,
    resume_count  integer NOT NULL DEFAULT 0,
    model         text,
    voice         text,
    language      text,
    quality       jsonb,
    counters      jsonb,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX calls_created_idx ON calls (created_at DESC, id DESC);
CREATE INDEX calls_sub_idx ON calls (sub, created_at DESC);
CREATE INDEX calls_live_idx ON calls (created_at DESC) WHERE ended_at IS NULL;

CREATE TABLE call_events (
    id        text PRIMARY KEY,
    call_id   text NOT NULL,
    at        timestamptz NOT NULL,
    offset_ms bigint,
    type      text NOT NULL,
    data      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX call_events_call_idx ON call_events (call_id, at, id);

CREATE TABLE transcript_lines (
    id        text PRIMARY KEY,
    call_id   text NOT NULL,
    at        timestamptz NOT NULL,
    offset_ms bigint NOT NULL,
    speaker   text NOT NULL CHECK (speaker IN ('caller', 'assistant')),
    text      text NOT NULL
);
CREATE INDEX transcript_call_idx ON transcript_lines (call_id, offset_ms, at, id);

CREATE TABLE usage_reports (
    id              text PRIMARY KEY,
    call_id         text NOT NULL,
    at              timestamptz NOT NULL,
    model           text,
    prompt_tokens   bigint NOT NULL DEFAULT 0,
    response_tokens bigint NOT NULL DEFAULT 0,
    total_tokens    bigint NOT NULL DEFAULT 0,
    details         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX usage_call_idx ON usage_reports (call_id);
