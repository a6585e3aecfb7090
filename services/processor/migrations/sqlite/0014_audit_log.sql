-- The processor's tamper-evident audit trail, in the registry's format: one entry per change
-- an auditor asks about, written in that change's transaction. `seq` counts 1, 2, 3, ...
-- without gaps (each entry is the last one + 1, never a sequence); `hash` is the SHA-256 of
-- the entry and `prev_hash` that of the entry before (64 zeros for the first), as defined in
-- dsrelay_runtime::audit, so `dsrctl audit verify --processor` checks it with the registry's
-- verifier. `event_type` is a ProcessorAuditEvent value. `detail` never holds a subject's
-- identities; free text appears only as its keyed hash. The trail starts when this migration
-- runs; changes recorded before are not in it.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    occurred_at BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    event_type BIGINT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

-- Append-only: the processor never changes or removes an entry. (Whoever can drop these
-- triggers can still tamper; the chain and the signed checkpoints are what show it.)
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
