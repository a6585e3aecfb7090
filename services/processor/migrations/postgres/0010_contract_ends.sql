-- Contract ends (requests of kind CONTRACT_END): the terms as last delivered or updated by the
-- controller, one row per request. The request itself (body, due date) is in `requests`; its
-- tasks, one per subprocessor, in `tasks`.
CREATE TABLE contract_ends (
    controller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    -- ContractEndChoice as its wire number.
    choice BIGINT NOT NULL,
    effective_at BIGINT NOT NULL,
    grace_ends_at BIGINT NOT NULL,
    return_confirmed BIGINT NOT NULL DEFAULT 0,
    received_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (controller, request_id)
);
CREATE INDEX contract_ends_received ON contract_ends (received_at);

-- A contract end task's progress, sent with each of its acknowledgements. `contract_phase`
-- is a ContractPhase wire number; 0 on every other kind of task. `scheduled_at` says when a
-- SCHEDULED task starts.
ALTER TABLE tasks ADD COLUMN contract_phase BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN subjects_done BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN subjects_total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN records_done BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN records_total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN scheduled_at BIGINT;
