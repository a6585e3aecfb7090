-- Contract ends (ContractService). A contract end is a request of kind CONTRACT_END; this
-- table keeps its terms apart from the request's body, which the forgetting worker removes,
-- so the dispatcher can always send the terms as they stand (Deliver, and UpdateContractEnd
-- through the one delivery row with op 'update' that ChooseContractEnd and ConfirmReturn
-- re-arm). `choice` is a dsrelay.v1.ContractEndChoice value; times are milliseconds.
CREATE TABLE contracts (
    request_id TEXT PRIMARY KEY REFERENCES requests (id),
    processor TEXT NOT NULL,
    choice INTEGER NOT NULL,
    effective_at BIGINT NOT NULL,
    grace_ends_at BIGINT NOT NULL,
    return_confirmed INTEGER NOT NULL DEFAULT 0,
    -- The SHA-256 of the package's manifest.json the controller confirmed (ConfirmReturn).
    manifest_sha256 TEXT,
    -- Counts changes of the terms: an update row is marked sent only when the terms it sent
    -- are still the latest, so a change made while an update was in flight is sent too.
    version BIGINT NOT NULL DEFAULT 1,
    updated_at BIGINT NOT NULL
);
CREATE INDEX contracts_by_processor ON contracts (processor, request_id);

-- A CONTRACT_END task's latest progress (an encoded dsrelay.v1.ContractProgress), as its
-- highest-sequence acknowledgement carried it; NULL for every other task.
ALTER TABLE tasks ADD COLUMN progress BLOB;

-- The progress a TASK_UPDATED event of a CONTRACT_END task reported (an encoded
-- dsrelay.v1.ContractProgress), so Watch and ListEvents show it with the task; NULL otherwise.
ALTER TABLE events ADD COLUMN progress BLOB;
