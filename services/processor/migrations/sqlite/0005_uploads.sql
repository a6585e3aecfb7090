-- The upload outbox: one row per RETURN_OF_DATA task whose export is written and waits to be
-- uploaded to the controller's registry. Written in the same transaction as the task's
-- IN_PROGRESS step that lists the files, and retried until the registry holds the part.
CREATE TABLE uploads (
    controller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at BIGINT,
    PRIMARY KEY (controller, request_id, subprocessor)
);
CREATE INDEX uploads_pending ON uploads (next_attempt_at) WHERE done_at IS NULL;
