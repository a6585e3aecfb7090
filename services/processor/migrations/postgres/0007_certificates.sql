-- Deletion certificates the processor issued for its erasure tasks, kept exactly as signed
-- and sent with the acknowledgement of `sequence`. A task has one per COMPLETED or
-- RETAINED step; a later one names the earlier in its body (`follows`).
CREATE TABLE certificates (
    id TEXT PRIMARY KEY,
    controller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    subprocessor TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    body BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    issued_at BIGINT NOT NULL
);
CREATE INDEX certificates_task ON certificates (controller, request_id, subprocessor, sequence);
