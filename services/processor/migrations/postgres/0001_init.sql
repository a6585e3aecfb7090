-- The processor's store. Times are milliseconds since the Unix epoch.

-- One row per (controller, request). `body` is the encoded DeliverRequest; NULL for a
-- tombstone written when a cancellation arrives before (or instead of) the delivery.
CREATE TABLE requests (
    controller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind BIGINT NOT NULL,
    body BYTEA,
    received_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    accepted_at BIGINT NOT NULL,
    cancelled_at BIGINT,
    cancel_reason TEXT,
    PRIMARY KEY (controller, request_id)
);

-- One task per subprocessor per request. `sequence` is the number of the last
-- acknowledgement queued for it; every state change increments it in the same transaction
-- that queues the acknowledgement.
CREATE TABLE tasks (
    controller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    state BIGINT NOT NULL,
    sequence BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    records_affected BIGINT NOT NULL DEFAULT 0,
    confirmed BIGINT NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    legal_basis TEXT NOT NULL DEFAULT '',
    retain_until BIGINT,
    last_error TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (controller, request_id, subprocessor)
);
CREATE INDEX tasks_runnable ON tasks (next_attempt_at) WHERE state IN (1, 2);

-- Acknowledgements waiting to reach the controller's registry (the processor's outbox).
CREATE TABLE ack_outbox (
    id BIGSERIAL PRIMARY KEY,
    controller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at BIGINT,
    UNIQUE (controller, request_id, subprocessor, sequence)
);
CREATE INDEX ack_outbox_pending ON ack_outbox (next_attempt_at) WHERE sent_at IS NULL;
