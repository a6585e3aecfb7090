-- The registry's store. Times are milliseconds since the Unix epoch.

-- One row per data-subject request. `body` is the encoded SubmitRequest; it holds the raw
-- identities and is set to NULL when they are forgotten, leaving `identity_hashes`.
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    partner TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    body BYTEA,
    identity_hashes TEXT NOT NULL,
    kind BIGINT NOT NULL,
    state BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    extension_months BIGINT NOT NULL DEFAULT 0,
    extension_reasons TEXT NOT NULL DEFAULT '[]',
    trace_id TEXT NOT NULL,
    cancel_reason TEXT,
    updated_at BIGINT NOT NULL,
    checked_at BIGINT NOT NULL,
    finished_at BIGINT,
    UNIQUE (partner, idempotency_key)
);
CREATE INDEX requests_by_received ON requests (received_at DESC, id DESC);
CREATE INDEX requests_open_by_checked ON requests (state, checked_at);

-- The transactional outbox: one row per (request, processor, operation), written in the same
-- transaction as the request (or its cancellation) and retried until the processor accepts.
CREATE TABLE deliveries (
    request_id TEXT NOT NULL REFERENCES requests (id),
    processor TEXT NOT NULL,
    op TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at BIGINT,
    PRIMARY KEY (request_id, processor, op)
);
CREATE INDEX deliveries_pending ON deliveries (next_attempt_at) WHERE done_at IS NULL;

-- The folded state of every task, from the highest-sequence acknowledgement seen.
CREATE TABLE tasks (
    request_id TEXT NOT NULL REFERENCES requests (id),
    processor TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    state BIGINT NOT NULL,
    sequence BIGINT NOT NULL,
    records_affected BIGINT NOT NULL DEFAULT 0,
    confirmed BIGINT NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    legal_basis TEXT NOT NULL DEFAULT '',
    retain_until BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, processor, subprocessor)
);

-- Every acknowledgement received, once: the primary key is what makes them idempotent.
CREATE TABLE acknowledgements (
    request_id TEXT NOT NULL,
    processor TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    state BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, processor, subprocessor, sequence)
);

-- What happened to each request, for Watch, `dsrctl trace` and operators.
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    type BIGINT NOT NULL,
    occurred_at BIGINT NOT NULL,
    request_state BIGINT NOT NULL,
    processor TEXT NOT NULL DEFAULT '',
    subprocessor TEXT NOT NULL DEFAULT '',
    task_state BIGINT NOT NULL DEFAULT 0,
    sequence BIGINT NOT NULL DEFAULT 0,
    attempt BIGINT NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_by_request ON events (request_id, id);
